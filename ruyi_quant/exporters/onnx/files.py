"""The files: one folder per exit (model.onnx, its external data, genai_config.json, the
tokenizer) that onnxruntime-genai loads as it is, and the multi-exit folder, whose one data file
holds every tensor of the family once and whose small per-exit graphs point into it by offset.
The contract is exporters/onnx.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ... import __version__
from ...errors import writing
from ...model.layout import exit_folder
from ...store.checkpoint import copy_tokenizer
from ..provenance import provenance
from .graph import Decoder

ALIGN, PAGE, BIG = 64, 4096, 1 << 20  # offsets: 64-byte aligned, page aligned past 1 MiB
DATA_FILE = "model.onnx.data"
MULTI_DATA = "family.onnx.data"


class DataFile:
    """External data written tensor by tensor: `add` writes an array at once (one in memory) and
    keeps only its TensorProto stub (name, type, shape, offset); a name added twice is stored once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = open(self.path, "wb")
        self.stubs: dict[str, TensorProto] = {}
        self.attrs: dict = {}  # per-module facts graphs need again (MatMulNBits layout)
        self.tensor_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.stubs

    def add(self, name: str, produce) -> None:
        if name in self.stubs:
            return
        arr = np.ascontiguousarray(produce())
        size = arr.nbytes
        pos = self.f.tell()
        pad = (-pos) % (PAGE if size >= BIG else ALIGN)
        with writing(self.path):
            self.f.write(b"\0" * pad)
            self.f.write(arr.data)  # the array's own bytes, not a copy
        offset = pos + pad
        t = TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
            dims=arr.shape,
            data_location=TensorProto.EXTERNAL,
        )
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(size))):
            t.external_data.add(key=k, value=v)
        self.stubs[name] = t
        self.tensor_bytes += size

    def alias(self, name: str, new: str, dims: tuple[int, ...]) -> str:
        """Another view of a stored tensor's bytes under a new name and shape (no bytes written)."""
        if new not in self.stubs:
            t = TensorProto()
            t.CopyFrom(self.stubs[name])
            t.name = new
            del t.dims[:]
            t.dims.extend(dims)
            self.stubs[new] = t
        return new

    def stubs_for(self, nodes) -> list[TensorProto]:
        """The stubs of the tensors these nodes read, each once."""
        seen = dict.fromkeys(i for n in nodes for i in n.input if i in self.stubs)
        return [self.stubs[i] for i in seen]

    def close(self) -> int:
        self.f.close()
        return self.path.stat().st_size


def metadata(fam, exit: int, opt) -> dict[str, str]:
    """metadata_props of every graph: the GGUF files' provenance, the exit, the graph's settings."""
    meta = {
        f"ruyi.{k}": (json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v))
        for k, v in provenance(fam).items()
        if v is not None
    }
    meta.update(
        {
            "ruyi.exit": str(exit),
            "ruyi.quantized_by": f"ruyi-quant {__version__}",
            "ruyi.onnx_dtype": opt.dtype,
            "ruyi.onnx_weights": opt.weights,
            "ruyi.onnx_head": opt.head,
            "ruyi.onnx_embed": opt.embed,
            "ruyi.accuracy_level": str(opt.accuracy_level),
        }
    )
    return meta


def genai_config(fam, exit: int, filename: str, opt, arch: str) -> dict:
    """onnxruntime-genai's genai_config.json for one exit's graph (greedy search by default)."""
    cfg, raw = fam.config, fam.config.raw
    heads = int(raw["num_attention_heads"])
    context = int(raw.get("max_position_embeddings") or 2048)
    eos = raw.get("eos_token_id")
    eos = eos if eos is not None else 0
    return {
        "model": {
            "bos_token_id": raw.get("bos_token_id") if raw.get("bos_token_id") is not None else eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": exit + 1,
                "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": raw.get("pad_token_id") if raw.get("pad_token_id") is not None else eos,
            "type": arch,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _save_graph(model: onnx.ModelProto, path: Path) -> int:
    with writing(path):
        path.write_bytes(model.SerializeToString())
    return path.stat().st_size


def _arch(fam) -> str:
    return fam.stock_arch()


def write_exit(fam, exit: int, out_dir: Path, tok_dir: Path | None, opt) -> dict:
    """Exit `exit`'s folder (out_dir exists): model.onnx + model.onnx.data, genai_config.json,
    the tokenizer."""
    j = fam.config.exit_index(exit)
    out_dir = Path(out_dir)
    data = DataFile(out_dir / DATA_FILE)
    try:
        model = Decoder(fam, j, opt, data).build(metadata(fam, exit, opt))
    finally:
        data_bytes = data.close()
    graph_bytes = _save_graph(model, out_dir / "model.onnx")
    (out_dir / "genai_config.json").write_text(
        json.dumps(genai_config(fam, exit, "model.onnx", opt, _arch(fam)), indent=2) + "\n"
    )
    if tok_dir is not None:
        copy_tokenizer(tok_dir, out_dir)
    return {
        "exit": exit,
        "file": "model.onnx",
        "bytes": graph_bytes + data_bytes,
        "tensor_bytes": data.tensor_bytes,
        "dtype": opt.dtype,
    }


def write_multi(fam, out_dir: Path, tok_dir: Path | None, opt, exits: list[int] | None = None) -> dict:
    """The multi-exit folder: family.onnx.data (every tensor once), exit-E.onnx per exit,
    genai_config.json for the last exit (files.genai_config names the graph), the tokenizer."""
    out_dir = Path(out_dir)
    exits = fam.config.exit_list(exits)
    data = DataFile(out_dir / MULTI_DATA)
    graphs = {}
    try:
        for e in exits:
            graphs[e] = Decoder(fam, fam.config.exit_index(e), opt, data).build(metadata(fam, e, opt))
    finally:
        data_bytes = data.close()
    files = {}
    for e, model in graphs.items():
        model.metadata_props.add(key="ruyi.multi_exit", value=json.dumps(exits))
        files[e] = _save_graph(model, out_dir / f"{exit_folder(e)}.onnx")
    last = exits[-1]
    (out_dir / "genai_config.json").write_text(
        json.dumps(genai_config(fam, last, f"{exit_folder(last)}.onnx", opt, _arch(fam)), indent=2) + "\n"
    )
    if tok_dir is not None:
        copy_tokenizer(tok_dir, out_dir)
    return {
        "exits": exits,
        "data_file": MULTI_DATA,
        "data_bytes": data_bytes,
        "tensor_bytes": data.tensor_bytes,
        "graph_bytes": sum(files.values()),
        "bytes": data_bytes + sum(files.values()),
        "dtype": opt.dtype,
    }

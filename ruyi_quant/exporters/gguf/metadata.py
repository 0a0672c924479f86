"""Key/values of GGUF files (general.*, the architecture's hyperparameters, ruyi.* provenance)
and the file writer itself (gguf-py's GGUFWriter)."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import Keys

from ... import __version__
from ...errors import writing
from ...quant.family import QuantizedFamily
from ..provenance import provenance
from .tensors import ARCH, GGUFOptions, LazyArray
from .tokenizer import tokenizer_kv

FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32,
    T.F16: gguf.LlamaFileType.MOSTLY_F16,
    T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}


class RuyiKeys:
    """Our own keys (gguf-py's `Keys` has the rest): provenance, and the multi-exit file's config."""

    SOURCE_MODEL, EXITS, METHOD = "ruyi.source_model", "ruyi.exits", "ruyi.method"
    BITS, GROUP_SIZE, SYM, CALIBRATION = "ruyi.bits", "ruyi.group_size", "ruyi.sym", "ruyi.calibration"
    EXIT = "ruyi.exit"  # per-exit files: which exit this is
    CONFIG = "ruyi.config"  # multi-exit file: the family's config.json
    EXIT_ARCHITECTURE = "ruyi.exit_architecture"  # multi-exit file: qwen2 or llama per exit


def size_label(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{round(params / 1e6)}M"


def common_kv(fam: QuantizedFamily, tok_dir: Path, opt: GGUFOptions) -> list[tuple]:
    """Key/values shared by every file of a family: general.*, tokenizer.*, ruyi.* provenance."""
    p = provenance(fam, opt.license)
    kv = [
        (Keys.General.QUANTIZED_BY, f"ruyi-quant {__version__}", V.STRING, None),
        (Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, V.UINT32, None),
    ]
    if p["license"]:
        kv.append((Keys.General.LICENSE, p["license"], V.STRING, None))
    kv += [
        (RuyiKeys.SOURCE_MODEL, p["source_model"], V.STRING, None),
        (RuyiKeys.EXITS, p["exits"], V.ARRAY, V.INT32),
        (RuyiKeys.METHOD, p["method"], V.STRING, None),
    ]
    if fam.grids:
        kv += [
            (RuyiKeys.BITS, p["bits"], V.INT32, None),
            (RuyiKeys.GROUP_SIZE, p["group_size"], V.INT32, None),
            (RuyiKeys.SYM, p["sym"], V.BOOL, None),
        ]
    if "calibration" in p:
        kv.append((RuyiKeys.CALIBRATION, p["calibration"], V.STRING, None))
    return kv + tokenizer_kv(tok_dir, fam.config.vocab_size)


def exit_kv(cfg, j: int, params: int, base_name: str, a: str = ARCH) -> list[tuple]:
    """The per-exit keys: hyperparameters of e+1 blocks for architecture `a`, name, size, exit."""
    e, raw = cfg.exits[j], cfg.raw
    kv = [
        (Keys.General.NAME, f"{base_name} exit {e}", V.STRING, None),
        (Keys.General.SIZE_LABEL, size_label(params), V.STRING, None),
        (
            Keys.LLM.CONTEXT_LENGTH.format(arch=a),
            int(raw.get("max_position_embeddings", 32768)),
            V.UINT32,
            None,
        ),
        (Keys.LLM.EMBEDDING_LENGTH.format(arch=a), cfg.hidden_size, V.UINT32, None),
        (Keys.LLM.BLOCK_COUNT.format(arch=a), e + 1, V.UINT32, None),
        (Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), int(raw["intermediate_size"]), V.UINT32, None),
        (Keys.Attention.HEAD_COUNT.format(arch=a), int(raw["num_attention_heads"]), V.UINT32, None),
        (
            Keys.Attention.HEAD_COUNT_KV.format(arch=a),
            int(raw.get("num_key_value_heads", raw["num_attention_heads"])),
            V.UINT32,
            None,
        ),
        (
            Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a),
            float(raw.get("rms_norm_eps", 1e-6)),
            V.FLOAT32,
            None,
        ),
        (Keys.Rope.FREQ_BASE.format(arch=a), cfg.rope_theta, V.FLOAT32, None),
        (Keys.Rope.DIMENSION_COUNT.format(arch=a), cfg.head_dim, V.UINT32, None),
        (RuyiKeys.EXIT, e, V.INT32, None),
    ]
    return kv


def _file_type(arrays) -> gguf.LlamaFileType:
    """general.file_type: the type of most linear weights."""
    kinds = [t for n, _, t in arrays if re.search(r"\.(attn_[qkvo]\w*|ffn_\w+)\.weight$", n)]
    return FILE_TYPES[max(set(kinds), key=kinds.count)] if kinds else gguf.LlamaFileType.ALL_F32


def write_gguf(path: Path, arch: str, kv: list[tuple], arrays, file_type=None) -> int:
    """Write a GGUF file: key/values [(key, value, type, sub type)], tensors [(name, data,
    ggml type)], general.file_type (default: the type of most linear weights). Returns its size.
    Tensors may be LazyArrays: each is produced when its turn comes, so a file of any size is
    written with one tensor in memory."""
    with writing(path):
        _write_gguf(path, arch, kv, arrays, file_type)
    return path.stat().st_size


# keys that gguf-py's writer has an add_* method for (key templates: `{arch}` is the file's)
WRITERS = {
    Keys.General.NAME: "add_name",
    Keys.General.SIZE_LABEL: "add_size_label",
    Keys.General.LICENSE: "add_license",
    Keys.General.QUANTIZED_BY: "add_quantized_by",
    Keys.General.QUANTIZATION_VERSION: "add_quantization_version",
    Keys.LLM.CONTEXT_LENGTH: "add_context_length",
    Keys.LLM.EMBEDDING_LENGTH: "add_embedding_length",
    Keys.LLM.BLOCK_COUNT: "add_block_count",
    Keys.LLM.FEED_FORWARD_LENGTH: "add_feed_forward_length",
    Keys.Attention.HEAD_COUNT: "add_head_count",
    Keys.Attention.HEAD_COUNT_KV: "add_head_count_kv",
    Keys.Attention.LAYERNORM_RMS_EPS: "add_layer_norm_rms_eps",
    Keys.Rope.FREQ_BASE: "add_rope_freq_base",
    Keys.Rope.DIMENSION_COUNT: "add_rope_dimension_count",
    Keys.Tokenizer.MODEL: "add_tokenizer_model",
    Keys.Tokenizer.PRE: "add_tokenizer_pre",
    Keys.Tokenizer.LIST: "add_token_list",
    Keys.Tokenizer.TOKEN_TYPE: "add_token_types",
    Keys.Tokenizer.MERGES: "add_token_merges",
    Keys.Tokenizer.BOS_ID: "add_bos_token_id",
    Keys.Tokenizer.EOS_ID: "add_eos_token_id",
    Keys.Tokenizer.PAD_ID: "add_pad_token_id",
    Keys.Tokenizer.UNK_ID: "add_unk_token_id",
    Keys.Tokenizer.ADD_BOS: "add_add_bos_token",
    Keys.Tokenizer.CHAT_TEMPLATE: "add_chat_template",
}


def _write_gguf(path: Path, arch: str, kv: list[tuple], arrays, file_type) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    writers = {key.format(arch=arch): method for key, method in WRITERS.items()}
    for key, val, vtype, sub in kv:
        if key in writers and (vtype != V.ARRAY or len(val)):  # gguf-py's own writer
            getattr(w, writers[key])(val)
        else:  # our ruyi.* keys, and the rest
            w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_file_type(_file_type(arrays) if file_type is None else file_type)
    for name, data, qtype in arrays:
        w.add_tensor_info(
            name, data.shape, data.dtype, data.nbytes, raw_dtype=None if qtype in (T.F32, T.F16) else qtype
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, data, qtype in arrays:
        w.write_tensor_data(np.ascontiguousarray(data() if isinstance(data, LazyArray) else data))
    w.close()


def _field_value(field):
    """(value, value type, sub type) of a GGUFReader field, ready for GGUFWriter."""
    vtype = field.types[0]
    return field.contents(), vtype, (field.types[1] if vtype == V.ARRAY else None)


def read_kv(r: gguf.GGUFReader, skip: tuple[str, ...] = ()) -> tuple[list[tuple], str, int]:
    """A file's key/values ready for write_gguf (less `skip`), its architecture, its file type."""
    own = (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE) + tuple(skip)
    kv = [(k, *_field_value(f)) for k, f in r.fields.items() if not k.startswith("GGUF.") and k not in own]
    ft = r.fields.get(Keys.General.FILE_TYPE)
    return kv, r.fields[Keys.General.ARCHITECTURE].contents(), (ft.contents() if ft else None)

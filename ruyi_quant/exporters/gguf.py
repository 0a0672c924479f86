"""GGUF files for llama.cpp and Ollama: one stock `qwen2` (or `llama`) file per exit, one
multi-exit file.

Per-exit file of exit e: the plain model of e+1 blocks (trunk layers 0..e-1, the branch layer as
block e, the exit's norm and head as output_norm / output). Our int4/int8 grids go in exactly
(exporters/ggml.py); norms and biases are F32; embeddings and float heads get their own type.
The multi-exit file (architecture `ruyi`) holds the trunk once, every branch layer, norm and
head, and the family's config; `extract_exit` copies a stock per-exit file out of it, tensor
bytes untouched. The contract is exporters/gguf.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from .. import __version__, names
from ..checkpoint import QuantizedFamily
from ..errors import UserError
from ..model.config import parse_config
from .ggml import NotExact, block_groups, encode_grid, grid_type

ARCH = "qwen2"
LLAMA_ARCH = "llama"    # plain Llama sources: no q/k/v biases, q/k rows in llama.cpp's rope order
MULTI_ARCH = "ruyi"
FLOAT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}
TYPES = {**FLOAT_TYPES, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
# tokenizer.json pre-tokenizer -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED = 1, 3, 4, 5
LICENSES = {"builtin:ruyi-mini": "apache-2.0", "builtin:smollm2": "apache-2.0"}


@dataclass(frozen=True)
class GGUFOptions:
    type: str = "auto"            # auto: grids exactly, float linears f16; or one of TYPES
    embed_type: str = "auto"      # auto: q8_0 in files with <= 4-bit grids, else as `type`
    head_type: str = "auto"       # a float head; a quantized head keeps its grid
    name: str | None = None
    license: str | None = None


def _role(fam: QuantizedFamily, module: str) -> str:
    if module == names.EMBED:
        return "embed"
    if module == names.SHARED_HEAD or re.fullmatch(r"lm_head\.\d+", module):
        return "head"
    return "linear" if module.endswith(tuple("." + n for n in names.LAYER_LINEARS)) else "other"


def _auto_types(fam: QuantizedFamily, opt: GGUFOptions) -> dict[str, T]:
    """The ggml type of each role: linear (float linears), embed, head."""
    low_bits = any(s.bits <= 4 for s in fam.modules.values())
    base = T.F16 if opt.type == "auto" else TYPES[opt.type]
    small = T.Q8_0 if low_bits or base in (T.Q4_0, T.Q4_1) else base
    return {"linear": base,
            "embed": small if opt.embed_type == "auto" else TYPES[opt.embed_type],
            "head": small if opt.head_type == "auto" else TYPES[opt.head_type]}


def _float_array(t: torch.Tensor, qtype: T, what: str) -> tuple[np.ndarray, T]:
    x = t.detach().float().numpy()
    if qtype == T.F32:
        return x, T.F32
    if qtype == T.F16:
        return x.astype(np.float16), T.F16
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1) and x.shape[-1] % 32:
        raise UserError(f"{what}: {x.shape[-1]} columns is not a multiple of 32, which "
                        f"{qtype.name} needs; choose type f16")
    return gguf.quants.quantize(x, qtype), qtype


def check_gguf(fam: QuantizedFamily, opt: GGUFOptions) -> None:
    """Raise the one-line UserError that encode_module would, without encoding anything."""
    for module, grid in fam.grids.items():
        _check_grid(module, grid.spec, TYPES.get(opt.type), lambda: block_groups(grid.g_idx, grid.shape[1]))


def _check_grid(module, spec, want, blocks) -> None:
    if want in FLOAT_TYPES.values():
        return
    exact = grid_type(spec.bits, spec.sym)
    if want is not None and want != exact:
        raise UserError(f"type {want.name.lower()}: {module} holds a {spec.bits}-bit "
                        f"{'symmetric' if spec.sym else 'asymmetric'} grid, which "
                        f"{want.name} cannot hold exactly; use type auto"
                        + (f" ({exact.name})" if exact else "") + " or a float type")
    try:
        if exact is None:
            raise NotExact(f"no ggml type holds a {spec.bits}-bit "
                           f"{'symmetric' if spec.sym else 'asymmetric'} grid exactly")
        blocks()
    except NotExact as e:
        raise UserError(f"gguf: {module} cannot go into GGUF exactly: {e}; quantize with "
                        "group_size a multiple of 32, act_order: false (or static_groups: true), "
                        "and 4 bits (sym or asym) or 8 bits sym; or export type f16") from None


def encode_module(fam: QuantizedFamily, module: str, opt: GGUFOptions,
                  types: dict[str, T]) -> tuple[np.ndarray, T]:
    """The weight of one familial module as GGUF data (identical wherever it is written)."""
    role = _role(fam, module)
    if module in fam.modules:
        spec = fam.modules[module]
        want = TYPES.get(opt.type)
        if want in FLOAT_TYPES.values():
            return _float_array(fam.weight(module), want, module)
        grid = fam.grid(module)
        _check_grid(module, spec, want, lambda: block_groups(grid[3], grid[0].shape[0]))
        try:
            return encode_grid(*grid, spec.bits, spec.sym)
        except NotExact as e:
            raise UserError(f"gguf: {module} cannot go into GGUF exactly: {e}") from None
    w = fam.tensors[f"{module}.weight"]
    return _float_array(w, types.get(role, types["linear"]), module)


def exit_arch(fam: QuantizedFamily) -> str:
    """`llama` for a plain Llama source whose q/k/v biases are all zero (as loading made them),
    else `qwen2` (Qwen2 sources, Ruyi families, trained branches with biases)."""
    if fam.config.source_arch != "llama":
        return ARCH
    biases = [t for n, t in fam.tensors.items() if re.search(r"\.[qkv]_proj\.bias$", n)]
    return LLAMA_ARCH if all(not t.any() for t in biases) else ARCH


def llama_rope_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection from HF's rotate-half RoPE layout to
    llama.cpp's interleaved one (what convert_hf_to_gguf does for llama). Whole rows move, so
    encoded int4/int8 blocks move unchanged."""
    rows = data.shape[0]
    return data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def family_arrays(fam: QuantizedFamily, modules_and_names, opt: GGUFOptions):
    """[(gguf name, data, type)] for familial tensors, named by `modules_and_names`:
    a list of (familial tensor name, gguf name); quantized linears appear once as `.weight`.
    For the llama architecture q/k rows are reordered and the (zero) q/k/v biases left out."""
    types = _auto_types(fam, opt)
    llama = exit_arch(fam) == LLAMA_ARCH
    raw = fam.config.raw
    heads = {"attn_q": int(raw["num_attention_heads"]),
             "attn_k": int(raw.get("num_key_value_heads", raw["num_attention_heads"]))}
    out = []
    for fname, gname in modules_and_names:
        mod, suffix = fname.rsplit(".", 1)
        if llama and suffix == "bias" and re.search(r"attn_[qkv]\.bias$", gname):
            continue
        if suffix == "weight" and _role(fam, mod) != "other":
            data, qtype = encode_module(fam, mod, opt, types)
        else:                                   # norms, biases
            data, qtype = fam.tensors[fname].detach().float().numpy(), T.F32
        kind = gname.rsplit(".", 2)[-2]
        if llama and kind in heads:
            data = llama_rope_rows(data, heads[kind])
        out.append((gname, data, qtype))
    return out


# --- metadata -------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer a tokenizer.json describes."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(f"gguf: unknown pre-tokenizer {json.dumps(pre)[:120]}; llama.cpp would "
                    "tokenize differently from transformers")


def tokenizer_kv(tok_dir: Path, n_vocab: int) -> list[tuple[str, object, V, V | None]]:
    """tokenizer.* key/values of a byte-level BPE tokenizer directory (tokenizer.json)."""
    path = Path(tok_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{tok_dir}: no tokenizer.json; GGUF needs the tokenizer")
    tj = json.loads(path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles byte-level BPE")
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: TOKEN_NORMAL for i in tokens}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER
    if max(tokens) >= n_vocab:
        raise UserError(f"{path}: token id {max(tokens)} beyond the model's {n_vocab} embeddings")
    toks = [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    ttypes = [types.get(i, TOKEN_UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv = [("tokenizer.ggml.model", "gpt2", V.STRING, None),
          ("tokenizer.ggml.pre", pre_tokenizer_name(tj), V.STRING, None),
          ("tokenizer.ggml.tokens", toks, V.ARRAY, V.STRING),
          ("tokenizer.ggml.token_type", ttypes, V.ARRAY, V.INT32),
          ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=n_vocab)
    for typ, tid in sorted(special.special_token_ids.items()):
        kv.append((f"tokenizer.ggml.{typ}_token_id", int(tid), V.UINT32, None))
    kv.append(("tokenizer.ggml.add_bos_token", False, V.BOOL, None))
    template = special.chat_template
    if not template and (Path(tok_dir) / "chat_template.jinja").is_file():
        template = (Path(tok_dir) / "chat_template.jinja").read_text()
    if template:
        kv.append(("tokenizer.chat_template", template, V.STRING, None))
    return kv


def size_label(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{round(params / 1e6)}M"


def common_kv(fam: QuantizedFamily, tok_dir: Path, opt: GGUFOptions) -> list[tuple]:
    """Key/values shared by every file of a family: general.*, tokenizer.*, ruyi.* provenance."""
    rec = fam.recipe or {}
    source = rec.get("model")
    lic = opt.license or LICENSES.get(source or "")
    q = rec.get("quantize") or {}
    cal = rec.get("calibration") or {}
    common = fam.quantization_json()["common"] or {}
    kv = [("general.quantized_by", f"ruyi-quant {__version__}", V.STRING, None),
          ("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32, None)]
    if lic:
        kv.append(("general.license", lic, V.STRING, None))
    kv += [("ruyi.source_model", str(source or "unknown"), V.STRING, None),
           ("ruyi.exits", list(fam.config.exits), V.ARRAY, V.INT32),
           ("ruyi.method", fam.method, V.STRING, None)]
    if fam.modules:
        kv += [("ruyi.bits", int(common.get("bits", q.get("bits", 0))), V.INT32, None),
               ("ruyi.group_size", int(common.get("group_size", q.get("group_size", 0))), V.INT32, None),
               ("ruyi.sym", bool(common.get("sym", q.get("sym", True))), V.BOOL, None)]
    if cal.get("source") and fam.method in ("gptq", "awq"):
        kv.append(("ruyi.calibration", f"{cal['source']} {cal.get('samples')}x{cal.get('seq_len')} "
                   f"seed {cal.get('seed')}", V.STRING, None))
    return kv + tokenizer_kv(tok_dir, fam.config.vocab_size)


def exit_kv(cfg, j: int, params: int, base_name: str, a: str = ARCH) -> list[tuple]:
    """The per-exit keys: hyperparameters of e+1 blocks for architecture `a`, name, size, exit."""
    e, raw = cfg.exits[j], cfg.raw
    kv = [("general.name", f"{base_name} exit {e}", V.STRING, None),
          ("general.size_label", size_label(params), V.STRING, None),
          (f"{a}.context_length", int(raw.get("max_position_embeddings", 32768)), V.UINT32, None),
          (f"{a}.embedding_length", cfg.hidden_size, V.UINT32, None),
          (f"{a}.block_count", e + 1, V.UINT32, None),
          (f"{a}.feed_forward_length", int(raw["intermediate_size"]), V.UINT32, None),
          (f"{a}.attention.head_count", int(raw["num_attention_heads"]), V.UINT32, None),
          (f"{a}.attention.head_count_kv", int(raw.get("num_key_value_heads",
                                                        raw["num_attention_heads"])), V.UINT32, None),
          (f"{a}.attention.layer_norm_rms_epsilon", float(raw.get("rms_norm_eps", 1e-6)), V.FLOAT32, None),
          (f"{a}.rope.freq_base", cfg.rope_theta, V.FLOAT32, None),
          (f"{a}.rope.dimension_count", cfg.head_dim, V.UINT32, None),
          ("ruyi.exit", e, V.INT32, None)]
    if cfg.rope_scaled:
        raise UserError("gguf: scaled RoPE is not exported yet; the model uses "
                        f"{raw.get('rope_parameters') or raw.get('rope_scaling')}")
    return kv


def _file_type(arrays) -> gguf.LlamaFileType:
    """general.file_type: the type of most linear weights."""
    kinds = [t for n, _, t in arrays if re.search(r"\.(attn_[qkvo]\w*|ffn_\w+)\.weight$", n)]
    return FILE_TYPES[max(set(kinds), key=kinds.count)] if kinds else gguf.LlamaFileType.ALL_F32


def write_gguf(path: Path, arch: str, kv: list[tuple], arrays, file_type=None) -> int:
    """Write a GGUF file: key/values [(key, value, type, sub type)], tensors [(name, data,
    ggml type)], general.file_type (default: the type of most linear weights). Returns its size."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, val, vtype, sub in kv:
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_file_type(_file_type(arrays) if file_type is None else file_type)
    for name, data, qtype in arrays:
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path.stat().st_size


def base_name(fam: QuantizedFamily, opt: GGUFOptions) -> str:
    if opt.name:
        return opt.name
    src = str((fam.recipe or {}).get("model") or "model")
    return Path(src.removeprefix("builtin:")).name


# --- writers --------------------------------------------------------------------------------

def exit_arrays(fam: QuantizedFamily, j: int, opt: GGUFOptions):
    exit_map = fam.config.exit_map(j)
    pairs = [(f, names.gguf_name(exit_map.rename(f))) for f in fam.exit_tensor_names(j)]
    return family_arrays(fam, pairs, opt)


def write_exit(fam: QuantizedFamily, exit: int, path: Path, tok_dir: Path,
               opt: GGUFOptions = GGUFOptions(), common: list[tuple] | None = None) -> dict:
    """A stock qwen2 (or llama) GGUF of one exit. `common`: common_kv(fam, tok_dir, opt) when the caller
    writes several files (it reads the tokenizer)."""
    cfg = fam.config
    j = cfg.exit_index(exit)
    arrays = exit_arrays(fam, j, opt)
    params = fam.size(fam.exit_tensor_names(j))[0]
    arch = exit_arch(fam)
    kv = exit_kv(cfg, j, params, base_name(fam, opt), arch) + (common or common_kv(fam, tok_dir, opt))
    size = write_gguf(Path(path), arch, kv, arrays)
    write_modelfile(Path(path), kv)
    return {"exit": cfg.exits[j], "file": Path(path).name, "bytes": size,
            "tensor_bytes": sum(int(a.nbytes) for _, a, _ in arrays),
            "types": sorted({t.name for _, _, t in arrays})}


def write_multi(fam: QuantizedFamily, path: Path, tok_dir: Path,
                opt: GGUFOptions = GGUFOptions(), common: list[tuple] | None = None) -> dict:
    """One file: every tensor of the family once, the family's config, the exit list."""
    pairs = [(f, names.gguf_multi_name(f)) for f in fam.weight_names()]
    arrays = family_arrays(fam, pairs, opt)
    kv = [("general.name", base_name(fam, opt), V.STRING, None),
          ("general.size_label", size_label(fam.size()[0]), V.STRING, None),
          ("ruyi.config", json.dumps(fam.config.to_json(), sort_keys=True), V.STRING, None),
          ("ruyi.exit_architecture", exit_arch(fam), V.STRING, None)]
    size = write_gguf(Path(path), MULTI_ARCH, kv + (common or common_kv(fam, tok_dir, opt)), arrays)
    return {"file": Path(path).name, "bytes": size,
            "tensor_bytes": sum(int(a.nbytes) for _, a, _ in arrays)}


def _field_value(field):
    """(value, value type, sub type) of a GGUFReader field, ready for GGUFWriter."""
    vtype = field.types[0]
    return field.contents(), vtype, (field.types[1] if vtype == V.ARRAY else None)


def read_kv(r: gguf.GGUFReader, skip: tuple[str, ...] = ()) -> tuple[list[tuple], str, int]:
    """A file's key/values ready for write_gguf (less `skip`), its architecture, its file type."""
    own = ("general.architecture", "general.file_type") + tuple(skip)
    kv = [(k, *_field_value(f)) for k, f in r.fields.items()
          if not k.startswith("GGUF.") and k not in own]
    ft = r.fields.get("general.file_type")
    return kv, r.fields["general.architecture"].contents(), (ft.contents() if ft else None)


def extract_exit(multi_path: Path, exit: int, path: Path) -> dict:
    """A stock per-exit file copied out of a multi-exit file: tensor bytes untouched."""
    multi_path = Path(multi_path)
    try:
        r = gguf.GGUFReader(str(multi_path))
    except Exception as e:   # noqa: BLE001 - any parse failure is a bad input file
        raise UserError(f"{multi_path}: not a GGUF file ({e})") from None
    arch = r.fields.get("general.architecture")
    if arch is None or arch.contents() != MULTI_ARCH or "ruyi.config" not in r.fields:
        raise UserError(f"{multi_path}: not a ruyi-quant multi-exit GGUF (architecture "
                        f"'{arch.contents() if arch else None}'); export one with --multi")
    cfg = parse_config(json.loads(r.fields["ruyi.config"].contents()), where=str(multi_path))
    j = cfg.exit_index(exit)
    arrays, params = [], 0
    for t in r.tensors:
        new = names.gguf_multi_to_exit(t.name, cfg.exits, cfg.num_layers, cfg.shared_heads, j)
        if new is None:
            continue
        qtype = T(t.tensor_type)
        arrays.append((new, np.asarray(t.data), qtype))
        params += int(t.n_elements)
    arrays.sort(key=lambda a: _exit_order(a[0]))
    kv = read_kv(r, skip=("general.name", "general.size_label", "ruyi.config",
                          "ruyi.exit_architecture"))[0]
    base = r.fields["general.name"].contents()
    arch = r.fields.get("ruyi.exit_architecture")
    arch = arch.contents() if arch is not None else ARCH
    kv = exit_kv(cfg, j, params, base, arch) + kv
    size = write_gguf(Path(path), arch, kv, arrays)
    write_modelfile(Path(path), kv)
    return {"exit": cfg.exits[j], "file": Path(path).name, "bytes": size}


def _exit_order(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if name.startswith("token_embd") else 2, 0, name)


# --- Ollama ---------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n")


STOP_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def write_modelfile(gguf_path: Path, kv: list[tuple]) -> None:
    """The Ollama Modelfile next to a per-exit file, from the file's own tokenizer keys."""
    values = {k: v for k, v, _, _ in kv}
    template = values.get("tokenizer.chat_template")
    tokens = set(values.get("tokenizer.ggml.tokens", []))
    stops = [t for t in STOP_TOKENS if t in tokens] if template else []
    (gguf_path.parent / "Modelfile").write_text(
        modelfile(gguf_path.name, template, stops, default_system(template)))


def write_modelfile_for(gguf_path: Path) -> None:
    """The Modelfile of a GGUF file that exists (e.g. one llama.cpp's quantizer wrote)."""
    r = gguf.GGUFReader(str(gguf_path))
    kv = [(k, f.contents(), None, None) for k, f in r.fields.items() if k.startswith("tokenizer.")]
    write_modelfile(Path(gguf_path), kv)


def modelfile(gguf_file: str, chat_template: str | None, stops: list[str],
              system: str | None = None) -> str:
    """An Ollama Modelfile next to a per-exit file (ChatML templates are translated)."""
    lines = [f"FROM ./{gguf_file}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML; write one by hand")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0.2", "PARAMETER num_ctx 2048"]
    return "\n".join(lines) + "\n"


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when none is given (SmolLM2 has one)."""
    if not chat_template:
        return None
    m = re.search(r"<\|im_start\|>system\\n([^<{]+?)<\|im_end\|>", chat_template)
    return m.group(1) if m else None


# --- llama.cpp's own quantizer (optional: needs llama-cpp-python) ---------------------------

K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
LLAMA_FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


@contextmanager
def _c_stderr_silenced():
    """Send what C code writes to file descriptor 2 to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> int:
    """Re-quantize a float GGUF with llama.cpp's own quantizer (K-quants, or its RTN Q4_0...).
    Returns the new file's size. Its importance-matrix input is a C++ map that Python cannot
    pass; imatrix.requantize applies ours afterwards."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"type {ftype}: llama.cpp's quantizer needs llama-cpp-python "
                        "(pip install 'ruyi-quant[llama]')") from None
    if ftype not in LLAMA_FTYPES:
        raise UserError(f"type {ftype}: llama.cpp types are {', '.join(LLAMA_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[ftype])
    params.nthread = threads
    with _c_stderr_silenced():          # it logs every tensor (and each fallback type) there
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return Path(dst).stat().st_size

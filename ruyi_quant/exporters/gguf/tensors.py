"""Tensor data for GGUF files: each familial weight as the ggml type it goes in.

Our int4/int8 grids go in exactly (ggml.py); norms and biases are F32; float linears, the
embedding and float heads get the type the options name (`auto`: f16, and q8_0 for the
embedding and heads of files with 4-bit grids). Plain Llama sources get llama.cpp's row order
for q/k (`llama_rope_rows`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ...errors import UserError, writing
from ...model import layout
from ...quant.family import QuantizedFamily
from ...quant.ggml_quantizer import quantize_rows
from ...quant.kquant import block_type
from .ggml import NotExact, block_groups, encode_grid, grid_type

ARCH = "qwen2"
LLAMA_ARCH = "llama"  # plain Llama sources: no q/k/v biases, q/k rows in llama.cpp's rope order
MULTI_ARCH = "ruyi"
FLOAT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}
TYPES = {**FLOAT_TYPES, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32,
    T.F16: gguf.LlamaFileType.MOSTLY_F16,
    T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}
BLOCK_FILE_TYPES = {  # files in llama.cpp's mixes of block types
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}


@dataclass(frozen=True)
class GGUFOptions:
    type: str = "auto"  # auto: grids exactly, float linears f16; or one of TYPES
    embed_type: str = "auto"  # auto: q8_0 in files with <= 4-bit grids, else as `type`
    head_type: str = "auto"  # a float head; a quantized head keeps its grid
    name: str | None = None
    license: str | None = None


def _auto_types(fam: QuantizedFamily, opt: GGUFOptions) -> dict[str, T]:
    """The ggml type of each role: linear (float linears), embed, head."""
    low_bits = any(s.bits <= 4 for s in fam.modules.values())
    base = T.F16 if opt.type == "auto" else TYPES[opt.type]
    small = T.Q8_0 if low_bits or base in (T.Q4_0, T.Q4_1) else base
    return {
        "linear": base,
        "embedding": small if opt.embed_type == "auto" else TYPES[opt.embed_type],
        "head": small if opt.head_type == "auto" else TYPES[opt.head_type],
    }


class LazyArray:
    """A tensor's data for write_gguf, made by produce() when written: shape, dtype and nbytes
    are known before (the file's tensor table comes first)."""

    def __init__(self, shape: tuple, dtype, produce):
        self.shape, self.dtype, self._produce = tuple(shape), np.dtype(dtype), produce
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __call__(self) -> np.ndarray:
        data = self._produce()
        if data.shape != self.shape or data.dtype != self.dtype:
            raise RuntimeError(f"produced {data.dtype} {data.shape}, expected {self.dtype} {self.shape}")
        return data


class EncodedCache:
    """Encoded weights kept on disk while one export writes several files, so that a module in
    several of them (the trunk, in every exit's file and the multi-exit one) is unpacked and
    encoded once. `uses`: how many of the files hold each familial tensor; one held more than
    once is written to `root` the first time, read back (one tensor in memory at a time) the
    next times, and deleted after its last use."""

    def __init__(self, root: Path, uses: Counter):
        self.root, self.left = Path(root), Counter(uses)
        self.stored: dict[str, tuple[Path, tuple]] = {}  # name -> (file, shape)

    def get(self, name: str, dtype, produce) -> np.ndarray:
        self.left[name] -= 1
        if name in self.stored:
            path, shape = self.stored[name]
            data = np.fromfile(path, dtype=dtype).reshape(shape)
            if self.left[name] <= 0:
                path.unlink()
            return data
        data = produce()
        if self.left[name] > 0:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f"{len(self.stored)}.bin"
            with writing(path):
                np.ascontiguousarray(data).tofile(path)
            self.stored[name] = (path, data.shape)
        return data


def _float_array(t: torch.Tensor, qtype: T, what: str) -> tuple[np.ndarray, T]:
    if qtype == T.F32:
        return t.detach().float().numpy(), T.F32
    if qtype == T.F16:
        return t.detach().float().numpy().astype(np.float16), T.F16
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1) and t.shape[-1] % 32:
        raise UserError(
            f"{what}: {t.shape[-1]} columns is not a multiple of 32, which "
            f"{qtype.name} needs; choose type f16"
        )
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(tuple(t.shape), qtype), dtype=np.uint8)
    step = max(1, QUANTIZE_ROWS_ELEMENTS // t.shape[-1])
    for r in range(0, t.shape[0], step):  # rows at a time, from the stored dtype: gguf's
        x = t[r : r + step].detach().float().numpy()  # quantizer makes several full-size
        out[r : r + step] = gguf.quants.quantize(x, qtype)  # float temporaries
    return out, qtype


QUANTIZE_ROWS_ELEMENTS = 1 << 24


def check_grid(module, spec, want, blocks) -> None:
    if want in FLOAT_TYPES.values():
        return
    exact = grid_type(spec.bits, spec.sym)
    if want is not None and want != exact:
        raise UserError(
            f"type {want.name.lower()}: {module} holds a {spec.bits}-bit "
            f"{'symmetric' if spec.sym else 'asymmetric'} grid, which "
            f"{want.name} cannot hold exactly; use type auto"
            + (f" ({exact.name})" if exact else "")
            + " or a float type"
        )
    try:
        if exact is None:
            raise NotExact(
                f"no ggml type holds a {spec.bits}-bit "
                f"{'symmetric' if spec.sym else 'asymmetric'} grid exactly"
            )
        blocks()
    except NotExact as e:
        raise UserError(
            f"gguf: {module} cannot go into GGUF exactly: {e}; quantize with "
            "group_size a multiple of 32, act_order: false (or static_groups: true), "
            "and 4 bits (sym or asym) or 8 bits sym; or export type f16"
        ) from None


def encode_module(
    fam: QuantizedFamily, module: str, opt: GGUFOptions, types: dict[str, T]
) -> tuple[np.ndarray, T]:
    """The weight of one familial module as GGUF data (identical wherever it is written)."""
    role = layout.role(module)
    if module in fam.grids:
        spec = fam.grids[module].spec
        want = TYPES.get(opt.type)
        if want in FLOAT_TYPES.values():
            return _float_array(fam.weight(module), want, module)
        grid = fam.grid(module)
        check_grid(module, spec, want, lambda: block_groups(grid[3], grid[0].shape[0]))
        try:
            return encode_grid(*grid, spec.bits, spec.sym)
        except NotExact as e:
            raise UserError(f"gguf: {module} cannot go into GGUF exactly: {e}") from None
    w = fam.tensors[f"{module}.weight"]
    return _float_array(w, types.get(role, types["linear"]), module)


def exit_arch(fam: QuantizedFamily) -> str:
    """llama.cpp's architecture of an exit's stock file (QuantizedFamily.stock_arch)."""
    return LLAMA_ARCH if fam.stock_arch() == "llama" else ARCH


def llama_rope_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection from HF's rotate-half RoPE layout to
    llama.cpp's interleaved one (what convert_hf_to_gguf does for llama). Whole rows move, so
    encoded int4/int8 blocks move unchanged."""
    rows = data.shape[0]
    return data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def family_arrays(
    fam: QuantizedFamily,
    modules_and_names,
    opt: GGUFOptions,
    cache: EncodedCache | None = None,
    blocks: dict[str, str] | None = None,
):
    """[(gguf name, LazyArray, type)] for familial tensors, named by `modules_and_names`: a list of
    (familial tensor name, gguf name); quantized linears appear once as `.weight`. Types and
    shapes are decided (and every refusal raised) now; the data is encoded when written (or
    taken from `cache`). For the llama architecture q/k rows are reordered and the (zero) q/k/v
    biases left out. `blocks`: {module: llama.cpp block type} of a file in llama.cpp's types
    (quant/ktypes.py): a block grid's bytes of that type, other weights by ggml's quantizer."""
    types = _auto_types(fam, opt)
    llama = exit_arch(fam) == LLAMA_ARCH
    raw = fam.config.raw
    heads = {
        "attn_q": int(raw["num_attention_heads"]),
        "attn_k": int(raw.get("num_key_value_heads", raw["num_attention_heads"])),
    }
    out = []
    for fname, gname in modules_and_names:
        mod, suffix = fname.rsplit(".", 1)
        if llama and layout.is_layer_bias(fname):
            continue
        if suffix == "weight" and blocks is not None and mod in blocks and blocks[mod] != "f16":
            bt = block_type(blocks[mod])
            n, k = fam.linear_shape(mod)
            qtype, shape, dtype = bt.qtype, (n, bt.row_bytes(k)), np.uint8
            produce = partial(_block_bytes, fam, mod, bt)
        elif suffix == "weight" and layout.role(mod) not in ("norm", "other"):
            qtype = module_type(fam, mod, opt, types)
            shape, dtype = _data_shape(fam.linear_shape(mod), qtype, mod)
            produce = partial(_encoded, fam, mod, opt, types)
            if cache is not None:
                produce = partial(cache.get, fname, dtype, produce)
        else:  # norms, biases
            qtype, (shape, dtype) = T.F32, (fam.tensor_info(fname)[0], np.float32)
            produce = partial(_as_f32, fam, fname)
        kind = gname.rsplit(".", 2)[-2]
        if llama and kind in heads:
            produce = partial(_rope_rows, produce, heads[kind])
        out.append((gname, LazyArray(shape, dtype, produce), qtype))
    return out


def module_type(fam: QuantizedFamily, module: str, opt: GGUFOptions, types: dict[str, T]) -> T:
    """The ggml type encode_module gives a module's weight; its refusals raised now."""
    if module in fam.grids:
        grid, want = fam.grids[module], TYPES.get(opt.type)
        if want in FLOAT_TYPES.values():
            return want
        check_grid(module, grid.spec, want, lambda: block_groups(grid.g_idx, grid.shape[1]))
        return grid_type(grid.spec.bits, grid.spec.sym)
    return types.get(layout.role(module), types["linear"])


def _data_shape(shape: tuple, qtype: T, what: str):
    """(shape, numpy dtype) of a [N, K] weight's data as `qtype` (bytes per row when quantized)."""
    if qtype == T.F32:
        return tuple(shape), np.float32
    if qtype == T.F16:
        return tuple(shape), np.float16
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1) and shape[-1] % 32:
        raise UserError(
            f"{what}: {shape[-1]} columns is not a multiple of 32, which {qtype.name} needs; choose type f16"
        )
    return tuple(gguf.quants.quant_shape_to_byte_shape(tuple(shape), qtype)), np.uint8


def _block_bytes(fam, module: str, bt) -> np.ndarray:
    """A module's bytes in block type bt: its block grid's, or ggml's own rounding of its float
    weight from F16 (what llama.cpp writes from an F16 file for a tensor it has no importance
    matrix for, as the embedding)."""
    grid = fam.grids.get(module)
    if grid is not None and bt.name in grid.spec.ggml:
        return grid.get().data[bt.name].numpy()
    w = fam.weight(module) if grid is not None else fam.tensors[fam.stored_name(f"{module}.weight")]
    return quantize_rows(bt.qtype, w.detach().half().float().numpy(), None)


def _encoded(fam, module, opt, types) -> np.ndarray:
    return encode_module(fam, module, opt, types)[0]


def _as_f32(fam, name: str) -> np.ndarray:
    return fam.tensors[name].detach().float().numpy()


def _rope_rows(produce, n_head: int) -> np.ndarray:
    return llama_rope_rows(produce(), n_head)

"""Integer grids and the GPTQ ("gptq", v1) tensor layout. Pure functions, shapes in comments.

A quantized linear of weight W [N, K] (out, in) with bits b and group size g is
    q      [K, N] ints in [0, 2^b)         W[n, k] ~= scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])
    scales [G, N] fp16, zeros [G, N] ints, g_idx [K] ints, G = ceil(K / g)
and is stored as GPTQ does:
    qweight int32 [ceil(K*b/32), N]  q packed along K, little-endian bit stream
    qzeros  int32 [G, ceil(N*b/32)]  (zeros - 1) packed along N (the v1 convention)
    scales  fp16  [G, N]
    g_idx   int32 [K]
For b in 2, 4, 8 the bit stream puts value j of a word at bit b*j, as AutoGPTQ does; for b = 3
AutoGPTQ's word-straddling layout is the same little-endian stream of 32 values per 3 words.
"""

from __future__ import annotations

import torch

from .kquant import TYPES

BITS = (2, 3, 4, 8)


COLUMNS_AT_ONCE = 1 << 22  # elements per column block (the int64 temporaries are 8 bytes each)


def _by_columns(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """fn applied to blocks of x's columns (fn works column by column): the same result, with
    temporaries the size of a block instead of x's."""
    step = max(1, COLUMNS_AT_ONCE // max(1, x.shape[0]))
    if x.shape[1] <= step:
        return fn(x, *args)
    return torch.cat([fn(x[:, c : c + step], *args) for c in range(0, x.shape[1], step)], dim=1)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] ints in [0, 2^bits) -> int32 [ceil(K*bits/32), N], packed along K."""
    return _by_columns(_pack_rows, q, bits)


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    k, n = q.shape
    words = -(-k * bits // 32)
    q = q.to(torch.int64)
    offset = torch.arange(k, dtype=torch.int64) * bits  # [K] bit position
    word, shift = offset // 32, (offset % 32).unsqueeze(1)
    acc = torch.zeros(words + 1, n, dtype=torch.int64)
    acc.index_add_(0, word, (q << shift) & 0xFFFFFFFF)
    acc.index_add_(0, word + 1, q >> (32 - shift))  # straddling bits (b=3)
    acc = acc[:words]
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [ceil(K*bits/32), N] -> int32 [K, N]; inverse of pack_rows."""
    return _by_columns(_unpack_rows, packed, bits, k)


def _unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:1])])  # room for straddles
    offset = torch.arange(k, dtype=torch.int64) * bits
    word, shift = offset // 32, (offset % 32).unsqueeze(1)
    both = (words[word] >> shift) | (words[word + 1] << (32 - shift))
    return (both & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] -> int32 [G, ceil(N*bits/32)], packed along N."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, n).t().contiguous()


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, block: int = 1024
) -> torch.Tensor:
    """q [K, N], scales [G, N], zeros [G, N], g_idx [K] -> float32 weight [N, K]; `block` input
    columns at a time (temporaries of [block, N], not [K, N]: a head's are 0.6 GB, not 2.2 GB)."""
    g = g_idx.long()
    k, n = q.shape
    out = torch.empty(n, k, dtype=torch.float32, device=q.device)
    for k0 in range(0, k, block):
        gb = g[k0 : k0 + block]
        out[:, k0 : k0 + block] = (scales[gb].float() * (q[k0 : k0 + block].float() - zeros[gb].float())).t()
    return out


def to_gptq(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """Grid -> GPTQ v1 tensors (qweight, qzeros, scales, g_idx). Zeros must be >= 1 (v1)."""
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero-1: integer zeros must be >= 1")
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(zeros.to(torch.int64) - 1, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def from_gptq(t: dict[str, torch.Tensor], bits: int, k: int, n: int):
    """GPTQ v1 tensors -> (q [K, N], scales [G, N] fp16, zeros [G, N], g_idx [K])."""
    q = unpack_rows(t["qweight"], bits, k)
    zeros = unpack_cols(t["qzeros"], bits, n) + 1
    return q, t["scales"], zeros, t["g_idx"]


# --- AWQ "gemm" layout ----------------------------------------------------------------------
# qweight int32 [K, N/8]: output channels packed 8 per word, value of channel 8c + AWQ_ORDER[i]
# at bits 4i; qzeros int32 [G, N/8] the same way (zeros stored as they are); scales fp16 [G, N].
# Groups are contiguous runs of group_size input columns (no g_idx, no act-order). 4 bits only.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(8))


def _by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """fn applied to blocks of x's rows (fn works row by row), temporaries the size of a block."""
    step = max(1, COLUMNS_AT_ONCE // max(1, x.shape[1]))
    if x.shape[0] <= step:
        return fn(x)
    return torch.cat([fn(x[r : r + step]) for r in range(0, x.shape[0], step)])


def awq_pack(v: torch.Tensor) -> torch.Tensor:
    """[R, N] ints in [0, 16), N % 8 == 0 -> int32 [R, N/8] in AWQ's interleaved order."""
    return _by_rows(_awq_pack, v)


def _awq_pack(v: torch.Tensor) -> torch.Tensor:
    r, n = v.shape
    v = v.to(torch.int64).reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (v << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int32 [R, N]; inverse of awq_pack."""
    return _by_rows(_awq_unpack, words)


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    v = (w.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 15  # [R, N/8, 8]
    return v[:, :, list(AWQ_INVERSE)].reshape(words.shape[0], -1).to(torch.int32)


def to_awq(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    if bits != 4 or q.shape[1] % 8:
        raise ValueError("AWQ's gemm layout holds 4-bit weights with out_features % 8 == 0")
    k, groups = q.shape[0], scales.shape[0]
    if k % groups or not torch.equal(g_idx.long(), torch.arange(k) // (k // groups)):
        raise ValueError(
            "AWQ's gemm layout needs in_features divisible by the group size and "
            "no act-order (permuted) groups"
        )
    return {
        "qweight": awq_pack(q),
        "qzeros": awq_pack(zeros),
        "scales": scales.to(torch.float16).contiguous(),
    }


def from_awq(t: dict[str, torch.Tensor], group_size: int):
    """AWQ gemm tensors -> (q [K, N], scales [G, N] fp16, zeros [G, N], g_idx [K])."""
    q = awq_unpack(t["qweight"])
    k = q.shape[0]
    gs = k if group_size == -1 else group_size  # (QuantSpec.width; pack.py knows no spec)
    return q, t["scales"], awq_unpack(t["qzeros"]), (torch.arange(k) // gs).to(torch.int32)


def awq_fits(k: int, n: int, bits: int, group_size: int) -> bool:
    """Whether a [N, K] linear's grid fits AWQ's gemm layout (else it goes in GPTQ's)."""
    return bits == 4 and n % 8 == 0 and (group_size == -1 or k % group_size == 0)


LAYOUTS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "ggml": ("ggml",),  # llama.cpp's bytes of each of the grid's block types, row by row
}


def packed_shapes(layout: str, n: int, k: int, groups: int, bits: int, types=()) -> dict[str, tuple]:
    """name -> (shape, dtype) of a [N, K] linear's packed tensors, without packing anything
    (`types`: the block types of a ggml-layout grid)."""
    if layout == "ggml":
        return {"ggml": ((n, sum(TYPES[t].row_bytes(k) for t in types)), torch.uint8)}
    if layout == "awq":
        return {
            "qweight": ((k, n // 8), torch.int32),
            "qzeros": ((groups, n // 8), torch.int32),
            "scales": ((groups, n), torch.float16),
        }
    return {
        "qweight": ((-(-k * bits // 32), n), torch.int32),
        "qzeros": ((groups, -(-n * bits // 32)), torch.int32),
        "scales": ((groups, n), torch.float16),
        "g_idx": ((k,), torch.int32),
    }

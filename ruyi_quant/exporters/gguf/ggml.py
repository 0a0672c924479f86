"""ggml block encodings of our grids: pure functions, numpy in, bytes-shaped numpy out.

A grid (q [K, N] codes, scales/zeros [G, N], g_idx [K]) whose groups cover whole 32-column
blocks goes into ggml's block types without any rounding:
    Q4_0  per block: fp16 d, 16 bytes of nibbles;  w = d * (c - 8)      symmetric, <= 4 bits
    Q4_1  per block: fp16 d, fp16 m, 16 bytes;     w = d * c + m        asymmetric, <= 4 bits
    Q8_0  per block: fp16 d, 32 int8;              w = d * c            symmetric 8 bits
Nibble order inside a block: byte i holds code i (low nibble) and code i+16 (high nibble).
Our dequantization is scale * (q - zero) in fp32, ggml's d * (c - 8) or d * c + m: the same
numbers when d = scale and m = -scale*zero is an fp16 number, which the asymmetric quantizer
guarantees (quant/rtn.py: exact_min_scale).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

BLOCK = 32


class NotExact(ValueError):
    """The grid cannot be written in the requested ggml type without rounding."""


def grid_type(bits: int, sym: bool) -> T | None:
    """The ggml type that holds a grid exactly, or None."""
    if bits <= 4:
        return T.Q4_0 if sym else T.Q4_1
    if bits == 8 and sym:
        return T.Q8_0
    return None


def block_groups(g_idx: torch.Tensor, k: int) -> torch.Tensor:
    """The group of each 32-column block [K/32]; NotExact when a block spans two groups."""
    if k % BLOCK:
        raise NotExact(f"{k} input columns is not a multiple of {BLOCK}")
    blocks = g_idx.long().reshape(-1, BLOCK)
    if bool((blocks != blocks[:, :1]).any()):
        raise NotExact("its groups do not cover whole 32-column blocks (group size 16, or act-order)")
    return blocks[:, 0]


def block_params(scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, k: int):
    """Per-block (scale [N, K/32], zero [N, K/32])."""
    g = block_groups(g_idx, k)
    return scales[g].t().contiguous(), zeros[g].t().contiguous()


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """codes [N, B, 32] in 0..15 -> [N, B, 16] bytes."""
    c = codes.astype(np.uint8)
    return c[..., :16] | (c[..., 16:] << 4)


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """[N, B] -> [N, B, 2] little-endian fp16 bytes."""
    return x.half().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def encode_grid(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int, sym: bool
) -> tuple[np.ndarray, T]:
    """A grid -> (uint8 [N, bytes per row], ggml type), exactly; NotExact otherwise."""
    qtype = grid_type(bits, sym)
    if qtype is None:
        raise NotExact(
            f"no ggml type holds a {bits}-bit {'symmetric' if sym else 'asymmetric'} "
            "grid exactly (4-bit and lower: Q4_0/Q4_1; 8-bit symmetric: Q8_0)"
        )
    k, n = q.shape
    d, z = block_params(scales, zeros, g_idx, k)  # [N, B]
    codes = q.t().reshape(n, k // BLOCK, BLOCK)  # [N, B, 32]
    if qtype == T.Q4_0:
        c = codes - z.unsqueeze(-1) + 8  # zero 2^(b-1) -> 8
        parts = [_fp16_bytes(d), _nibbles(c.numpy())]
    elif qtype == T.Q4_1:
        m = -(d.double() * z.double())
        if bool((m.half().double() != m).any()):
            raise NotExact(
                "its mins -scale*zero are not fp16 numbers (quantized by an older ruyi-quant); quantize again"
            )
        parts = [_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes.numpy())]
    else:
        c = (codes - z.unsqueeze(-1)).numpy().astype(np.int8)
        parts = [_fp16_bytes(d), c.view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(n, -1), qtype

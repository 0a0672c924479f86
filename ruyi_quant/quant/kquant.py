"""llama.cpp's block types as grids: pure functions between a row's ggml bytes and its integer
codes and block parameters, and the exact float arithmetic ggml decodes them with.

Every type is, per sub-block of `sub` weights sharing one scale s and offset o,

    w = s * (c - zero) + o          c in 0..qmax (unsigned codes)

with s and o computed from the stored parameters in float32 exactly as ggml's dequantizers do:
    Q4_K, Q5_K  super-block of 256 = 8 sub-blocks of 32: fp16 d, dmin; 6-bit sc, m per sub-block;
                s = d*sc, o = -(dmin*m); codes 4 (Q4_K) or 5 (Q5_K) bits
    Q6_K        super-block of 256 = 16 sub-blocks of 16: fp16 d, int8 sc; s = d*sc, zero 32
    Q4_0, Q5_0  blocks of 32: fp16 d; s = d, zero 8 or 16
    Q4_1, Q5_1  blocks of 32: fp16 d, m; s = d, o = m
    Q8_0        blocks of 32: fp16 d, int8 codes (stored here as c = code + 128, zero 128)
Parameters are a dict of numpy arrays per row: d [N, blocks] fp16, dmin [N, blocks] fp16,
sc [N, subs] (uint8 6-bit for Q4_K/Q5_K, int8 for Q6_K), m [N, subs] uint8 (K) or [N, blocks]
fp16 (Q4_1/Q5_1). `decode` and `encode` are inverses, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class BlockType:
    name: str
    qtype: T
    block: int  # weights per block (its parameters and codes are `nbytes` bytes)
    sub: int  # weights sharing one scale and offset
    bits: int
    zero: int
    nbytes: int
    offset: bool  # whether o is stored (asymmetric)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def subs(self, k: int) -> int:
        return k // self.sub

    def fits(self, k: int) -> bool:
        return k % self.block == 0

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.nbytes


TYPES = {
    t.name: t
    for t in (
        BlockType("q4_k", T.Q4_K, 256, 32, 4, 0, 144, True),
        BlockType("q5_k", T.Q5_K, 256, 32, 5, 0, 176, True),
        BlockType("q6_k", T.Q6_K, 256, 16, 6, 32, 210, False),
        BlockType("q4_0", T.Q4_0, 32, 32, 4, 8, 18, False),
        BlockType("q4_1", T.Q4_1, 32, 32, 4, 0, 20, True),
        BlockType("q5_0", T.Q5_0, 32, 32, 5, 16, 22, False),
        BlockType("q5_1", T.Q5_1, 32, 32, 5, 0, 24, True),
        BlockType("q8_0", T.Q8_0, 32, 32, 8, 128, 34, False),
    )
}


def block_type(name: str) -> BlockType:
    try:
        return TYPES[name]
    except KeyError:
        raise ValueError(f"block type {name!r}: one of {', '.join(TYPES)}") from None


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] fp16."""
    return np.ascontiguousarray(b).view("<f2")[..., 0]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _k_scales_decode(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [..., 12] -> (sc, m) [..., 8] 6-bit (ggml's get_scale_min_k4)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], -1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def _k_scales_encode(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(sc, m) [..., 8] 6-bit -> 12 packed bytes [..., 12]."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], -1).astype(np.uint8)


def _nib_k(codes: np.ndarray) -> np.ndarray:
    """Codes [..., 256] -> 128 bytes: chunk c of 64, byte l = code 64c+l | code 64c+32+l << 4."""
    c = codes.reshape(*codes.shape[:-1], 4, 2, 32) & 0xF
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], 128)


def _unnib_k(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([q & 0xF, q >> 4], -2).reshape(*qs.shape[:-1], 256)


def _nib_32(codes: np.ndarray) -> np.ndarray:
    """Codes [..., 32] -> 16 bytes: byte j = code j | code j+16 << 4."""
    c = codes & 0xF
    return c[..., :16] | (c[..., 16:] << 4)


def _unnib_32(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], -1)


def _bits_32(codes: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes -> 4 bytes (a little-endian uint32, bit j = code j)."""
    hb = ((codes >> 4) & 1).astype(np.uint32)
    word = (hb << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return np.ascontiguousarray(word.astype("<u4")).view(np.uint8).reshape(*codes.shape[:-1], 4)


def _unbits_32(qh: np.ndarray) -> np.ndarray:
    word = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return (((word[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def decode(data: np.ndarray, t: BlockType | str, k: int) -> tuple[np.ndarray, dict]:
    """ggml bytes [N, row bytes] of rows of k weights -> (codes uint8 [N, k], parameters)."""
    t = block_type(t) if isinstance(t, str) else t
    n = data.shape[0]
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // t.block, t.nbytes)
    p: dict = {}
    if t.name in ("q4_k", "q5_k"):
        p["d"], p["dmin"] = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, m = _k_scales_decode(b[..., 4:16])
        p["sc"], p["m"] = sc.reshape(n, -1), m.reshape(n, -1)
        if t.name == "q4_k":
            codes = _unnib_k(b[..., 16:144])
        else:
            qh, low = b[..., 16:48], _unnib_k(b[..., 48:176])
            shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)  # bit 2c + half
            high = ((qh[..., None, None, :] >> shifts) & 1).reshape(n, -1, 256)
            codes = low | (high << 4)
    elif t.name == "q6_k":
        ql, qh = b[..., 0:128].reshape(n, -1, 2, 2, 32), b[..., 128:192].reshape(n, -1, 2, 32)
        p["sc"] = b[..., 192:208].copy().view(np.int8).reshape(n, -1)
        p["d"] = _f16(b[..., 208:210])
        low = np.stack([ql & 0xF, ql >> 4], 3)  # [n, B, half, nib, which, 32]: t = 2*nib + which
        low = low.reshape(n, -1, 2, 4, 32)
        high = np.stack([(qh >> (2 * t)) & 3 for t in range(4)], 3)  # [n, B, half, t, 32]
        codes = (low | (high << 4)).reshape(n, -1, 256)
    else:
        p["d"] = _f16(b[..., 0:2])
        at = 2
        if t.offset:
            p["m"], at = _f16(b[..., 2:4]), 4
        if t.name == "q8_0":
            codes = (b[..., at:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        elif t.bits == 5:
            codes = _unnib_32(b[..., at + 4 :]) | _unbits_32(b[..., at : at + 4])
        else:
            codes = _unnib_32(b[..., at:])
    return np.ascontiguousarray(codes.reshape(n, k), dtype=np.uint8), p


def encode(codes: np.ndarray, p: dict, t: BlockType | str) -> np.ndarray:
    """(codes [N, k] in 0..qmax, parameters) -> ggml bytes [N, row bytes]."""
    t = block_type(t) if isinstance(t, str) else t
    n, k = codes.shape
    nb = k // t.block
    c = np.asarray(codes, dtype=np.uint8).reshape(n, nb, t.block)
    if t.name in ("q4_k", "q5_k"):
        sc, m = p["sc"].reshape(n, nb, 8), p["m"].reshape(n, nb, 8)
        parts = [_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), _k_scales_encode(sc, m)]
        if t.name == "q5_k":
            high = ((c >> 4) & 1).reshape(n, nb, 4, 2, 32)
            shifts = np.arange(8, dtype=np.uint8).reshape(4, 2, 1)
            parts.append((high << shifts).sum((2, 3), dtype=np.uint8))
        parts.append(_nib_k(c))
    elif t.name == "q6_k":
        cc = c.reshape(n, nb, 2, 4, 32)  # [.., half, t, l]
        ql = (cc[..., 0:2, :] & 0xF) | ((cc[..., 2:4, :] & 0xF) << 4)  # byte (t&1) of nibble t>>1
        qh = sum(((cc[..., t, :] >> 4) & 3) << (2 * t) for t in range(4)).astype(np.uint8)
        sc = np.asarray(p["sc"], dtype=np.int8).reshape(n, nb, 16).view(np.uint8)
        parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sc, _f16_bytes(p["d"])]
    else:
        parts = [_f16_bytes(p["d"])]
        if t.offset:
            parts.append(_f16_bytes(p["m"]))
        if t.name == "q8_0":
            parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        elif t.bits == 5:
            parts += [_bits_32(c), _nib_32(c)]
        else:
            parts.append(_nib_32(c))
    return np.concatenate([x.astype(np.uint8) for x in parts], -1).reshape(n, nb * t.nbytes)


def affine(p: dict, t: BlockType | str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per sub-block (s, o) float32 [N, subs] as ggml computes them (o None: no offset)."""
    t = block_type(t) if isinstance(t, str) else t
    d = p["d"].astype(np.float32)
    if t.name in ("q4_k", "q5_k"):
        per = t.block // t.sub
        s = np.repeat(d, per, -1) * p["sc"].astype(np.float32)
        o = -(np.repeat(p["dmin"].astype(np.float32), per, -1) * p["m"].astype(np.float32))
        return s, o
    if t.name == "q6_k":
        return np.repeat(d, t.block // t.sub, -1) * p["sc"].astype(np.float32), None
    return d, (p["m"].astype(np.float32) if t.offset else None)


def dequantize(codes: np.ndarray, p: dict, t: BlockType | str) -> np.ndarray:
    """float32 [N, k]: s * (c - zero) + o per weight, in ggml's arithmetic."""
    t = block_type(t) if isinstance(t, str) else t
    s, o = affine(p, t)
    n, k = codes.shape
    c = (codes.astype(np.int32) - t.zero).astype(np.float32).reshape(n, -1, t.sub)
    w = s[..., None] * c
    if o is not None:
        w = w + o[..., None]
    return w.reshape(n, k)


def subblock_params(p: dict, t: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, o) float32 [N, subs] (o zeros when the type stores none), for a quantizer that walks
    columns: column c reads sub-block c // t.sub."""
    s, o = affine(p, t)
    s = torch.from_numpy(np.ascontiguousarray(s))
    return s, (torch.zeros_like(s) if o is None else torch.from_numpy(np.ascontiguousarray(o)))


def columns(p: dict, t: BlockType, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, o) float32 [N, k] per weight."""
    s, o = subblock_params(p, t)
    return s.repeat_interleave(t.sub, -1), o.repeat_interleave(t.sub, -1)


def nearest(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, t: BlockType) -> torch.Tensor:
    """The code of each weight nearest to it on its fixed (s, o): uint8, same shape."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    c = torch.round((w - o) / safe) + t.zero
    c = torch.where(s == 0, torch.full_like(c, t.zero), c)
    return c.clamp_(0, t.qmax).to(torch.uint8)


def value(c: torch.Tensor, s: torch.Tensor, o: torch.Tensor, t: BlockType) -> torch.Tensor:
    """The weight codes c stand for (float32), as ggml computes it."""
    return s * (c.float() - t.zero) + o

"""A quantized linear in memory: integer codes, scales, zeros, g_idx and its spec.

    W[n, k] ~= scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])

Every quantizer makes one (`Grid.make`), every consumer reads one (the GGUF encoder, the HF
exporter, the dequantized model; later ONNX's MatMulNBits and the int4 runtime). Checkpoint
layouts (GPTQ v1, AWQ gemm: pack.py) are produced only where a file is written (`pack`) and read
back only where one is loaded (`unpack`). Codes and zeros are kept as uint8 (bits <= 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import kquant
from .pack import LAYOUTS, awq_fits, dequantize, from_awq, from_gptq, packed_shapes, to_awq, to_gptq
from .plan import QuantSpec


@dataclass(frozen=True)
class Grid:
    q: torch.Tensor  # [K, N] uint8 codes in [0, 2^bits)
    scales: torch.Tensor  # [G, N] fp16
    zeros: torch.Tensor  # [G, N] uint8
    g_idx: torch.Tensor  # [K] int32, the group of each input column
    spec: QuantSpec

    @classmethod
    def make(cls, q, scales, zeros, g_idx, spec: QuantSpec) -> Grid:
        """From a quantizer's (q [K, N], scales [G, N], zeros [G, N], g_idx [K])."""
        return cls(
            q.cpu().to(torch.uint8).contiguous(),
            scales.cpu().to(torch.float16).contiguous(),
            zeros.cpu().to(torch.uint8).contiguous(),
            g_idx.cpu().to(torch.int32).contiguous(),
            spec,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) as the float weight's."""
        return self.q.shape[1], self.q.shape[0]

    def get(self) -> Grid:
        """Itself (a LazyGrid's get() unpacks it once: callers that read several fields call this)."""
        return self

    @property
    def act_order(self) -> bool:
        """Groups that do not ascend with the column index (GPTQ's desc_act without static groups)."""
        return bool((self.g_idx.diff() < 0).any())

    @property
    def fits_awq(self) -> bool:
        """Whether AWQ's gemm layout holds this grid (4 bits, N % 8, whole groups, in order)."""
        n, k = self.shape
        return awq_fits(k, n, self.spec.bits, self.spec.group_size) and not self.act_order

    def ints(self):
        """(q int32 [K, N], scales fp16 [G, N], zeros int32 [G, N], g_idx int32 [K])."""
        return self.q.to(torch.int32), self.scales, self.zeros.to(torch.int32), self.g_idx

    def dequantize(self) -> torch.Tensor:
        """float32 weight [N, K]."""
        return dequantize(self.q, self.scales, self.zeros, self.g_idx)

    def pack(self, layout: str) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint layout (gptq v1 or awq gemm); ValueError if it does not fit."""
        q, scales, zeros, g_idx = self.ints()
        return (to_awq if layout == "awq" else to_gptq)(q, scales, zeros, g_idx, self.spec.bits)

    def nbytes(self, layout: str) -> int:
        """Bytes of the packed tensors, without packing."""
        return packed_nbytes(layout, *self.shape, self.scales.shape[0], self.spec.bits)

    @classmethod
    def unpack(cls, layout: str, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> Grid:
        """From the tensors of a checkpoint layout (names without the module prefix)."""
        t = {s: tensors[s] for s in LAYOUTS[layout]}
        if layout == "ggml":
            return BlockGrid.unpack(t, spec)
        if layout == "awq":
            return cls.make(*from_awq(t, spec.group_size), spec)
        n, k = t["scales"].shape[1], t["g_idx"].numel()
        return cls.make(*from_gptq(t, spec.bits, k, n), spec)


class NotGPTQ(ValueError):
    """A grid in llama.cpp's block types asked for GPTQ's codes, scales and zeros."""


@dataclass(frozen=True)
class BlockGrid:
    """A linear in llama.cpp's block types (kquant.py): ggml's bytes [N, row bytes] for each type
    of spec.ggml. A trunk layer can be in different types in two exits' files; the first (most
    bits) is the one the family computes with."""

    data: dict  # block type -> uint8 [N, row bytes]
    spec: QuantSpec
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.data.values())).shape[0], self.k

    def get(self) -> BlockGrid:
        return self

    act_order = False
    fits_awq = False

    def ints(self):
        raise NotGPTQ(
            f"its grid is llama.cpp's {'/'.join(self.spec.ggml)} blocks (super-blocks with 6-bit "
            "sub-block scales), which GPTQ's and AWQ's layouts cannot hold exactly"
        )

    def dequantize(self, block_type: str | None = None) -> torch.Tensor:
        """float32 weight [N, K] of one of its types (the first by default), as ggml decodes it."""
        t = block_type or self.spec.ggml[0]
        codes, params = kquant.decode(self.data[t].numpy(), t, self.k)
        return torch.from_numpy(kquant.dequantize(codes, params, t))

    def pack(self, layout: str) -> dict[str, torch.Tensor]:
        if layout != "ggml":
            self.ints()
        return {"ggml": torch.cat([self.data[t] for t in self.spec.ggml], 1)}

    def nbytes(self, layout: str) -> int:
        n, k = self.shape
        return packed_nbytes("ggml", n, k, 0, 0, self.spec.ggml)

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> BlockGrid:
        """From its stored bytes; ValueError when they are not blocks of its types (a row's
        width, or a non-finite block scale)."""
        blob = tensors["ggml"]
        per = sum(kquant.TYPES[t].nbytes / kquant.TYPES[t].block for t in spec.ggml)
        k = round(blob.shape[1] / per)
        data, at = {}, 0
        for t in spec.ggml:
            bt = kquant.TYPES[t]
            if k % bt.block or blob.dtype != torch.uint8:
                raise ValueError(f"{blob.shape[1]} bytes per row are not {'+'.join(spec.ggml)} blocks")
            data[t], at = blob[:, at : at + bt.row_bytes(k)].contiguous(), at + bt.row_bytes(k)
            params = kquant.decode(data[t].numpy(), bt, k)[1]
            if not all(np.isfinite(params[x]).all() for x in ("d", "dmin") if x in params):
                raise ValueError(f"its {t} block scales are not finite")
        if at != blob.shape[1]:
            raise ValueError(f"{blob.shape[1]} bytes per row are not {'+'.join(spec.ggml)} blocks")
        return cls(data, spec, k)


def packed_nbytes(layout: str, n: int, k: int, groups: int, bits: int, types=()) -> int:
    total = 0
    for shape, dtype in packed_shapes(layout, n, k, groups, bits, types).values():
        size = dtype.itemsize
        for d in shape:
            size *= d
        total += size
    return total


class LazyGrid:
    """A Grid known by its spec and shape, made only when its values are needed (`load()`: read
    from a checkpoint and unpacked, or computed, e.g. by RTN from a weight read then). Nothing is
    kept: each use loads again. `packed(layout)` may hand back stored tensors as they are."""

    def __init__(
        self, spec: QuantSpec, shape: tuple[int, int], load, packed=None, act_order=None, g_idx=None
    ):
        self.spec, self.shape = spec, tuple(shape)
        self._load, self._packed, self._act_order, self._g_idx = load, packed, act_order, g_idx

    def get(self) -> Grid:
        return self._load()

    def __getattr__(self, name: str):
        """q, scales, zeros of the loaded grid; g_idx without loading when groups are in order."""
        if name == "g_idx" and self.__dict__.get("_g_idx") is not None:
            return self._g_idx()
        if name == "g_idx" and self.__dict__.get("_act_order") is False:
            k = self.shape[1]
            return (torch.arange(k) // self.spec.width(k)).to(torch.int32)
        if name in ("q", "scales", "zeros", "g_idx"):
            return getattr(self.get(), name)
        raise AttributeError(name)

    @property
    def groups(self) -> int:
        return self.spec.groups(self.shape[1])

    @property
    def act_order(self) -> bool:
        if callable(self._act_order):
            return self._act_order()
        return self.get().act_order if self._act_order is None else self._act_order

    @property
    def fits_awq(self) -> bool:
        n, k = self.shape
        return awq_fits(k, n, self.spec.bits, self.spec.group_size) and not self.act_order

    def ints(self):
        return self.get().ints()

    def dequantize(self, *block_type) -> torch.Tensor:
        return self.get().dequantize(*block_type)

    def pack(self, layout: str) -> dict[str, torch.Tensor]:
        stored = self._packed(layout) if self._packed is not None else None
        return stored if stored is not None else self.get().pack(layout)

    def nbytes(self, layout: str) -> int:
        return packed_nbytes(layout, *self.shape, self.groups, self.spec.bits, self.spec.ggml)

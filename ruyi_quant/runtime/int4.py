"""Int4 linear layers on PyTorch's own tinygemm kernels: `_weight_int4pack_mm` on CUDA and its
CPU twin `_weight_int4pack_mm_for_cpu`, the packing wrapped once here (version-guarded).

tinygemm computes y = x @ W^T with, per group g of `kernel_group` input columns,

    W[n, k] = (c[n, k] - 8) * s[g, n] + z[g, n]          (scales_and_zeros [G, N, 2])

and our Grid holds W[n, k] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n]). So c = q,
s = scales, z = scales * (8 - zeros): in float32 both products are exact (an fp16 scale times an
integer below 16), and so is W. Three layouts need care, each handled once, at load time:
- act-order grids (g_idx not ascending): the input columns are permuted so that every group is
  contiguous (x[..., perm] at run time);
- group sizes the kernels lack (one group per channel, 512, 1024): each group is split into
  kernel groups of 128 carrying the same scale and zero (exact);
- K not a multiple of the kernel group (ruyi-mini's 576 at 128; the kernels need K % group == 0,
  FACTS): K is padded with code 8 and zero scale, and x with zeros; N is padded to the kernel's
  multiple (16 on the CPU) with zero rows, cut off the output.
Room for a faster CUDA kernel (Marlin) is the `Kernel` entry point: same grid in, same call out.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

KERNEL_GROUPS = (32, 64, 128, 256)
SPLIT_GROUP = 128  # kernel group for grids whose own group it lacks
CUDA_INNER_K_TILES = 8  # tinygemm's tiling on CUDA: K % (8 * 16) == 0
PACK_ROWS = 4096  # rows packed at a time (rounded up to the kernel's row block)
ROW_BLOCKS = (8, 16, 32, 64, 128, 256)  # the row blocks a packing may interleave, probed in this order


@dataclass(frozen=True)
class Kernel:
    """One device's pack and matmul."""

    name: str
    k_multiple: int  # K must be a multiple of this (beyond the group)
    n_multiple: int  # and N of this

    def row_block(self, device=None) -> int:
        """The rows the packed layout interleaves as one block, probed from the op itself: it
        differs by instruction set (the CPU op interleaves 32 rows with AVX2, 64 with AVX-512)."""
        return _row_block(self, str(torch.device(device or self.name)))

    def pack(self, codes: torch.Tensor, device=None, rows: int = PACK_ROWS) -> torch.Tensor:
        """codes int32 [N, K] in [0, 16) (on the CPU) -> the kernel's packed weight on `device`,
        `rows` rows at a time (rounded up to a multiple of the row block: both layouts split by
        blocks of rows, in order), so no int32 copy of a whole weight reaches the device (a Ruyi
        head's would be 2.2 GB)."""
        device = torch.device(device or self.name)
        block = self.row_block(device)
        rows = -(-rows // block) * block
        out = None
        for r in range(0, codes.shape[0], rows):
            part = self._pack(codes[r : r + rows].to(device))
            if out is None:
                per_row = part.shape[0] / min(rows, codes.shape[0])
                out = torch.empty(
                    (round(codes.shape[0] * per_row), *part.shape[1:]), dtype=part.dtype, device=device
                )
            out[round(r * per_row) : round(r * per_row) + part.shape[0]] = part
        return out

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.name == "cpu":
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if _torch_version() < (2, 5):  # the op took int32 [N, K] before 2.5, uint8 since
            return torch.ops.aten._convert_weight_to_int4pack(codes, CUDA_INNER_K_TILES)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(packed, CUDA_INNER_K_TILES)

    def mm(self, x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
        if self.name == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


@functools.cache
def _row_block(kernel: Kernel, device: str) -> int:
    """The smallest block of rows that packs the same in pieces as at once (sys.maxsize, i.e. whole
    weights at once, when none of ROW_BLOCKS does)."""
    n, k = ROW_BLOCKS[-1], math.lcm(64, kernel.k_multiple)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = kernel._pack(codes.to(device))
    for block in (b for b in ROW_BLOCKS if b % kernel.n_multiple == 0):
        pieces = [kernel._pack(codes[r : r + block].to(device)) for r in range(0, n, block)]
        if torch.equal(torch.cat(pieces), whole):
            return block
    return sys.maxsize


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def kernel_for(device: torch.device) -> Kernel:
    device = torch.device(device)
    if device.type == "cuda":
        return Kernel("cuda", CUDA_INNER_K_TILES * 16, 8)
    if device.type == "cpu":
        return Kernel("cpu", 1, 16)
    raise UserError(f"device {device}: the int4 runtime runs on cpu or cuda")


def kernel_layout(grid, kernel: Kernel) -> tuple[torch.Tensor | None, int]:
    """(input permutation or None, kernel group) of a grid. The kernel group is the grid's own
    group or a divisor of it (each grid group split into kernel groups with its scale and zero:
    exact), preferring one that divides K, so that x needs no padding on every call (ruyi-mini's
    K = 576 at group 128 runs as groups of 64 on the CPU)."""
    n, k = grid.shape
    width = grid.spec.width(k)
    if grid.spec.bits != 4:
        raise UserError(f"bits {grid.spec.bits}: the int4 runtime holds 4-bit grids; quantize with bits 4")
    perm = torch.argsort(grid.g_idx, stable=True) if grid.act_order else None
    fits = [g for g in KERNEL_GROUPS[::-1] if width % g == 0 or grid.spec.group_size == -1]
    for g in fits:
        if k % math.lcm(g, kernel.k_multiple) == 0:
            return perm, g
    if width in KERNEL_GROUPS:
        return perm, width
    if width % SPLIT_GROUP == 0 or grid.spec.group_size == -1:
        return perm, SPLIT_GROUP
    raise UserError(
        f"group_size {grid.spec.group_size}: the int4 kernels take groups of "
        f"{', '.join(map(str, KERNEL_GROUPS))} columns; quantize with one of those"
    )


def tinygemm_tensors(grid, kernel: Kernel, dtype: torch.dtype):
    """(codes int32 [Np, Kp], scales_and_zeros [Kp / group, Np, 2] in dtype, permutation or None,
    kernel group, Kp) of a 4-bit grid, as the module docstring says; rows past N (the kernels
    want N a multiple of 16 on the CPU, 8 on CUDA) are zero weights."""
    q, scales, zeros, g_idx = grid.ints()  # [K, N], [G, N], [G, N], [K]
    k, n = q.shape
    width = grid.spec.width(k)
    perm, group = kernel_layout(grid, kernel)
    if perm is not None:
        q, g_idx = q[perm], g_idx[perm]
    if not torch.equal(g_idx.long(), torch.arange(k) // width):
        raise UserError(
            "the int4 runtime needs each group's columns together after sorting by "
            "group (GPTQ's act-order gives that); this grid's groups differ in size"
        )
    step = group * kernel.k_multiple // math.gcd(group, kernel.k_multiple)
    kp = -(-k // step) * step
    starts = torch.arange(0, kp, group)  # first column of each kernel group
    real = starts < k  # groups past K only meet x = 0
    of = (starts // width).clamp(max=scales.shape[0] - 1)  # the grid group each one is part of
    s = scales.float()[of] * real.unsqueeze(1)
    z = (scales.float() * (8 - zeros.float()))[of] * real.unsqueeze(1)
    np_ = -(-n // kernel.n_multiple) * kernel.n_multiple
    codes = torch.full((np_, kp), 8, dtype=torch.int32)
    codes[:n, :k] = q.t()
    sz = torch.zeros(kp // group, np_, 2)
    sz[:, :n] = torch.stack([s, z], -1)
    return codes, sz.to(dtype), perm, group, kp


class Int4Linear(nn.Module):
    """A quantized linear for inference: tinygemm-packed codes, scales and zeros, optional input
    permutation (act-order) and bias."""

    def __init__(self, grid, bias: torch.Tensor | None = None, device="cpu", dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = grid.shape
        self.kernel = kernel_for(device)
        codes, sz, perm, self.group, self.padded_k = tinygemm_tensors(grid, self.kernel, dtype)
        self.register_buffer("packed", self.kernel.pack(codes, device))
        self.register_buffer("scales_and_zeros", sz.to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if self.perm is not None:
            x = x[:, self.perm]
        if self.padded_k != self.in_features:
            x = nn.functional.pad(x, (0, self.padded_k - self.in_features))
        y = self.kernel.mm(x.contiguous(), self.packed, self.group, self.scales_and_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

"""Our grids as onnxruntime's `com.microsoft.MatMulNBits` initializers, exactly, and the 8-bit
forms of a float head or embedding. Pure maths on tensors; the graph is built in graph.py.

MatMulNBits computes Y = A @ W^T with, for output n and input k in block b = g_idx[k] (k // block
when there is no g_idx):  W[n, k] = scales[n, b] * (code(n, k) - zero(n, b)).
That is our Grid's W[n, k] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n]), so codes,
scales and zeros are copied, never re-rounded:

    B            uint8 [N, blocks, block * bits / 8]; 4-bit codes two per byte, low nibble first;
                 K padded with code 0 up to blocks * block (MatMulNBits reads only K of them)
    scales       [N * blocks] in the graph's float type (our fp16 scales: exact in fp32 and fp16)
    zero_points  uint8 [N * ceil(blocks * bits / 8)] packed like B, or, with g_idx, floats [N * blocks]
                 (onnxruntime 1.32's CPU kernel ignores packed zero points when g_idx is given:
                 measured, see exporters/onnx.md)
    g_idx        int32 [K], only for act-order grids

block_size is our group size (a power of two >= 16, as MatMulNBits requires); one group per
channel (group_size -1) is one block of the next power of two >= K. A last group shorter than the
block (K = 576 at group 128) is the op's own partial last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UserError
from ...quant.plan import QuantSpec
from ...quant.rtn import rtn_quantize

NBITS = (4, 8)
HEAD_INT8 = QuantSpec(bits=8, group_size=32, sym=True)  # a float head written 8-bit


@dataclass(frozen=True)
class NBitsLayout:
    """Attributes of one MatMulNBits node."""

    k: int
    n: int
    bits: int
    block: int
    blocks: int
    act_order: bool
    sym: bool


def block_size(spec: QuantSpec, k: int) -> int:
    """MatMulNBits' block_size for a grid of this spec over k input columns."""
    if spec.group_size != -1:
        return spec.group_size
    return max(16, 1 << (k - 1).bit_length())


def check_grid(module: str, spec: QuantSpec) -> None:
    """A UserError naming the setting to change when MatMulNBits cannot hold this grid."""
    if spec.bits not in NBITS:
        raise UserError(
            f"bits {spec.bits} ({module}): ONNX's MatMulNBits holds 4- and 8-bit grids "
            "here; quantize with bits 4 or 8, or export --weights float"
        )


def layout_of(grid) -> NBitsLayout:
    n, k = grid.shape
    block = block_size(grid.spec, k)
    return NBitsLayout(
        k=k,
        n=n,
        bits=grid.spec.bits,
        block=block,
        blocks=-(-k // block),
        act_order=grid.act_order,
        sym=grid.spec.sym,
    )


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits along the last axis -> bytes, low bits first (4-bit: two per byte)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def nbits_arrays(grid, lay: NBitsLayout, dtype: np.dtype) -> dict[str, np.ndarray]:
    """B, scales, zero_points (and g_idx) of a grid, as the layout says (module docstring)."""
    q = grid.q.numpy()  # [K, N]
    padded = np.zeros((lay.n, lay.blocks * lay.block), np.uint8)
    padded[:, : lay.k] = q.T
    out = {
        "B": _pack(padded, lay.bits).reshape(lay.n, lay.blocks, lay.block * lay.bits // 8),
        "scales": grid.scales.numpy().T.astype(dtype).reshape(-1),
    }
    zeros = grid.zeros.numpy().T  # [N, blocks]
    if lay.act_order:
        out["zero_points"] = zeros.astype(dtype).reshape(-1)
        out["g_idx"] = grid.g_idx.numpy().astype(np.int32)
    elif not (lay.sym and (zeros == 1 << (lay.bits - 1)).all()):  # 2^(bits-1) is the op's default
        out["zero_points"] = _pack(zeros, lay.bits).reshape(-1)
    return out


def fuse(parts: list[tuple[dict, NBitsLayout]]) -> tuple[dict, NBitsLayout]:
    """Several grids over the same input (q/k/v, gate/up) as one MatMulNBits: their output rows
    stacked, codes, scales and zeros copied (a grid without zero points gets the default ones).
    All must have one layout apart from N, and no g_idx."""
    lays = [lay for _, lay in parts]
    out = {k: np.concatenate([a[k] for a, _ in parts]) for k in ("B", "scales")}
    if any("zero_points" in a for a, _ in parts):
        out["zero_points"] = np.concatenate(
            [
                a["zero_points"]
                if "zero_points" in a
                else _pack(np.full((lay.n, lay.blocks), 1 << (lay.bits - 1), np.uint8), lay.bits).reshape(-1)
                for a, lay in parts
            ]
        )
    first = lays[0]
    return out, NBitsLayout(
        k=first.k,
        n=sum(lay.n for lay in lays),
        bits=first.bits,
        block=first.block,
        blocks=first.blocks,
        act_order=False,
        sym=all(lay.sym for lay in lays),
    )


def fusable(lays: list[NBitsLayout]) -> bool:
    first = lays[0]
    return all(
        (lay.k, lay.bits, lay.block) == (first.k, first.bits, first.block) and not lay.act_order
        for lay in lays
    )


def int8_grid(weight: torch.Tensor, spec: QuantSpec = HEAD_INT8):
    """A float weight [N, K] as an 8-bit grid (round to nearest): a float head written 8-bit."""
    from ...quant.grid import Grid

    return Grid.make(*rtn_quantize(weight.float(), spec), spec)


def int8_rows(weight: torch.Tensor, dtype: np.dtype) -> dict[str, np.ndarray]:
    """An embedding [V, H] as int8 codes [V, H] and one scale per row [V, 1] (symmetric, round to
    nearest): the graph gathers rows of both and multiplies."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    codes = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return {"codes": codes.numpy(), "scales": scale.numpy().astype(dtype)}

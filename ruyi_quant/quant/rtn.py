"""Round-to-nearest: the grid of each group from its min/max, the baseline and oracle.

`group_qparams` and `quantize_to_grid` are the primitives every method shares (GPTQ calls them
per group as it goes; AWQ after scaling). Scales are rounded to fp16 before any weight is
rounded, so the stored checkpoint dequantizes to exactly the weights the quantizer simulated.
"""

from __future__ import annotations

import torch

from .plan import QuantSpec

FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal); scales never round to zero


def group_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of each row of w [N, k] (one group's columns) -> scale fp16 [N], zero int64 [N].

    Symmetric: zero = 2^(b-1), scale = 2*absmax/maxq (GPTQ's grid; Q4_0's for 4 bits).
    Asymmetric: the range [min(w,0), max(w,0)] spread over maxq steps, zero = round(-min/scale),
    kept >= 1 so GPTQ's v1 zero-1 storage never wraps (an all-positive group gets scale
    max/(maxq-1) instead).
    """
    w = w.float()
    maxq = spec.maxq
    lo, hi = torch.aminmax(w, dim=1)  # one pass
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    if spec.sym:
        amax = torch.maximum(-lo, hi)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = (2 * amax / maxq).half().clamp(min=FP16_TINY)
        zero = torch.full_like(amax, (maxq + 1) // 2, dtype=torch.int64)
        return scale, zero
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).half().clamp(min=FP16_TINY)
    zero = torch.round(-lo / scale.float())
    low_zero = zero < 1
    scale = torch.where(low_zero, (hi / (maxq - 1)).half().clamp(min=FP16_TINY), scale)
    zero = torch.where(low_zero, torch.ones_like(zero), zero).clamp(max=maxq)
    if spec.bits <= 4:
        scale = exact_min_scale(scale, zero)
    return scale, zero.to(torch.int64)


def exact_min_scale(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp16 scales rounded (to fewer significant bits where needed) so that every min
    -scale*zero is an fp16 number too: GGUF's Q4_1 stores w = d*q + m with fp16 d and m, and so
    holds our asymmetric grids exactly. A 4-bit zero costs the scale at most 4 of its 11 bits
    (relative change < 2^-7, far below one quantization step)."""
    s, z = scale.double(), zero.double()
    out = s.clone()
    e = torch.floor(torch.log2(s))
    for keep in range(10, 0, -1):
        exact = (out * z).half().double() == out * z
        if bool(exact.all()):
            break
        step = torch.exp2(e - keep + 1)
        out = torch.where(exact, out, torch.round(s / step) * step)
    return out.half()


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w [N, k], scale [N], zero [N] -> q [N, k] int64 in [0, maxq]."""
    s = scale.float().unsqueeze(1)
    return torch.clamp(torch.round(w.float() / s) + zero.unsqueeze(1), 0, maxq).to(torch.int64)


def grid_value(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float weights a grid stands for: q [N, k] -> [N, k] float32."""
    return scale.float().unsqueeze(1) * (q - zero.unsqueeze(1)).float()


def group_index(k: int, spec: QuantSpec) -> torch.Tensor:
    """g_idx [K]: the group of each input column (no act-order)."""
    return (torch.arange(k) // spec.width(k)).to(torch.int32)


def rtn_quantize(w: torch.Tensor, spec: QuantSpec):
    """w [N, K] -> (q [K, N] uint8, scales [G, N] fp16, zeros [G, N], g_idx [K]) by round-to-nearest."""
    n, k = w.shape
    g_idx = group_index(k, spec)
    step = spec.width(k)
    qs, scales, zeros = [], [], []
    for start in range(0, k, step):
        block = w[:, start : start + step]
        scale, zero = group_qparams(block, spec)
        qs.append(quantize_to_grid(block, scale, zero, spec.maxq).to(torch.uint8))  # maxq <= 255
        scales.append(scale)
        zeros.append(zero)
    q = torch.cat(qs, dim=1).t().contiguous()
    return q, torch.stack(scales), torch.stack(zeros), g_idx


def rtn_family(model, plan: dict, progress: bool = True):
    """Quantize every planned linear of a FamilialModel by RTN -> QuantizedFamily."""
    from ..log import bar
    from .family import QuantizedFamily
    from .grid import Grid

    fam = QuantizedFamily.from_model(model)
    for name in bar(list(plan), desc="rtn", unit="linear", enabled=progress):
        spec = plan[name]
        fam.set_quantized(
            name, Grid.make(*rtn_quantize(model.get_submodule(name).weight.detach(), spec), spec)
        )
    fam.method = "rtn"
    return fam


def rtn_lazy(fam, plan: dict):
    """RTN as LazyGrids: each planned weight is read and rounded when its grid is first used (as
    the family is written, one linear at a time), so no step holds the model. The same grids as
    rtn_family (weights rounded in float32)."""
    from functools import partial

    from .grid import LazyGrid

    for name, spec in plan.items():
        w = fam.stored_name(f"{name}.weight")
        load = fam.tensors.loader(w) if hasattr(fam.tensors, "loader") else (lambda t=fam.tensors[w]: t)
        fam.set_quantized(
            name, LazyGrid(spec, fam.tensor_info(w)[0], partial(_rtn_grid, load, spec), act_order=False)
        )
    fam.method = "rtn"
    return fam


def _rtn_grid(load, spec: QuantSpec):
    from .grid import Grid

    return Grid.make(*rtn_quantize(load().float(), spec), spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN-quantized-then-dequantized w [N, K], all groups at once (for searches).

    Zero padding of a partial last group changes nothing: grids always span 0."""
    n, k = w.shape
    gs = spec.width(k)
    pad = -k % gs
    wp = torch.nn.functional.pad(w.float(), (0, pad)).reshape(-1, gs)  # [N*G, gs]
    scale, zero = group_qparams(wp, spec)
    # quantize_to_grid then grid_value, in float32 only (no int64 copies: searches call this
    # dozens of times per weight): the integers are small, so every step is exact and the
    # result is the same, bit for bit
    s, z = scale.float().unsqueeze(1), zero.float().unsqueeze(1)
    deq = wp.div(s).round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s)
    return deq.reshape(n, k + pad)[:, :k]

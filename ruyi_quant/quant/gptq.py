"""GPTQ as pure functions: accumulate a Hessian, quantize one weight against it.

GPTQ (Frantar et al., 2022) quantizes the columns of W [N, K] one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2 X^T X / n of the layer's inputs, so that ||W X - Q X|| rather than ||W - Q|| is small.
Columns go in blocks with lazy batch updates; act-order (desc_act) takes columns by decreasing
diag(H); static groups fix each group's grid from the unmodified weights up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model import layout
from .calibrate import store
from .plan import QuantSpec
from .rtn import group_qparams
from .walk import Replay

UPDATE_AT_ONCE = 1 << 26  # elements of GPTQ's lazy block update computed at once (256 MB in fp32)


@dataclass
class Hessian:
    """Running H = 2/n * sum x x^T over n input rows. h [K, K] float32."""

    h: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, k: int, device=None) -> Hessian:
        return cls(torch.zeros(k, k, dtype=torch.float32, device=device))


def accumulate_hessian(hs: Hessian, x: torch.Tensor) -> None:
    """Add inputs x [..., K] to the running Hessian (in place)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [m, K]
    m = x.shape[0]
    hs.h.mul_(hs.n / (hs.n + m))
    hs.n += m
    x = x * (2.0 / hs.n) ** 0.5
    hs.h.addmm_(x.t(), x)


def inverse_hessian_factor(h: torch.Tensor, damp: float, what: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; more damping while not positive
    definite (x10, three times), then a UserError naming the layer. Returns (factor, damp used);
    the factor is a column-major view (`.contiguous()` gives it row-major, the same values).
    One working [K, K] matrix beside H: LAPACK factors it, inverts it and factors it again in
    place, handed a column-major view (H is symmetric, so the view holds the same matrix)."""
    mean_diag = torch.mean(torch.diag(h)).item() or 1.0
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(4):
        d = damp * 10**attempt
        a = h.clone().mT
        a.diagonal().add_(d * mean_diag)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if info.item() == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            if info.item() == 0:
                return a, d
        del a
    raise UserError(
        f"{what}: Hessian not positive definite even with damping {d:g}; use more or "
        "more varied calibration text, or raise damp_percent"
    )


@dataclass
class Factor:
    """What GPTQ needs of a Hessian, shared by every linear that reads the same input (q/k/v,
    gate/up): dead input columns, the processing order, the inverse-Hessian factor."""

    dead: torch.Tensor  # [K] bool: columns no calibration token touched
    perm: torch.Tensor | None  # [K] act-order permutation (None: natural order)
    u: torch.Tensor  # [K, K] upper factor, in processing order
    damp: float  # the damping that made H positive definite


def factor_hessian(
    hs: Hessian, damp: float = 0.01, act_order: bool = False, what: str = "linear", consume: bool = False
) -> Factor:
    """`consume`: hs.h is let go (None) and worked on in place, so that at most two [K, K]
    matrices live at once (Ruyi's down_proj: 1.4 GB each); else hs is left as it was."""
    h = hs.h
    if consume:
        hs.h = None
    dead = torch.diag(h) == 0
    if bool(dead.any()):
        h = h if consume else h.clone()
        h[dead, dead] = 1
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm]
        h = h[:, perm]
    u, damp_used = inverse_hessian_factor(h, damp, what)
    del h
    return Factor(dead, perm, u.contiguous(), damp_used)


def gptq_quantize(
    w: torch.Tensor,
    hs: Hessian | Factor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    what: str = "linear",
    inplace: bool = False,
):
    """w [N, K] -> (q [K, N] uint8, scales [G, N] fp16, zeros [G, N], g_idx [K], damp used).

    `hs` is the Hessian of w's inputs, or its Factor (then damp and act_order are the factor's).
    `inplace`: a float32 w is GPTQ's working copy and is left overwritten (a head nothing reads
    afterwards: 2.2 GB fewer for Ruyi's).
    Groups are runs of group_size columns in processing order (act-order permutes them; with
    static_groups they are runs of the original order, as GPTQModel does).
    """
    f = hs if isinstance(hs, Factor) else factor_hessian(hs, damp, act_order, what)
    n, k = w.shape
    W = w.detach().float()
    if not inplace and W.data_ptr() == w.data_ptr():
        W = W.clone()
    W[:, f.dead] = 0
    gs = spec.width(k)
    static = None
    if static_groups or spec.group_size == -1:
        static = [group_qparams(W[:, s : s + gs], spec) for s in range(0, k, gs)]
    if f.perm is not None:
        W = W[:, f.perm]
    U = f.u  # [K, K] upper

    q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)  # permuted order
    # the group of each column in processing order: runs of gs, or the original order's runs
    group_of = (f.perm if static is not None and f.perm is not None else torch.arange(k)).cpu() // gs
    groups = group_of.tolist()
    scales, zeros = [], []
    grids = [(s.float(), z.float()) for s, z in static] if static is not None else []
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=W.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is None and col % gs == 0:  # a new group: its grid from current weights
                scale, zero = group_qparams(torch.cat([W1[:, i:], W[:, i2 : i2 + gs]], 1)[:, :gs], spec)
                scales.append(scale)
                zeros.append(zero)
                grids.append((scale.float(), zero.float()))
            sf, zf = grids[groups[col]]
            wcol = W1[:, i]
            qf = torch.clamp(torch.round(wcol / sf) + zf, 0, spec.maxq)  # quantize_to_grid's codes
            q[:, col] = qf
            err = (wcol - sf * (qf - zf)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err[:, i] = err
        step = k if n * (k - i2) <= UPDATE_AT_ONCE else max(1, UPDATE_AT_ONCE // n)
        for c in range(i2, k, step):  # a head's update would be a 2 GB temporary taken whole
            W[:, c : c + step] -= Err @ U[i1:i2, c : c + step]
    del W
    if f.perm is not None:
        inv = torch.argsort(f.perm).to(q.device)
        q, group_of = q[:, inv], group_of[inv.cpu()]
    if static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
    return (q.t().contiguous(), torch.stack(scales), torch.stack(zeros), group_of.to(torch.int32), f.damp)


def same_spec_runs(linears: dict, plan) -> list[list[str]]:
    """The names of `linears` in runs of consecutive ones with one spec."""
    runs: list[list[str]] = []
    for name in linears:
        if runs and plan[runs[-1][0]] == plan[name]:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


class GPTQ:
    """The calibration method (see calibrate.py): Hessians from captured inputs, then
    gptq_quantize per linear."""

    hessian = True  # calibrate warns when the tokens cannot make a full-rank one

    def __init__(
        self, damp: float = 0.01, block: int = 128, act_order: bool = False, static_groups: bool = False
    ):
        self.opts = dict(damp=damp, block=block, act_order=act_order, static_groups=static_groups)
        self.heads: dict[str, Hessian] = {}
        self.damp_used: dict[str, float] = {}

    def quantize_linear(
        self, linear, name: str, hs: Hessian | Factor, spec: QuantSpec, fam, inplace: bool = False
    ) -> None:
        q, scales, zeros, g_idx, d = gptq_quantize(
            linear.weight, hs, spec, what=name, inplace=inplace, **self.opts
        )
        if d != self.opts["damp"]:
            self.damp_used[name] = d
        store(fam, linear, name, spec, q, scales, zeros, g_idx)

    def quantize_group(self, linears: dict, hs: Hessian, plan, fam, inplace: bool = False) -> None:
        """Quantize linears that read one input (name -> module) against its Hessian, factored
        once, in place (the Hessian's matrix is let go: Ruyi's down_proj's is 1.4 GB). Linears of
        one spec are quantized as one matrix, their rows stacked: GPTQ treats every row alike
        and apart, so each gets the grid it would get alone, in one column loop, not several."""
        first = next(iter(linears))
        f = factor_hessian(hs, self.opts["damp"], self.opts["act_order"], first, consume=True)
        for run in same_spec_runs(linears, plan):
            if len(run) == 1:
                self.quantize_linear(linears[run[0]], run[0], f, plan[run[0]], fam, inplace=inplace)
                continue
            w = torch.cat([linears[name].weight.detach().float() for name in run])
            q, scales, zeros, g_idx, d = gptq_quantize(
                w, f, plan[run[0]], what=first, inplace=True, **self.opts
            )
            del w
            rows = [linears[name].out_features for name in run]
            parts = zip(run, q.split(rows, 1), scales.split(rows, 1), zeros.split(rows, 1))
            for name, qi, si, zi in parts:
                if d != self.opts["damp"]:
                    self.damp_used[name] = d
                store(
                    fam,
                    linears[name],
                    name,
                    plan[name],
                    qi.contiguous(),
                    si.contiguous(),
                    zi.contiguous(),
                    g_idx.clone(),
                )

    def layer(self, layer, prefix: str, xs, kw, plan, fam) -> list[torch.Tensor]:
        """Quantize a layer's planned linears group by group; returns the layer's outputs."""
        replay = Replay(layer, xs, kw)
        for group in layout.DECODER_LAYER:
            mods = [m for m in group.names if f"{prefix}.{m}" in plan]
            if not mods:
                continue
            first = layer.get_submodule(mods[0])
            hs = Hessian.zeros(first.in_features, first.weight.device)
            replay.capture(group, mods, lambda x: accumulate_hessian(hs, x))
            self.quantize_group({f"{prefix}.{m}": layer.get_submodule(m) for m in mods}, hs, plan, fam)
            replay.quantized(group)
        return replay.outputs()

    def observe_head(self, name: str, x: torch.Tensor, norm=None) -> None:
        if name not in self.heads:
            self.heads[name] = Hessian.zeros(x.shape[-1], x.device)
        accumulate_hessian(self.heads[name], x)

    def rescale_head(self, name: str, s: torch.Tensor) -> None:
        """The head's inputs became x / s (smooth.py): its Hessian becomes H / (s s^T)."""
        h = self.heads[name].h
        h.div_(s.to(h).unsqueeze(1)).div_(s.to(h).unsqueeze(0))

    def finish_head(self, name: str, head, plan, fam) -> None:
        self.quantize_group({name: head}, self.heads.pop(name), plan, fam, inplace=True)

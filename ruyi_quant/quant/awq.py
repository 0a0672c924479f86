"""AWQ: activation-aware scaling, weight clipping, then round-to-nearest.

AWQ (Lin et al., 2023) protects the input channels that see large activations: for a
smoothing pair (an op that feeds some linears, those linears) it searches per-channel scales
s = mean|x|^r / mean|w~|^(1-r) over a grid of r, multiplies the linears' input columns by s and
divides the feeding op's output by s (exact in floating point), picking the r whose quantized
outputs are closest to the float ones. Then it shrinks each group's range where that lowers
the group's output error (clipping), and rounds to nearest.

Pairs are data (MAPPINGS); a pair whose shapes do not fit (v -> o under GQA) is left out.
"""

from __future__ import annotations

import torch

from ..model import layout
from .calibrate import store
from .plan import QuantSpec
from .rtn import fake_quantize, rtn_quantize
from .walk import Replay, capture_many

# (feeding op, linears it feeds) per layer, in the order the layer computes them (model/layout.py)
MAPPINGS = {"qwen2": tuple((g.reads, g.names) for g in layout.DECODER_LAYER)}
NO_CLIP = tuple(n for n, lin in layout.LAYER_LINEARS.items() if not lin.clip)
CLIP_TOKENS = 512  # activation rows per clipping search (as AutoAWQ)


def sample_rows(x: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """At most max_tokens rows of x [..., K] -> [m, K] float32."""
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] <= max_tokens:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:max_tokens].to(x.device)]


def search_scales(
    x: torch.Tensor, ws: list[torch.Tensor], spec: QuantSpec, n_grid: int = 20, chunk: int = 1 << 27
):
    """x [m, K], ws: weights [N_i, K] sharing that input -> (s [K], best r, loss per r).

    loss(r) = sum_i ||x W_i^T - (x/s) Q(W_i s)^T||^2 / numel. No scaling (s = 1, r = None) is a
    candidate too, so the search never does worse than plain rounding on x. Weights of more than
    `chunk` elements (Ruyi's heads, 545M) are taken `chunk` elements of rows at a time, so no
    float copy of them nor [m, vocab] products are made whole."""
    k = ws[0].shape[1]
    n = sum(w.shape[0] for w in ws)
    rows = max(1, chunk // k)
    parts = [w[r : r + rows] for w in ws for r in range(0, w.shape[0], rows)]
    one = n * k <= chunk  # small enough: the whole weight at once
    gs = spec.width(k)
    pad = -k % gs

    def norm_mean(w):  # sum over rows of |w| / its group's max
        wg = torch.nn.functional.pad(w.float().abs(), (0, pad)).reshape(w.shape[0], -1, gs)
        return (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(w.shape[0], -1)[:, :k]

    if one:
        w = torch.cat([w.float() for w in ws])
        w_mean = norm_mean(w).mean(0)
    else:
        w_mean = sum(norm_mean(w).sum(0) for w in parts) / n
    x_mean = x.abs().mean(0)
    # ||x W^T - x Q^T||^2 = sum over the rows d of W - Q of d G d^T, G = x^T x, made once: a
    # candidate then costs N*K*K, not m*N*K, where K < m rows (ruyi-mini; not Ruyi-7B's width)
    gram = x.t() @ x if k < x.shape[0] else None

    def loss_of(s):  # s None: plain rounding
        total = 0.0
        for part in [w] if one else parts:
            wf = part.float()
            d = (fake_quantize(wf, spec) if s is None else fake_quantize(wf * s, spec) / s) - wf
            total += ((d @ gram) * d).sum().item() if gram is not None else (x @ d.t()).pow(2).sum().item()
        return total / (x.shape[0] * n)

    losses, best, best_s = [], None, torch.ones(k, device=x.device)
    identity = loss_of(None)
    for i in range(n_grid):
        r = i / n_grid
        s = (x_mean.pow(r) / w_mean.pow(1 - r).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        losses.append(loss_of(s))
        if best is None or losses[-1] < losses[best]:
            best, best_s = i, s
    if identity <= losses[best]:
        return torch.ones(k, device=x.device), None, losses
    return best_s, best / n_grid, losses


def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    spec: QuantSpec,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 1024,
) -> torch.Tensor:
    """Best symmetric clipping range per (output row, group): max|w| times a shrink factor in
    [1 - max_shrink, 1] that minimises the group's share of the output error. -> [N, G]"""
    n, k = w.shape
    gs = spec.width(k)
    pad = -k % gs
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, gs)  # [m, G, gs]
    best_max = []
    for r0 in range(0, n, rows_per_chunk):
        wc = torch.nn.functional.pad(w[r0 : r0 + rows_per_chunk].float(), (0, pad))
        wg = wc.reshape(wc.shape[0], -1, gs)  # [n, G, gs]
        ref = torch.einsum("mgc,ngc->mng", xg, wg)  # [m, n, G]
        org_max = wg.abs().amax(-1)  # [n, G]
        best_err = torch.full_like(org_max, float("inf"))
        chunk_best = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wg, mx.unsqueeze(-1)), -mx.unsqueeze(-1))
            q = fake_quantize(clipped.reshape(wg.shape[0], -1), spec).reshape(wg.shape)
            err = (torch.einsum("mgc,ngc->mng", xg, q) - ref).pow(2).mean(0)  # [n, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chunk_best = torch.where(better, mx, chunk_best)
        best_max.append(chunk_best)
    return torch.cat(best_max)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    n, k = w.shape
    gs = spec.width(k)
    bound = max_val.repeat_interleave(gs, dim=1)[:, :k]
    return torch.maximum(torch.minimum(w.float(), bound), -bound)


CLIP_ROWS = 4096  # rows clipped and rounded at a time: no clipped float copy of a whole head


def clipped_rtn(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec, rows: int = CLIP_ROWS):
    """rtn_quantize(apply_clip(w, max_val, spec), spec), `rows` output rows at a time. Both work
    row by row, so the grid is the same bit for bit; whole, a Ruyi head's clipping made four
    float32 [N, K] temporaries (2.2 GB each) beside the head."""
    parts = [
        rtn_quantize(apply_clip(w[r : r + rows], max_val[r : r + rows], spec), spec)
        for r in range(0, w.shape[0], rows)
    ]
    if len(parts) == 1:
        return parts[0]
    q, scales, zeros = (torch.cat([p[i] for p in parts], 1) for i in range(3))
    return q, scales, zeros, parts[0][3]


def fold(prev, s: torch.Tensor) -> None:
    """Divide the output channels of the feeding op (an RMSNorm or a linear) by s."""
    prev.weight.data = (prev.weight.float() / (s if prev.weight.dim() == 1 else s.unsqueeze(1))).to(
        prev.weight.dtype
    )
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)


def scale_columns(linear, s: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.float() * s).to(linear.weight.dtype)


class AWQ:
    """The calibration method (see calibrate.py)."""

    def __init__(
        self,
        n_grid: int = 20,
        max_shrink: float = 0.5,
        max_tokens: int = 2048,
        clip: bool = True,
        arch: str = "qwen2",
    ):
        self.n_grid, self.max_shrink, self.max_tokens, self.clip = n_grid, max_shrink, max_tokens, clip
        self.mappings = MAPPINGS[arch]
        self.heads: dict[str, list[torch.Tensor]] = {}
        self.head_norms: dict[str, list] = {}
        self.ratios: dict[str, float] = {}

    def quantize_linear(
        self, linear, name: str, x: torch.Tensor, spec: QuantSpec, fam, clip: bool = True
    ) -> None:
        w = linear.weight.detach().float()
        if self.clip and clip:
            xc = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
            grid = clipped_rtn(w, search_clip(xc, w, spec, self.n_grid, self.max_shrink), spec)
        else:
            grid = rtn_quantize(w, spec)
        store(fam, linear, name, spec, *grid)

    def layer(self, layer, prefix: str, xs, kw, plan, fam) -> list[torch.Tensor]:
        """Smooth, clip and round a layer's planned linears; returns the layer's outputs."""
        self.smooth(layer, prefix, xs, kw, plan)
        # 2. clip and round, group by group, inputs captured through the quantized groups
        replay = Replay(layer, xs, kw)
        for group in layout.DECODER_LAYER:
            mods = [m for m in group.names if f"{prefix}.{m}" in plan]
            if not mods:
                continue
            rows: list[torch.Tensor] = []
            replay.capture(group, mods, lambda x: rows.append(x.reshape(-1, x.shape[-1])))
            x = sample_rows(torch.cat(rows), self.max_tokens)
            for m in mods:
                self.quantize_linear(
                    layer.get_submodule(m),
                    f"{prefix}.{m}",
                    x,
                    plan[f"{prefix}.{m}"],
                    fam,
                    clip=m not in NO_CLIP,
                )
            replay.quantized(group)
        return replay.outputs()

    def smooth(self, layer, prefix: str, xs, kw, plan) -> None:
        """1. scales: inputs of every pair from the float layer, searched and folded in order
        (the float layer computes the same outputs after)."""
        pairs = []
        for prev_name, lin_names in self.mappings:
            lins = [layer.get_submodule(n) for n in lin_names]
            prev = layer.get_submodule(prev_name)
            if not all(f"{prefix}.{n}" in plan for n in lin_names):
                continue  # a skipped linear: no scaling for its pair
            if prev.weight.shape[0] != lins[0].in_features:
                continue  # v -> o under GQA: shapes do not fit
            pairs.append((prev_name, lin_names, prev, lins))
        # folding one pair leaves the float outputs of every linear unchanged, so the inputs of
        # all pairs can be captured in one pass before any folding
        captured: dict[str, list] = {p[1][0]: [] for p in pairs}
        capture_many(
            layer,
            {n: layer.get_submodule(n) for n in captured},
            xs,
            kw,
            lambda key, x: captured[key].append(x.reshape(-1, x.shape[-1])),
        )
        for prev_name, lin_names, prev, lins in pairs:
            x = sample_rows(torch.cat(captured.pop(lin_names[0])), self.max_tokens)
            spec = plan[f"{prefix}.{lin_names[0]}"]
            s, r, _ = search_scales(x, [lin.weight for lin in lins], spec, self.n_grid)
            self.ratios[f"{prefix}.{prev_name}"] = r
            fold(prev, s)
            for lin in lins:
                scale_columns(lin, s)

    def observe_head(self, name: str, x: torch.Tensor, norm=None) -> None:
        self.heads.setdefault(name, []).append(sample_rows(x, self.max_tokens))
        seen = self.head_norms.setdefault(name, [])
        if norm is not None and not any(n is norm for n in seen):
            seen.append(norm)

    def smooth_head(self, name: str, head, plan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's scales searched and folded into every norm that feeds it -> (its sampled
        inputs as the scaled head sees them, the scales; None when no norm feeds it)."""
        x = sample_rows(torch.cat(self.heads.pop(name)), self.max_tokens)
        norms = self.head_norms.pop(name, [])
        if not norms:
            return x, None
        s, r, _ = search_scales(x, [head.weight], plan[name], self.n_grid)
        self.ratios[name] = r
        for norm in norms:
            fold(norm, s)
        scale_columns(head, s)
        return x / s, s

    def finish_head(self, name: str, head, plan, fam) -> None:
        x, _ = self.smooth_head(name, head, plan)
        self.quantize_linear(head, name, x, plan[name], fam)

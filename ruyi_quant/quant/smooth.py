"""AWQ's scales first, another method's rounding after: AWQ-then-GPTQ, and AWQ in K-quant blocks.

AWQ's per-channel scales (awq.py) are searched on each float layer's inputs and folded into it
(the feeding op's outputs divided by s, the linears' input columns multiplied by it: the layer
computes what it did). The inner method then rounds the smoothed weights: GPTQ's error feedback
(plain grids or llama.cpp's blocks), or llama.cpp's own weighted rounding in its blocks
(kgptq.BlockRounding). A head's scales are folded into the norms that feed it, and the inner
method's statistics of its inputs are rescaled to match (its Hessian H becomes H / (s s^T)).
"""

from __future__ import annotations

from .awq import AWQ


class Smoothed:
    """The calibration method (calibrate.py): AWQ's smoothing, then `inner` (a GPTQ)."""

    def __init__(self, awq: AWQ, inner):
        self.awq, self.inner = awq, inner
        self.hessian = getattr(inner, "hessian", False)

    @property
    def ratios(self) -> dict:
        return self.awq.ratios

    def layer(self, layer, prefix: str, xs, kw, plan, fam):
        self.awq.smooth(layer, prefix, xs, kw, plan)
        return self.inner.layer(layer, prefix, xs, kw, plan, fam)

    def observe_head(self, name: str, x, norm=None) -> None:
        self.awq.observe_head(name, x, norm)
        self.inner.observe_head(name, x, norm)

    def finish_head(self, name: str, head, plan, fam) -> None:
        _, s = self.awq.smooth_head(name, head, plan)
        if s is not None:
            self.inner.rescale_head(name, s)
        self.inner.finish_head(name, head, plan, fam)

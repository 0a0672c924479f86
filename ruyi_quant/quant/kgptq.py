"""GPTQ inside llama.cpp's block types (pure functions apart from ggml's own quantizer).

Each block's parameters (d, dmin, the 6-bit sub-block scales and mins; Q6_K's int8 scales) come
first from the search llama.cpp itself runs, ggml's quantizer weighted by the importance matrix
(the mean square of each input column: diag(H) / 2 of GPTQ's Hessian H = 2 X^T X / n). With those
fixed, GPTQ chooses every code, column by column, spreading each column's rounding error over the
columns not yet quantized (act-order allowed: the groups are fixed). The result is written in
ggml's bytes exactly (kquant.encode).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.layout import is_head
from .ggml_quantizer import quantize_rows
from .gptq import GPTQ, UPDATE_AT_ONCE, Factor, Hessian, factor_hessian
from .grid import BlockGrid
from .kquant import BlockType, block_type, decode, encode, nearest, subblock_params, value


def ggml_blocks(w: torch.Tensor, t: BlockType, imatrix: torch.Tensor | None) -> np.ndarray:
    """ggml's own bytes for w [N, K] (llama.cpp's round-to-nearest on its weighted search)."""
    qw = None if imatrix is None else imatrix.detach().float().cpu().numpy()
    return quantize_rows(t.qtype, w.detach().float().cpu().numpy(), qw)


def importance(h: torch.Tensor) -> torch.Tensor:
    """llama.cpp's importance matrix (mean x^2 per input column) from GPTQ's Hessian."""
    return torch.diag(h).float() / 2


def gptq_codes(
    w: torch.Tensor, f: Factor, t: BlockType, params: dict, block: int = 128, inplace: bool = False
) -> np.ndarray:
    """w [N, K] -> codes uint8 [N, K] on the fixed block parameters `params`, chosen by GPTQ
    against the inverse-Hessian factor f (its order: act-order or natural). The parameters stay
    one per sub-block (a column reads its sub-block's); `inplace`: a float32 w is the working copy
    and is left overwritten (a head: 2.2 GB fewer for Ruyi's)."""
    n, k = w.shape
    W = w.detach().float()
    if not inplace and W.data_ptr() == w.data_ptr():
        W = W.clone()
    W[:, f.dead] = 0
    s, o = subblock_params(params, t)
    s, o = s.to(W.device), o.to(W.device)
    cols = torch.arange(k) if f.perm is None else f.perm.cpu()
    sub_of = (cols // t.sub).tolist()  # processing position -> sub-block
    if f.perm is not None:
        W = W[:, f.perm]
    U = f.u
    q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=W.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            sc, oc = s[:, sub_of[col]], o[:, sub_of[col]]
            wcol = W1[:, i]
            qcol = nearest(wcol, sc, oc, t)
            q[:, col] = qcol
            err = (wcol - value(qcol, sc, oc, t)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err[:, i] = err
        step = k if n * (k - i2) <= UPDATE_AT_ONCE else max(1, UPDATE_AT_ONCE // n)
        for c in range(i2, k, step):
            W[:, c : c + step] -= Err @ U[i1:i2, c : c + step]
    del W
    if f.perm is not None:
        q = q[:, torch.argsort(f.perm).to(q.device)]
    return q.cpu().numpy()


def gptq_blocks(
    w: torch.Tensor,
    f: Factor,
    type_name: str,
    imatrix: torch.Tensor | None,
    block: int = 128,
    inplace: bool = False,
) -> np.ndarray:
    """w [N, K] -> ggml bytes [N, row bytes] of `type_name`: ggml's block parameters (weighted
    by `imatrix`), GPTQ's codes."""
    t = block_type(type_name)
    params = decode(ggml_blocks(w, t, imatrix), t, w.shape[1])[1]
    return encode(gptq_codes(w, f, t, params, block, inplace), params, t)


class BlockGPTQ(GPTQ):
    """The calibration method (calibrate.py) for grids in llama.cpp's block types: GPTQ's
    Hessians, the importance matrix taken from each, then gptq_blocks for every type a module's
    spec names (one factor shared by all)."""

    def quantize_group(self, linears: dict, hs: Hessian, plan, fam, inplace: bool = False) -> None:
        first = next(iter(linears))
        imatrix = importance(hs.h)
        f = factor_hessian(hs, self.opts["damp"], self.opts["act_order"], first, consume=True)
        if f.damp != self.opts["damp"]:
            self.damp_used[first] = f.damp
        for name, linear in linears.items():
            types = plan[name].ggml
            # the last type may overwrite a head's weight
            self.store(
                fam,
                linear,
                name,
                plan[name],
                lambda w, t: gptq_blocks(w, f, t, imatrix, self.opts["block"], inplace and t == types[-1]),
            )

    @staticmethod
    def store(fam, linear, name: str, spec, blocks) -> None:
        """`blocks(weight, type) -> ggml bytes` for each of spec's types, kept as the module's
        BlockGrid; the family computes on with the first (most bits) type."""
        w = linear.weight
        data = {t: torch.from_numpy(blocks(w, t)) for t in spec.ggml}
        grid = BlockGrid(data, spec, w.shape[1])
        fam.set_quantized(name, grid)
        if not is_head(name):
            linear.weight.data = grid.dequantize().to(w.device, w.dtype)


class BlockRounding(BlockGPTQ):
    """llama.cpp's own rounding in its block types (ggml's weighted search, nearest codes), the
    importance matrix from each layer's inputs on the quantized trunk: AWQ's rounding step when
    the grids are K-quant blocks (smooth.py). No error feedback, so no factor is made."""

    def quantize_group(self, linears: dict, hs: Hessian, plan, fam, inplace: bool = False) -> None:
        imatrix = importance(hs.h)
        hs.h = None
        for name, linear in linears.items():
            self.store(fam, linear, name, plan[name], lambda w, t: ggml_blocks(w, block_type(t), imatrix))

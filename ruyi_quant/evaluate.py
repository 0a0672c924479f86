"""Reference vs quantized, per exit: perplexity, KL(ref || quant), top-1 agreement, bytes.

Both families run every exit from one pass of the shared trunk on the streamed walk
(quant/walk.py: one layer or head of each in memory at a time, whatever the family's size), every
batch through a layer before the next layer is read. All maths in float32.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import closing, nullcontext
from pathlib import Path

import torch

from . import names
from .log import bar
from .model.familial import FamilialModel
from .model.layout import head_prefix
from .quant.family import QuantizedFamily
from .quant.walk import Walk


def kl_rows(ref_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) per position from log-probabilities [..., V] -> [...]."""
    return (ref_logp.exp() * (ref_logp - q_logp)).sum(-1)


def nll_sum(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL from log-probabilities [B, T, V] of ids [B, T] (T-1 targets a row)."""
    return -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()


ROWS_AT_ONCE = 32  # positions whose log-probabilities are made at a time (cache-sized)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary of logits [B, T, V], in float32, ROWS_AT_ONCE positions
    at a time (each row's own: the same values as one call)."""
    parts = [
        torch.log_softmax(logits[:, t : t + ROWS_AT_ONCE].float(), -1)
        for t in range(0, logits.shape[1], ROWS_AT_ONCE)
    ]
    return torch.cat(parts, 1)


def token_stats(ref_logits: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Sums over one batch. logits [B, T, V], ids [B, T]: next-token NLL of both models (T-1
    positions per row), KL(ref || quant) and argmax agreement (all T positions)."""
    return stats_of(log_probs(ref_logits), q_logits, ids)


def stats_of(ref_lp: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """token_stats from the reference's log-probabilities. The quantized model's are made
    ROWS_AT_ONCE positions at a time: every figure is a row's own (log_softmax, the KL's sum over
    V, argmax), and the per-position values are summed once, over the whole batch, so the sums
    are what whole-batch maths gives, bit for bit."""
    nll_ref, nll_q, kl, top1 = [], [], [], []
    targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # position t's next token; the last is dropped
    for t in range(0, ids.shape[1], ROWS_AT_ONCE):
        lp = ref_lp[:, t : t + ROWS_AT_ONCE]
        lq = torch.log_softmax(q_logits[:, t : t + ROWS_AT_ONCE].float(), -1)
        nxt = targets[:, t : t + ROWS_AT_ONCE].unsqueeze(-1)
        nll_ref.append(lp.gather(-1, nxt).squeeze(-1))
        nll_q.append(lq.gather(-1, nxt).squeeze(-1))
        kl.append(kl_rows(lp, lq))
        top1.append(lp.argmax(-1) == lq.argmax(-1))
    return {
        "nll_ref": -torch.cat(nll_ref, 1)[:, :-1].contiguous().sum().item(),
        "nll_quant": -torch.cat(nll_q, 1)[:, :-1].contiguous().sum().item(),
        "kl": torch.cat(kl, 1).sum().item(),
        "top1": torch.cat(top1, 1).sum().item(),
        "positions": ids.numel(),
        "targets": ids[:, 1:].numel(),
    }


class ReferenceCache:
    """The reference's outputs at every exit (each exit's branch output, batch by batch, before
    its norm and head) on one set of windows, kept in memory for the next evaluation against
    the same reference on the same windows: a recipe's jobs on one model then walk the
    reference's trunk once, not once a job. It keeps one evaluation's worth, when that is at most
    `budget` bytes (ruyi-mini on 16 x 256 tokens: 47 MB; Ruyi-7B: 294 MB); a larger one is
    computed every time. The heads are run again: their logits are vocabulary-wide (ruyi-mini's:
    4 GB for the same windows)."""

    def __init__(self, budget: int = 1 << 30):
        self.budget = budget
        self.key: tuple | None = None
        self.outputs: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def key_of(ref: QuantizedFamily, windows: torch.Tensor, exits: list[int], batch: int) -> tuple | None:
        """What makes an evaluation's reference side the same: the reference's directory and its
        files (by its manifest's sha256, else by size and modification time; a family not read
        from a directory is not cached), the windows, exits, batch."""
        if ref.directory is None:
            return None
        if ref.files is not None and ref.files.files:
            files = tuple(sorted(ref.files.files.items()))
        else:
            stats = ((p.name, p.stat()) for p in sorted(Path(ref.directory).iterdir()) if p.is_file())
            files = tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)
        tokens = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
        return (str(ref.directory), files, tuple(windows.shape), tokens, tuple(exits), batch)

    def holds(self, key) -> bool:
        return key is not None and key == self.key and len(self.outputs) == len(key[4])

    def start(self, key, nbytes: int) -> bool:
        """Forget what is kept; keep `key`'s outputs (nbytes in all) if they fit."""
        self.key, self.outputs = None, {}
        if key is None or nbytes > self.budget:
            return False
        self.key = key
        return True


@torch.no_grad()
def compare(
    ref: FamilialModel,
    quant: FamilialModel,
    windows: torch.Tensor,
    exits: list[int],
    batch: int = 4,
    progress: bool = True,
) -> dict[int, dict]:
    """Per exit: ppl_ref, ppl_quant, delta_ppl_pct, kl, top1 (0..1), tokens."""
    sums: dict[int, dict] = {e: {} for e in exits}
    for start in bar(range(0, len(windows), batch), desc="eval", unit="batch", enabled=progress):
        ids = windows[start : start + batch]
        r, q = ref.forward_exits(ids, exits=exits), quant.forward_exits(ids, exits=exits)
        for e in exits:
            for k, v in token_stats(r[e], q[e], ids).items():
                sums[e][k] = sums[e].get(k, 0) + v
    return summarise(sums)


@torch.no_grad()
def compare_families(
    ref: QuantizedFamily,
    quant: QuantizedFamily,
    windows: torch.Tensor,
    exits: list[int],
    batch: int = 4,
    progress: bool = True,
    cache: ReferenceCache | None = None,
) -> dict[int, dict]:
    """compare() of two families, streamed: the same numbers as compare() of their dequantized
    models, bit for bit (the same float32 operations on every batch), with one layer of each
    family in memory instead of both whole models. With `cache`, the reference side is read
    from it when it holds this evaluation's, and kept in it otherwise."""
    key = ReferenceCache.key_of(ref, windows, exits, batch) if cache is not None else None
    hit = cache is not None and cache.holds(key)
    keep = (
        cache is not None
        and not hit
        and cache.start(key, len(exits) * windows.numel() * ref.config.hidden_size * 4)
    )
    walks = [Walk(quant, windows, batch, exits=exits), Walk(ref, windows, batch, exits=exits)]
    batches = list(windows.split(batch))
    sums: dict[int, dict] = {e: {} for e in exits}
    with (
        closing(walks[0].steps(progress=progress, desc="eval")) as quant_steps,
        nullcontext(None) if hit else closing(walks[1].steps()) as ref_steps,
    ):
        for step, q_out in quant_steps:
            if not hit:  # the reference's walk in step with the quantized family's
                r_out = next(ref_steps)[1].batches
            if step.kind != "exit":
                continue
            if hit:
                r_out = cache.outputs[step.layer]
            elif keep:
                cache.outputs[step.layer] = r_out
            head, norm = head_prefix(ref.config.shared_heads, step.j), names.EXIT_NORM.format(j=step.j)
            (q_norm, q_head), (r_norm, r_head) = [(w.load(norm), w.load(head)) for w in walks]
            for i, ids in enumerate(batches):
                lp = log_probs(r_head(r_norm(r_out[i])))
                for k, v in stats_of(lp, q_head(q_norm(q_out.batches[i])), ids).items():
                    sums[step.layer][k] = sums[step.layer].get(k, 0) + v
            for w in walks:
                for prefix in (norm, head):
                    w.drop(prefix)
    return summarise(sums)


def summarise(sums: dict[int, dict]) -> dict[int, dict]:
    out = {}
    for e, s in sums.items():
        ppl_ref, ppl_q = math.exp(s["nll_ref"] / s["targets"]), math.exp(s["nll_quant"] / s["targets"])
        out[e] = {
            "ppl_ref": ppl_ref,
            "ppl_quant": ppl_q,
            "delta_ppl_pct": 100 * (ppl_q / ppl_ref - 1),
            "kl": s["kl"] / s["positions"],
            "top1": s["top1"] / s["positions"],
            "tokens": s["positions"],
        }
    return out


@torch.no_grad()
def exit_perplexities(
    model: FamilialModel, windows: torch.Tensor, batch: int = 2, progress: bool = True
) -> dict[int, float]:
    """Next-token perplexity of every exit on windows [m, T], one trunk pass per batch."""
    nll = {e: 0.0 for e in model.config.exits}
    count = 0
    for s in bar(range(0, len(windows), batch), desc="ppl", unit="batch", enabled=progress):
        ids = windows[s : s + batch]
        for e, logits in model.forward_exits(ids).items():
            nll[e] += nll_sum(torch.log_softmax(logits.float(), -1), ids)
        count += ids[:, 1:].numel()
    return {e: math.exp(v / count) for e, v in nll.items()}


def exit_sizes(fam: QuantizedFamily) -> dict[int, dict]:
    """Per exit: parameters and stored bytes of the tensors it runs on (floats in the
    checkpoint's dtype, quantized linears packed: QuantizedFamily.stored_size)."""
    out = {}
    for j, e in enumerate(fam.config.exits):
        params, nbytes = fam.stored_size(fam.exit_tensor_names(j))
        out[e] = {"params": params, "bytes": nbytes}
    return out


def evaluate(
    ref_fam: QuantizedFamily,
    quant_fam: QuantizedFamily,
    windows: torch.Tensor,
    exits: list[int] | None = None,
    batch: int = 4,
    progress: bool = True,
    cache: ReferenceCache | None = None,
) -> dict:
    """The report `ruyi-quant eval` prints and writes: one row per exit plus family totals."""
    exits = exits or ref_fam.config.exits
    scores = compare_families(ref_fam, quant_fam, windows, exits, batch, progress, cache)
    ref_sizes, q_sizes = exit_sizes(ref_fam), exit_sizes(quant_fam)
    rows = []
    for e in exits:
        rows.append(
            {
                "exit": e,
                **scores[e],
                "params": ref_sizes[e]["params"],
                "bytes_ref": ref_sizes[e]["bytes"],
                "bytes_quant": q_sizes[e]["bytes"],
            }
        )
    return {
        "method": quant_fam.method,
        "rows": rows,
        "family": {
            "bytes_ref": ref_fam.stored_size()[1],
            "bytes_quant": quant_fam.stored_size()[1],
            "params": ref_fam.size()[0],
        },
        "windows": list(windows.shape),
    }

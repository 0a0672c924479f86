"""The int4 runtime against bf16, exit by exit (`ruyi-quant eval --runtime int4`): perplexity of
both, KL(float || int4), top-1 agreement, prefill and decode tokens/s, peak memory.

"float" is the reference (unquantized) family with every weight in the compute dtype (bf16 by
default, so the table says bf16); "int4" is
the quantized family on the int4 runtime (runtime/model.py), same dtype for activations. Each
side is loaded and timed alone (its peak memory is its own: RSS high-water mark reset per stage,
and on CUDA the peak memory torch allocated), then both are loaded together for the accuracy
pass (evaluate.compare: every exit from one trunk pass per batch).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from ..errors import UserError
from ..evaluate import compare
from ..log import Stages
from .model import int4_model

SIDES = ("float", "int4")  # float: the reference in the compute dtype (bf16 by default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(step, new_cache, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Prefill of prompt [B, P] on a fresh cache, then greedy decode of new_tokens more: median
    over repeats (after one warm-up) of prefill tokens/s, time to first token and decode tokens/s
    (B x new_tokens / decode seconds). step(ids, cache, position_ids) -> last logits [B, V]."""
    device = prompt.device
    b, p = prompt.shape
    prefill, decode = [], []
    for r in range(repeats + 1):
        cache = new_cache()
        _sync(device)
        t0 = time.perf_counter()
        nxt = step(prompt, cache, None).argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for i in range(new_tokens if r else min(new_tokens, 2)):
            nxt = step(nxt, cache, torch.full((b, 1), p + i, device=device)).argmax(-1, keepdim=True)
        _sync(device)
        if r:  # run 0 is the warm-up
            prefill.append(t1 - t0)
            decode.append(time.perf_counter() - t1)
    ttft = statistics.median(prefill)
    return {
        "prefill_tok_s": b * p / ttft,
        "ttft_s": ttft,
        "decode_tok_s": b * new_tokens / statistics.median(decode),
    }


def speed(
    model, exit: int, prompt: torch.Tensor, new_tokens: int, repeats: int = 3, compiled: bool = False
) -> dict:
    """timed() of one exit of a FamilialModel (int4 or float); compiled: a static cache and the
    decode steps through torch.compile (generate.compiled_forward), the prefill eager."""
    from .generate import compiled_forward

    prompt = prompt.to(model.model.embed_tokens.weight.device)
    decode = compiled_forward(model) if compiled else model

    def step(ids, cache, pos):
        f = model if pos is None else decode
        return f(ids, exit=exit, position_ids=pos, cache=cache, logits_to_keep=1).logits[:, -1]

    max_len = prompt.shape[1] + new_tokens if compiled else None
    return timed(step, lambda: model.new_cache(max_len), prompt, new_tokens, repeats)


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def load(fam, side: str, device, dtype: torch.dtype):
    if side == "float" and fam.grids:
        raise UserError(
            "--runtime int4: the reference must be the unquantized family (it has "
            f"{len(fam.grids)} quantized linears)"
        )
    if side == "int4" and not fam.grids:
        raise UserError("--runtime int4: the quantized family has no quantized linears")
    return int4_model(fam, device, dtype, progress=False)


def runtime_report(
    ref_fam,
    quant_fam,
    windows: torch.Tensor,
    exits: list[int],
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
    prefill: int = 256,
    new_tokens: int = 32,
    batch: int = 1,
    repeats: int = 3,
    eval_batch: int = 4,
    say=None,
    compiled: bool | None = None,
) -> dict:
    """One row per exit with both sides' numbers; 'stages' has each side's load + timing peak."""
    device = torch.device(device)
    compiled = device.type == "cuda" if compiled is None else compiled
    flat = windows.reshape(-1)
    if flat.numel() < batch * prefill:
        raise UserError(
            f"--prefill {prefill} x --batch {batch}: the eval text has only {flat.numel()} tokens"
        )
    prompt = flat[: batch * prefill].view(batch, prefill)
    stages, speeds, sizes = Stages(), {}, {}
    for side, fam in zip(SIDES, (ref_fam, quant_fam)):
        with stages.stage(side):
            model = load(fam, side, device, dtype)
            sizes[side] = model_bytes(model)
            speeds[side] = {e: speed(model, e, prompt, new_tokens, repeats, compiled) for e in exits}
        if say:
            say(stages.line(stages.rows[-1]))
        del model
        gc.collect()
    ref, quant = load(ref_fam, "float", device, dtype), load(quant_fam, "int4", device, dtype)
    scores = compare(ref, quant, windows.to(device), exits, eval_batch, progress=say is not None)
    del ref, quant
    peaks = {r["stage"]: r for r in stages.rows}
    rows = []
    for e in exits:
        s = scores[e]
        row = {
            "exit": e,
            "ppl_float": s["ppl_ref"],
            "ppl_int4": s["ppl_quant"],
            "delta_ppl_pct": s["delta_ppl_pct"],
            "kl": s["kl"],
            "top1": s["top1"],
        }
        for side in SIDES:
            row.update({f"{k}_{side}": v for k, v in speeds[side][e].items()})
            row[f"peak_rss_gb_{side}"] = peaks[side]["peak_rss_gb"]
            if "peak_device_gb" in peaks[side]:
                row[f"peak_device_gb_{side}"] = peaks[side]["peak_device_gb"]
        row["decode_speedup"] = row["decode_tok_s_int4"] / row["decode_tok_s_float"]
        rows.append(row)
    return {
        "runtime": "int4",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "method": quant_fam.method,
        "compiled": compiled,
        "prompt": [batch, prefill],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "windows": list(windows.shape),
        "weights_gb": {k: v / 1e9 for k, v in sizes.items()},
        "stages": stages.rows,
        "rows": rows,
    }

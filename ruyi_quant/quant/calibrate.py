"""Branch-aware, layer-wise sequential calibration over a family, on the streamed walk (walk.py).

The calibration batch is embedded once; then trunk layer by trunk layer, in order:
  * at an exit e < N-1, the exit's branch layer is calibrated on the *quantized* trunk's
    activations at e (the input trunk layer e would get), then its head on the branch's normed
    outputs;
  * trunk layer e is calibrated on the same activations and its quantized outputs go on.
The last exit's branch is trunk layer N-1 itself. A shared head accumulates its statistics
over every exit and is quantized once at the end. Inside a layer, linears that read the same
input are quantized together, and the next group's inputs are captured through them
(true-sequential). One layer's weights sit on the compute device at a time.

A method is an object with `layer(layer, prefix, xs, kw, plan, fam)` (which may return the
layer's outputs, one per batch, as it computed them),
`observe_head(name, x, norm)` and `finish_head(name, head, plan, fam)` (see gptq/awq).
"""

from __future__ import annotations

import logging
import time
from contextlib import closing

import torch

from .. import names
from ..errors import UserError
from ..model.layout import head_prefix, is_head
from .family import QuantizedFamily
from .grid import Grid
from .walk import Walk, should_offload

log = logging.getLogger(__name__)


def pick_device(device: str | None, flag: str = "--device") -> torch.device:
    """The compute device; a named one that this machine's torch cannot use is a UserError (the
    CLI and the recipe runner call this before any work)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"{flag} {device}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise UserError(
                f"{flag} {device}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type != "cpu":
        raise UserError(f"{flag} {device}: ruyi-quant computes on cpu or cuda")
    return dev


def store(fam: QuantizedFamily, linear, name: str, spec, q, scales, zeros, g_idx) -> None:
    """Record a linear's grid in the family and make the float model compute with it (on the
    compute device, where the grid was made). A head's output feeds nothing once it is quantized,
    so a head keeps its float weight (Ruyi's: no 2.2 GB dequantized copy)."""
    from .pack import dequantize

    fam.set_quantized(name, Grid.make(q, scales, zeros, g_idx, spec))
    if is_head(name):
        return
    # a new tensor, not an in-place copy: tensors shared with a reference family stay intact
    linear.weight.data = dequantize(
        q.to(torch.uint8), scales.half(), zeros.to(torch.uint8), g_idx.to(linear.weight.device)
    ).to(linear.weight.dtype)


def check_tokens(plan: dict, model, tokens: int) -> None:
    widest = max((model.get_submodule(m).in_features for m in plan), default=0)
    if tokens < widest:
        log.warning(
            f"calibration has {tokens} tokens, fewer than the widest layer's {widest} input "
            f"columns: its Hessian is singular; use at least {widest} tokens (samples x seq_len)"
        )


@torch.no_grad()
def calibrate(
    source,
    plan: dict,
    windows: torch.Tensor,
    method,
    *,
    batch: int = 8,
    device: str | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    layout: str = "gptq",
    offload: bool | None = None,
    spill=None,
) -> QuantizedFamily:
    """Quantize every module of `plan` with `method`. `source` is a float family (a lazy one is
    read layer by layer) or a FamilialModel (left unchanged). Returns the quantized family, its
    grids stored in `layout` (gptq | awq), seconds per layer in stats["layer_seconds"].
    `offload` (None: decide by free device memory) keeps the activations in CPU memory between
    uses; `spill` (a Spill) moves each layer's grids to disk as soon as they are made."""
    src = source if isinstance(source, QuantizedFamily) else QuantizedFamily.from_model(source)
    cfg = src.config
    dev = pick_device(device)
    if offload is None:
        offload = should_offload(dev, windows.numel() * cfg.hidden_size * 4)
    walk = Walk(src, windows, batch, dev, offload=offload)
    w, seconds = walk.weights, walk.seconds
    fam = QuantizedFamily(config=cfg, tensors=src.tensors.copy(), layout=layout)  # src unchanged
    if getattr(method, "hessian", False):
        check_tokens(plan, walk.model, windows.numel())
    heads_seen: set[str] = set()
    norms = [w.load(names.EXIT_NORM.format(j=j)) for j in range(len(cfg.exits))]

    def timed(prefix, fn):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds[prefix] = round(time.perf_counter() - t0, 3)

    def keep(prefix):
        for name, t in w.floats(prefix, fam.grids).items():
            fam.tensors[name] = t
        w.drop(prefix)
        if spill is not None:
            spill.move(fam, prefix)

    def quantize_layer(step, layer, inputs):
        if any(m.startswith(step.prefix + ".") for m in plan):
            return method.layer(layer, step.prefix, inputs, walk.kw, plan, fam)
        return None

    def run_head(j, hidden):
        head_name = head_prefix(cfg.shared_heads, j)
        if head_name not in plan:
            return
        for h in hidden:
            method.observe_head(head_name, norms[j](h), norms[j])
        heads_seen.add(head_name)
        if not cfg.shared_heads:
            timed(head_name, lambda: finish_head(head_name))

    def finish_head(head_name):
        method.finish_head(head_name, w.load(head_name), plan, fam)
        keep(head_name)

    with closing(
        walk.steps(before=quantize_layer, drop=lambda s: keep(s.prefix), progress=progress, desc=desc)
    ) as steps:
        for step, out in steps:
            if step.kind == "exit":
                run_head(step.j, out)  # the trunk goes on from its own layer's output
    if cfg.shared_heads and heads_seen:
        timed(names.SHARED_HEAD, lambda: finish_head(names.SHARED_HEAD))
    for j in range(len(cfg.exits)):  # exit norms: AWQ folds head scales into them
        keep(names.EXIT_NORM.format(j=j))
    fam.stats["layer_seconds"] = seconds
    if dev.type == "cuda":
        fam.stats["peak_device_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    return fam

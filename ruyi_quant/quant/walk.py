"""The streamed walk, written once, and the only hook code.

    load one layer (a trunk layer or an exit's branch) of a family, run every batch through it,
    drop it; stop after the deepest exit needed.

A family on disk is read layer by layer (`Weights`: a meta-device skeleton whose modules are
materialised in float32 when a step needs them), so no step holds the whole float model.
Calibration, streamed evaluation, the importance matrix and branch training each run a `Walk`:

    walk = Walk(family, windows, batch=8)
    for step, outputs in walk.steps():     # outputs: the layer's, one tensor per batch
        if step.kind == "exit": ...        # the exit's branch output; the trunk goes on from its own

`before(step, layer, inputs)` runs on a layer's inputs before its outputs are computed (calibration
quantizes the layer there, and may return the outputs, one per batch: see `Replay`), `observe(module, x)` sees the input of every linear as the outputs are
computed (the importance matrix), and `drop(step)` replaces the default of dropping the layer
(calibration keeps its float tensors and spills its grids first); a step is yielded after its layer
is dropped, so an exit's head never shares memory with its branch. Every batch gets the float32
operations a whole-model forward would give it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import names
from ..log import bar
from ..model import layout
from ..model.familial import FamilialModel, skeleton
from .family import QuantizedFamily


class Weights:
    """Modules of a meta-device skeleton of a family, materialised in float32 on `dev` from the
    family's tensors (lazy ones are read from disk then; quantized linears dequantized) when a
    step needs them, and dropped after: one layer (or head) at a time, whatever the family's size.
    Calibration and evaluation run on it."""

    def __init__(self, src: QuantizedFamily, dev: torch.device):
        self.src, self.dev = src, dev
        self.model = skeleton(src.config)
        self.model.reset_rotary(dev)

    def tensor(self, name: str) -> torch.Tensor:
        mod = names.module_of(name)
        if name.endswith(".weight") and mod in self.src.grids:
            return self.src.grids[mod].dequantize().to(self.dev)
        t = self.src.tensors[self.src.stored_name(name)]
        out = t.to(self.dev, torch.float32)
        return out.clone() if out.data_ptr() == t.data_ptr() else out  # never the source's own

    def load(self, prefix: str):
        mod = self.model.get_submodule(prefix)
        mod.load_state_dict({k: self.tensor(f"{prefix}.{k}") for k in mod.state_dict()}, assign=True)
        return mod

    def floats(self, prefix: str, grids) -> dict[str, torch.Tensor]:
        """A loaded module's float tensors that are not in `grids` (AWQ may have folded scales
        into them), on the CPU. A head tied to the embedding has none of its own."""
        mod = self.model.get_submodule(prefix)
        tied = (
            layout.stored_name(self.src.config.tie_word_embeddings, f"{prefix}.weight") != f"{prefix}.weight"
        )
        return {
            f"{prefix}.{k}": t.detach().cpu()
            for k, t in mod.state_dict().items()
            if names.module_of(f"{prefix}.{k}") not in grids and not tied
        }

    def drop(self, prefix: str) -> None:
        self.model.get_submodule(prefix).to("meta")


def embed(src: QuantizedFamily, ids: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Float32 embeddings of windows [m, T], `batch` windows at a time (one read of the table)."""
    table = src.tensors[layout.EMBED_WEIGHT]
    return [torch.nn.functional.embedding(b, table).float() for b in ids.split(batch)]


class _Captured(Exception):
    """Raised by the last capture hook of a batch: the rest of the layer need not run."""


@torch.no_grad()
def capture_many(layer, linears: dict, xs: list[torch.Tensor], kw: dict, fn) -> None:
    """Run the layer over every batch, calling fn(key, input of linears[key]) each time. Each
    batch's forward stops as soon as every linear has seen its input (q/k/v's inputs cost a
    norm, not a layer)."""
    seen: set = set()

    def hook(key, inp):
        fn(key, inp[0])
        seen.add(key)
        if len(seen) == len(linears):
            raise _Captured

    handles = [
        lin.register_forward_pre_hook(lambda mod, inp, key=key: hook(key, inp))
        for key, lin in linears.items()
    ]
    try:
        for x in xs:
            seen.clear()
            try:
                layer(x, **kw)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()


def capture_inputs(layer, linear, xs: list[torch.Tensor], kw: dict, fn) -> None:
    """Run the layer over every batch, calling fn(input of `linear`) each time."""
    capture_many(layer, {0: linear}, xs, kw, lambda key, x: fn(x))


class Replay:
    """One layer's true-sequential passes (a group's inputs captured, the group quantized, the next
    group's inputs captured through it, ..., the layer's outputs) with no block computed twice.

    A group that ends a block (`layout.Group.ends`: o_proj ends the attention, down_proj the MLP)
    has its inputs kept as they are captured. Once the group is quantized, that block's output
    for each batch is its linear applied to the kept input, computed once and kept: later passes
    return it instead of running the block again. It is the same op on the same tensor, so every
    later value is bit for bit what a whole forward gives. Kept tensors live where the
    activations do (CPU memory when they are offloaded)."""

    def __init__(self, layer, xs: "Activations", kw: dict):
        self.layer, self.xs, self.kw = layer, xs, kw
        self.kept: dict = {}  # group -> the inputs of its linear, per batch
        self.known: dict = {}  # group -> the block's outputs, per batch
        self.i = 0

    def _over(self):
        for self.i, x in enumerate(self.xs):
            yield x

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if self.xs.offload else t

    def _block(self, group):
        linear = self.layer.get_submodule(group.linears[0].name)

        def forward(*args, **kwargs):
            out = self.known[group]
            if len(out) == self.i:  # first pass since the group was quantized
                out.append(self._place(linear(self.kept[group][self.i].to(self.xs.dev))))
                self.kept[group][self.i] = None
            y = out[self.i].to(self.xs.dev)
            return (y, None) if group.ends_pair else y

        return forward

    def _patched(self):
        return _Patched({self.layer.get_submodule(g.ends): self._block(g) for g in self.known})

    def capture(self, group, linears: list[str], fn) -> None:
        """Run the layer over every batch, calling fn(input of the first of `linears`) each time
        (they read one input); a group that ends a block keeps the inputs for its replay."""
        keep = group.ends is not None
        if keep:
            self.kept[group] = []

        def see(x):
            if keep:
                self.kept[group].append(self._place(x))
            fn(x)

        with self._patched():
            capture_inputs(self.layer, self.layer.get_submodule(linears[0]), self._over(), self.kw, see)

    def quantized(self, group) -> None:
        """The group's linears are final: later passes replay the block it ends."""
        if group in self.kept:
            self.known[group] = []

    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs, one per batch."""
        with self._patched():
            return [self.layer(x, **self.kw) for x in self._over()]


class _Patched:
    """Modules whose forward is replaced (an instance attribute) for the duration."""

    def __init__(self, forwards: dict):
        self.forwards = forwards

    def __enter__(self):
        for mod, fn in self.forwards.items():
            mod.forward = fn

    def __exit__(self, *exc):
        for mod in self.forwards:
            del mod.forward


class Activations:
    """Calibration activations, batch by batch: on the compute device when they fit, otherwise
    in CPU memory, each batch moved to the device as it is used (batches are placed so here)."""

    def __init__(self, batches: list[torch.Tensor], dev: torch.device, offload: bool):
        self.dev, self.offload = dev, offload
        self.batches = [x.cpu() if offload else x.to(dev) for x in batches]

    def __iter__(self):
        for x in self.batches:
            yield x.to(self.dev, non_blocking=True) if self.offload else x

    def __len__(self) -> int:
        return len(self.batches)

    def map(self, fn) -> "Activations":
        return Activations([fn(x) for x in self], self.dev, self.offload)


def should_offload(dev: torch.device, n_bytes: int) -> bool:
    """Offload when one layer's inputs would take over a third of the device's free memory
    (they exist twice at a time: a layer's inputs and its outputs)."""
    if dev.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(dev)
    return n_bytes > free / 3


class Walk:
    """Batches of windows streamed through a family's walk (see the module's docstring)."""

    def __init__(
        self,
        src,
        windows: torch.Tensor,
        batch: int,
        dev: torch.device | None = None,
        exits: list[int] | None = None,
        offload: bool = False,
    ):
        self.src = src if isinstance(src, QuantizedFamily) else QuantizedFamily.from_model(src)
        self.dev = dev or torch.device("cpu")
        self.weights = Weights(self.src, self.dev)
        self.xs = Activations(embed(self.src, windows, batch), self.dev, offload)
        # windows of one length: one mask (None: causal) and one rotary table serve every batch
        self.kw = self.weights.model.layer_kwargs(next(iter(self.xs))[:1])
        self.exits = exits
        self.seconds: dict[str, float] = {}  # per layer: load, before, outputs, drop

    @property
    def model(self) -> FamilialModel:
        return self.weights.model

    def plan(self) -> list[layout.Step]:
        cfg = self.src.config
        return list(layout.walk(cfg.exits, cfg.num_layers, self.exits))

    def steps(self, before=None, observe=None, drop=None, progress: bool = False, desc: str = "layers"):
        """Yield (step, outputs) for every step of the walk; a trunk step's outputs become the next
        step's inputs when the loop comes back. Callers close it (`contextlib.closing`), so that an
        error in their loop body erases the progress bar before the error line is printed."""
        for step in bar(self.plan(), desc=desc, unit="layer", enabled=progress):
            t0 = time.perf_counter()
            layer = self.weights.load(step.prefix)
            given = before(step, layer, self.xs) if before is not None else None
            if given is not None:  # the layer's outputs, computed as it was quantized
                assert observe is None, "observe sees the outputs' computation"
                out = Activations(given, self.dev, self.xs.offload)
            else:
                with _Observing(layer, step.prefix, observe):
                    out = self.xs.map(lambda x: layer(x, **self.kw))
            if drop is not None:
                drop(step)
            else:
                self.weights.drop(step.prefix)
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            self.seconds[step.prefix] = round(time.perf_counter() - t0, 3)
            yield step, out
            if step.kind != "exit":
                self.xs = out

    def load(self, prefix: str):
        """Another module (an exit's norm or head) materialised from the family."""
        return self.weights.load(prefix)

    def drop(self, prefix: str) -> None:
        self.weights.drop(prefix)


class _Observing:
    """Forward pre-hooks on every linear of a layer for the duration: observe(module name, input)."""

    def __init__(self, layer, prefix: str, observe):
        self.handles = (
            []
            if observe is None
            else [
                m.register_forward_pre_hook(lambda _m, args, key=f"{prefix}.{n}": observe(key, args[0]))
                for n, m in layer.named_modules()
                if isinstance(m, nn.Linear)
            ]
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

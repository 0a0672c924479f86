"""Which linear gets which grid: the quantization plan shared by every method.

Quantizable modules are every linear of every trunk layer and branch layer, and (optionally)
the heads. Embeddings and norms stay in floating point. Overrides match module names with
shell-style patterns (`model.layers.*.mlp.down_proj`, `lm_head*`); later overrides win, a
skipped module stays skipped, and an override that names a head quantizes it even when `heads`
is off (so "heads at 8 bits, the rest at 4" is one override). Overrides are recipe.Override
objects (pattern, bits, group_size, sym, skip); the bit-width and group-size rules live here,
and recipe validation calls them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, replace

from .. import names
from ..errors import UserError
from ..model import layout
from .kquant import block_type
from .ktypes import module_types
from .pack import BITS

GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}")
    return bits


def check_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(GROUP_SIZES)}")
    return group_size


def act_order(q) -> bool:
    """GPTQ's act-order as the quantize settings ask it: by default on for llama.cpp's blocks (their
    groups are fixed, and it generalised best there: docs/performance.md), off for other grids."""
    return q.gptq.act_order if q.gptq.act_order is not None else bool(q.gguf)


def check_blocks(ftype, method, overrides):
    """quantize.gguf: GPTQ or AWQ into every exit file's llama.cpp types (heads included; bits,
    group_size and sym unused), which no override may change."""
    if ftype and method not in ("gptq", "awq"):
        raise ValueError(f"calibrated K-quants need method gptq or awq, not {method}")
    if ftype and overrides:
        raise ValueError("llama.cpp's type map decides every tensor's type; drop the overrides")
    return ftype


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    ggml: tuple[str, ...] = ()  # llama.cpp block types (quant/kquant.py), most bits first: then
    # bits, group_size and sym are the first type's (codes, sub-block, offset stored or not)

    def __post_init__(self):
        object.__setattr__(self, "ggml", tuple(self.ggml))
        try:
            for t in self.ggml:
                block_type(t)
            if not self.ggml:
                check_bits(self.bits)
            check_group_size(self.group_size)
        except ValueError as e:
            raise UserError(str(e)) from None

    @classmethod
    def blocks(cls, types) -> QuantSpec:
        """The spec of a linear held in llama.cpp's block types `types` (most bits first)."""
        t = block_type(types[0])
        return cls(t.bits, t.sub, not t.offset, tuple(types))

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, k: int) -> int:
        """Columns per group for a linear of k input columns (-1: all of them)."""
        return k if self.group_size == -1 else self.group_size

    def groups(self, k: int) -> int:
        return -(-k // self.width(k))

    def to_json(self) -> dict:
        d = asdict(self)
        if not self.ggml:
            del d["ggml"]
        else:
            d["ggml"] = list(self.ggml)
        return d


def linear_modules(model, heads: bool) -> list[str]:
    """Names of the quantizable linears in execution order: trunk, branches, heads."""
    cfg = model.config
    out = []
    trunk = [names.TRUNK_LAYER.format(i=i) for i in range(cfg.num_layers)]
    branches = [cfg.exit_map(j).branch for j in range(len(cfg.exits))]
    for p in trunk + [b for b in branches if b not in trunk]:
        out += [f"{p}.{lin}" for lin in layout.LAYER_LINEARS]
    if heads:
        out += sorted({layout.head_prefix(cfg.shared_heads, j) for j in range(len(cfg.exits))})
    return out


def make_plan(model, default: QuantSpec, heads: bool = False, overrides=()) -> dict[str, QuantSpec]:
    """Module name -> its grid, for every module that gets quantized."""
    candidates = linear_modules(model, heads=True)
    plan: dict[str, QuantSpec] = {m: default for m in linear_modules(model, heads)}
    skipped: set[str] = set()
    for ov in overrides:
        hits = [m for m in candidates if fnmatch.fnmatchcase(m, ov.pattern)]
        if not hits:
            raise UserError(
                f"override pattern '{ov.pattern}' matches no module (names look like "
                f"{candidates[0]}, {candidates[-1]})"
            )
        for m in hits:
            if ov.skip:
                skipped.add(m)
                continue
            base = plan.get(m, default)
            changes = {
                k: v
                for k, v in (("bits", ov.bits), ("group_size", ov.group_size), ("sym", ov.sym))
                if v is not None
            }
            plan[m] = replace(base, **changes)
    return {m: s for m, s in plan.items() if m not in skipped}


def block_plan(model, ftype: str, heads: bool = True) -> dict[str, QuantSpec]:
    """Module name -> its spec in llama.cpp's block types for the `ftype` files (q4_k_m, q5_k_m,
    q6_k) of every exit: each type llama.cpp's quantizer gives it in some exit's file (ktypes.py).
    A module no block type fits stays float, as llama.cpp writes it F16; a head tied to the
    embedding is the embedding (ggml's quantizer writes it, as llama.cpp does)."""
    cfg = model.config
    heads = heads and not cfg.tie_word_embeddings
    modules = linear_modules(model, heads)

    def shape_of(m: str) -> tuple[int, int]:
        return tuple(model.get_submodule(m).weight.shape)

    types = module_types(cfg, ftype, modules, shape_of)
    return {m: QuantSpec.blocks(types[m]) for m in modules if m in types and "f16" not in types[m]}


def settings_plan(model, q) -> dict[str, QuantSpec]:
    """The plan a recipe's quantize section (recipe.Quantize) makes for a model (a meta one will do)."""
    if q.method == "none":
        return {}
    if q.gguf:
        return block_plan(model, q.gguf)
    return make_plan(model, QuantSpec(q.bits, q.group_size, q.sym), q.heads, q.overrides)

"""A (possibly quantized) family on disk (in memory: quant/family.py).

Directory layout:
    config.json          ruyi_qwen2 config with `quantization_config` when quantized
    model.safetensors    Ruyi's tensor names; a quantized linear has qweight/qzeros/scales/g_idx
                         (GPTQ v1 layout) or qweight/qzeros/scales (AWQ gemm layout, for AWQ
                         results; quant/pack.py) instead of weight
    ruyi_quant.json      method, layout, per-module grids, exits, the recipe that made it
    tokenizer files
Grids are packed into the layout here, when the file is written, and unpacked when it is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from . import __version__, names
from .errors import UserError
from .fsutil import MARKER, read_json, write_marker
from .model.config import read_config
from .model.familial import FamilialModel
from .model.io import check_finite, copy_tokenizer, load_model, read_tensors, weight_files
from .quant.family import QuantizedFamily
from .quant.grid import Grid
from .quant.pack import LAYOUTS
from .quant.plan import QuantSpec
from .recipe import Provenance

__all__ = ["QuantizedFamily", "load_family", "pack_grid", "save_family"]


def pack_grid(layout: str, grid: Grid) -> dict[str, torch.Tensor]:
    """A grid in the tensors of a checkpoint layout (gptq v1 or awq gemm)."""
    try:
        return grid.pack(layout)
    except ValueError as e:
        raise UserError(f"{layout} layout: {e}; choose another export format") from None


def save_family(fam: QuantizedFamily, out_dir: Path, tokenizer_dir: Path | None,
                float_dtype: torch.dtype | None = None) -> None:
    """Write into an existing (temporary) directory; float tensors in the source's dtype."""
    out_dir = Path(out_dir)
    float_dtype = float_dtype or fam.config.source_dtype
    state = {k: (v.to(float_dtype) if v.is_floating_point() else v) for k, v in fam.tensors.items()}
    for module, grid in fam.grids.items():
        state.update({f"{module}.{k}": v for k, v in pack_grid(fam.layout, grid).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    cfg = fam.config.to_json()
    cfg["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    if fam.modules:
        cfg["quantization_config"] = {"quant_method": "ruyi_quant", **fam.quantization_json()}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {"ruyi_quant_version": __version__, "kind": "family", "exits": fam.config.exits,
            "quantization": fam.quantization_json(), "recipe": fam.provenance.model_dump() if fam.provenance else None, "stats": fam.stats}
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    write_marker(out_dir, meta)              # last: it lists every file written


def load_family(path: Path) -> QuantizedFamily:
    """Load a directory written by save_family, or any source checkpoint load_model reads.

    Everything is checked against the manifest and the config before use: every tensor the family
    needs is there (no more), float tensors have their shapes and finite values, and each quantized
    module's packed tensors unpack to its shape and pack back to the same bytes (so the grid in
    ruyi_quant.json is the one they hold). A problem is one UserError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    meta_path = path / MARKER
    if not meta_path.is_file():   # a source checkpoint: Ruyi's own, or a plain qwen2/llama one
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    meta = read_json(meta_path, "ruyi-quant manifest")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a ruyi-quant manifest (expected a JSON object)")
    if meta.get("kind") == "source":   # a float checkpoint we built (ruyi-mini, make-familial)
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    if meta.get("kind") != "family":
        raise UserError(f"{path}: a ruyi-quant '{meta.get('kind')}' directory, not a family "
                        "checkpoint; point at the quantized family (the job's 'family' folder)")
    q = meta.get("quantization") or {}
    layout = q.get("layout", "gptq") if isinstance(q, dict) else None
    if layout not in LAYOUTS or not isinstance(q.get("modules", {}), dict):
        raise UserError(f"{meta_path}: 'quantization' is malformed (needs a layout of "
                        f"{', '.join(LAYOUTS)} and a 'modules' object)")
    try:
        modules = {m: QuantSpec(**s) for m, s in q.get("modules", {}).items()}
        provenance = Provenance.model_validate(meta["recipe"]) if meta.get("recipe") else None
    except (TypeError, ValueError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise UserError(f"{meta_path}: malformed ({msg})") from None
    method, stats = q.get("method", "none"), meta.get("stats", {})
    config = read_config(path)
    with torch.device("meta"):                   # float tensors in the model's own order
        shapes = {n: tuple(t.shape) for n, t in FamilialModel(config).state_dict().items()}
    unknown = [m for m in modules if f"{m}.weight" not in shapes]
    if unknown:
        raise UserError(f"{meta_path}: quantizes {unknown[0]}, which this model does not have")
    wanted = {n for n in shapes if not (n.endswith(".weight") and n[:-7] in modules)}
    if config.tie_word_embeddings:
        wanted.discard(f"{names.SHARED_HEAD}.weight")
    wanted |= {f"{m}.{s}" for m in modules for s in LAYOUTS[layout]}
    files = weight_files(path)
    missing, extra = sorted(wanted - set(files)), sorted(set(files) - wanted)
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing); the family is "
                        "incomplete: quantize it again")
    if extra:
        raise UserError(f"{path}: unexpected tensor {extra[0]} for a family with these modules "
                        f"quantized ({len(extra)} unexpected)")
    tensors = {}
    for name, t in read_tensors(files):
        if name in shapes:
            if tuple(t.shape) != shapes[name]:
                raise UserError(f"{path}: tensor {name} has shape {list(t.shape)}, expected "
                                f"{list(shapes[name])}")
            check_finite(name, t)
        tensors[name] = t
    grids = {m: _unpack_checked(path, layout, m, spec, shapes[f"{m}.weight"], tensors)
             for m, spec in modules.items()}
    order = {n: i for i, n in enumerate(shapes)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order.get(kv[0], len(order))))
    return QuantizedFamily(config=config, tensors=tensors, grids=grids, method=method,
                           layout=layout, provenance=provenance, stats=stats)


def _unpack_checked(path: Path, layout: str, module: str, spec: QuantSpec, shape: tuple,
                    tensors: dict) -> Grid:
    """A module's grid from its packed tensors (popped from `tensors`), which must unpack to the
    linear's shape and pack back to themselves."""
    packed = {s: tensors.pop(f"{module}.{s}") for s in LAYOUTS[layout]}
    problem = None
    try:
        grid = Grid.unpack(layout, packed, spec)
        if grid.shape != tuple(shape):
            problem = f"they hold a [{grid.shape[0]}, {grid.shape[1]}] weight, the model's is {list(shape)}"
        elif any(not torch.equal(v, packed[s]) for s, v in grid.pack(layout).items()):
            problem = f"they are not a {spec.bits}-bit group-{spec.group_size} grid"
    except (ValueError, RuntimeError, IndexError, KeyError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem:
        raise UserError(f"{path}: the packed tensors of {module} disagree with ruyi_quant.json "
                        f"({problem})")
    return grid

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

from . import __version__
from .errors import UserError
from .fsutil import MARKER, write_marker
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
    write_marker(out_dir, meta)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)


def load_family(path: Path) -> QuantizedFamily:
    """Load a directory written by save_family, or any source checkpoint load_model reads."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    meta_path = path / MARKER
    if not meta_path.is_file():   # a source checkpoint: Ruyi's own, or a plain qwen2/llama one
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "source":   # a float checkpoint we built (ruyi-mini, make-familial)
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    if meta.get("kind") != "family":
        raise UserError(f"{path}: a ruyi-quant '{meta.get('kind')}' directory, not a family "
                        "checkpoint; point at the quantized family (the job's 'family' folder)")
    q = meta.get("quantization") or {}
    modules = {m: QuantSpec(**s) for m, s in q.get("modules", {}).items()}
    method, stats = q.get("method", "none"), meta.get("stats", {})
    try:
        provenance = Provenance.model_validate(meta["recipe"]) if meta.get("recipe") else None
    except ValidationError as e:
        raise UserError(f"{meta_path}: its recipe does not validate ({e.errors()[0]['msg']})") from None
    layout = q.get("layout", "gptq")
    files = weight_files(path)
    tensors = {}
    for name, t in read_tensors(files):
        check_finite(name, t)
        tensors[name] = t
    grids = {}
    for m, spec in modules.items():
        for s in LAYOUTS[layout]:
            if f"{m}.{s}" not in tensors:
                raise UserError(f"{path}: quantized module {m} lacks tensor {m}.{s}")
        grids[m] = Grid.unpack(layout, {s: tensors.pop(f"{m}.{s}") for s in LAYOUTS[layout]}, spec)
    config = read_config(path)
    with torch.device("meta"):                   # float tensors in the model's own order
        order = {n: i for i, n in enumerate(FamilialModel(config).state_dict())}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order.get(kv[0], len(order))))
    return QuantizedFamily(config=config, tensors=tensors, grids=grids, method=method,
                           layout=layout, provenance=provenance, stats=stats)

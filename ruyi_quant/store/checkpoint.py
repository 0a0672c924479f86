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
import math
import shutil
from functools import partial
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from .. import __version__, names
from ..errors import UserError, read_json, writing
from ..log import bar
from ..model.config import read_config
from ..model.familial import FamilialModel, familial_state, materialise, skeleton
from ..model.layout import is_layer_bias, stored_name
from ..names import MARKER
from ..quant.family import QuantizedFamily
from ..quant.grid import Grid, LazyGrid
from ..quant.ktypes import FTYPES
from ..quant.pack import LAYOUTS, packed_shapes
from ..quant.plan import QuantSpec
from ..recipe import Provenance
from .files import ListedFiles, write_marker
from .safetensors import Entry, LazyTensors, check_finite, weight_files, write_safetensors

__all__ = ["Spill", "load_family", "load_model", "pack_grid", "save_family", "save_model"]


def pack_grid(layout: str, grid: Grid) -> dict[str, torch.Tensor]:
    """A grid in the tensors of a checkpoint layout (gptq v1 or awq gemm)."""
    try:
        return grid.pack(layout)
    except ValueError as e:
        raise UserError(f"{layout} layout: {e}; choose another export format") from None


def save_family(
    fam: QuantizedFamily,
    out_dir: Path,
    tokenizer_dir: Path | None,
    float_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> None:
    """Write into an existing (temporary) directory; float tensors in the source's dtype. Streamed:
    one tensor (one quantized module's packed tensors) in memory at a time, whatever the family's
    size; the file is byte for byte what safetensors' save_file would write. `progress`: a bar of
    the bytes written (a lazy family's grids are made as they are written: RTN's whole work)."""
    out_dir = Path(out_dir)
    float_dtype = float_dtype or fam.config.source_dtype
    entries = family_entries(fam, float_dtype)
    pbar = bar(
        desc="write", unit="B", total=sum(e.nbytes for e in entries), unit_scale=True, enabled=progress
    )

    def counted(e: Entry) -> Entry:
        def produce():
            t = e.produce()
            pbar.update(e.nbytes)
            return t

        return Entry(e.name, e.shape, e.dtype, produce)

    with pbar:
        write_safetensors(
            out_dir / "model.safetensors", [counted(e) for e in entries], metadata={"format": "pt"}
        )
    cfg = fam.config.to_json()
    cfg["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    if fam.modules:
        cfg["quantization_config"] = {"quant_method": "ruyi_quant", **fam.quantization_json()}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {
        "ruyi_quant_version": __version__,
        "kind": "family",
        "exits": fam.config.exits,
        "quantization": fam.quantization_json(),
        "recipe": fam.provenance.model_dump() if fam.provenance else None,
        "stats": fam.stats,
    }
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    write_marker(out_dir, meta)  # last: it lists every file written


def family_entries(fam: QuantizedFamily, float_dtype: torch.dtype) -> list[Entry]:
    """The tensors of a family checkpoint, each produced when written: floats at float_dtype,
    each quantized module packed in the family's layout once (its parts kept until written)."""
    entries = []
    for n in list(fam.tensors):
        shape, dtype = fam.tensor_info(n)
        d = float_dtype if dtype.is_floating_point else dtype
        entries.append(Entry(n, shape, d, lambda n=n, d=d: fam.tensors[n].to(d)))
    return entries + grid_entries(fam, fam.layout, {m: m for m in fam.grids})


def grid_entries(fam: QuantizedFamily, layout: str, modules: dict[str, str]) -> list[Entry]:
    """The packed tensors of some quantized modules (module -> the name to write it under), each
    module packed once, when its first tensor is written, and its parts kept until written."""
    parts: dict[str, dict[str, torch.Tensor]] = {}

    def part(m: str, s: str) -> torch.Tensor:
        if m not in parts:
            parts[m] = dict(pack_grid(layout, fam.grids[m]))
        t = parts[m].pop(s)
        if not parts[m]:
            del parts[m]
        return t

    entries = []
    for m, new in modules.items():
        grid = fam.grids[m]
        n, k = grid.shape
        for s, (shape, dtype) in packed_shapes(
            layout, n, k, grid.spec.groups(k), grid.spec.bits, grid.spec.ggml
        ).items():
            entries.append(Entry(f"{new}.{s}", shape, dtype, lambda m=m, s=s: part(m, s)))
    return entries


def load_family(path: Path, hashes: bool = True, any_kind: bool = False) -> QuantizedFamily:
    """Open a directory written by save_family, or any source checkpoint load_model reads.

    Lazily: tensors are read from the (memory-mapped) safetensors files when a step needs them, in
    the file's dtype, and quantized modules are unpacked when used (quant.grid.LazyGrid), so a
    family of any size opens in seconds and in little memory. What can be checked from the file
    headers is checked here, before anything is read: every tensor the family needs is there (no
    more), float tensors have their shapes and a float dtype, packed tensors have the shapes their
    grid in ruyi_quant.json implies. What needs the values is checked as each tensor is read:
    finiteness, and that packed tensors unpack and pack back to themselves. A problem is one
    UserError naming the file. A plain qwen2/llama checkpoint opens the same way, as a family of
    one exit under Ruyi's names.

    A directory of ours (a family, or a source we built) is checked against its manifest: every
    listed file present at its size, here; its sha256 as the work reads it (hashes=False: sizes
    only), which the family's `verify()` waits for. any_kind: any other directory of ours that holds
    a checkpoint (an HF export's exit) is read as a source checkpoint too.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    meta_path = path / MARKER
    meta = read_json(meta_path, "ruyi-quant manifest") if meta_path.is_file() else {"kind": "source"}
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a ruyi-quant manifest (expected a JSON object)")
    if meta.get("kind") == "source" or (any_kind and meta.get("kind") != "family"):
        # a source checkpoint: Ruyi's own, or a plain qwen2/llama one
        config = read_config(path)
        plain = config.source_type != "ruyi_qwen2"
        fam = _open_lazily(
            path, config, {}, "gptq", names.plain_to_familial(config.num_layers) if plain else None
        )
        fam.files, fam.directory = _listed(path, meta, hashes), path
        return fam
    if meta.get("kind") != "family":
        raise UserError(
            f"{path}: a ruyi-quant '{meta.get('kind')}' directory, not a family "
            "checkpoint; point at the quantized family (the job's 'family' folder)"
        )
    q = meta.get("quantization") or {}
    layout = q.get("layout", "gptq") if isinstance(q, dict) else None
    if layout not in LAYOUTS or not isinstance(q.get("modules", {}), dict):
        raise UserError(
            f"{meta_path}: 'quantization' is malformed (needs a layout of "
            f"{', '.join(LAYOUTS)} and a 'modules' object)"
        )
    modules = {}
    for m, s in q.get("modules", {}).items():
        try:
            modules[m] = QuantSpec(**s)
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{meta_path}: the grid of {m} is malformed ({e})") from None
    try:
        provenance = Provenance.model_validate(meta["recipe"]) if meta.get("recipe") else None
    except (TypeError, ValueError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise UserError(f"{meta_path}: malformed ({msg})") from None
    fam = _open_lazily(path, read_config(path), modules, layout)
    fam.method, fam.provenance, fam.stats = q.get("method", "none"), provenance, meta.get("stats", {})
    fam.gguf = q.get("gguf")
    if (fam.gguf is not None or layout == "ggml") and (fam.gguf not in FTYPES or layout != "ggml"):
        raise UserError(f"{meta_path}: 'quantization' is malformed (gguf {fam.gguf!r} with layout {layout})")
    fam.files, fam.directory = _listed(path, meta, hashes), path
    return fam


def _listed(path: Path, meta: dict, hashes: bool):
    """After the headers' checks (which name what is wrong more precisely): the manifest's files."""
    return ListedFiles(path, meta, hashes) if isinstance(meta.get("files"), dict) else None


def _open_lazily(
    path: Path, config, modules: dict[str, QuantSpec], layout: str, rename: dict[str, str] | None = None
) -> QuantizedFamily:
    """`rename`: a plain Qwen2/Llama checkpoint's prefixes -> Ruyi's (a family of one exit); a
    Llama layer is a Qwen2 layer whose q/k/v biases are zero."""
    meta_path = path / MARKER
    with torch.device("meta"):  # float tensors in the model's own order
        shapes = {n: tuple(t.shape) for n, t in FamilialModel(config).state_dict().items()}
    unknown = [m for m in modules if f"{m}.weight" not in shapes]
    if unknown:
        raise UserError(f"{meta_path}: quantizes {unknown[0]}, which this model does not have")
    floats = [n for n in shapes if not (n.endswith(".weight") and n[:-7] in modules)]
    floats = [n for n in floats if stored_name(config.tie_word_embeddings, n) == n]  # a tied head
    packed = [f"{m}.{s}" for m in modules for s in LAYOUTS[layout]]
    files = {n: f for n, f in weight_files(path).items() if not n.endswith(names.IGNORED_SUFFIXES)}
    aliases = {}
    if rename is not None:
        renamed = {n: names.rename(n, rename) or n for n in files}
        aliases = {new: n for n, new in renamed.items()}
        files = {renamed[n]: f for n, f in files.items()}
    zero_bias = [n for n in floats if rename is not None and n not in files and is_layer_bias(n)]
    floats = [n for n in floats if n not in zero_bias]
    wanted = set(floats) | set(packed)
    missing, extra = [n for n in floats + packed if n not in files], sorted(set(files) - wanted)
    what = "the family is incomplete: quantize it again" if modules else "the checkpoint is incomplete"
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing); {what}")
    if extra:
        raise UserError(
            f"{path}: unexpected tensor {aliases.get(extra[0], extra[0])} for a "
            f"{config.source_type} model with {config.num_layers} layers and exits "
            f"{config.exits}" + (" and these modules quantized" if modules else "")
        )
    tensors = LazyTensors(
        {n: files[n] for n in floats},
        check=check_finite,
        aliases=aliases,
        order=[n for n in shapes if n in floats or n in zero_bias],
    )
    for n in zero_bias:  # a Llama layer: a Qwen2 layer with zero q/k/v bias
        tensors[n] = torch.zeros(shapes[n], dtype=tensors.info(floats[0])[1])
    reader = LazyTensors({n: files[n] for n in packed})
    for n in floats:
        shape, dtype = tensors.info(n)
        if shape != shapes[n]:
            raise UserError(
                f"{path}: tensor {aliases.get(n, n)} has shape {list(shape)}, expected {list(shapes[n])}"
            )
        if not dtype.is_floating_point:
            raise UserError(
                f"{path}: tensor {aliases.get(n, n)} is {str(dtype).removeprefix('torch.')}, "
                "not a floating-point weight; the checkpoint is corrupt"
            )
    grids = {}
    for m, spec in modules.items():
        n, k = shapes[f"{m}.weight"]
        for s, want in packed_shapes(layout, n, k, spec.groups(k), spec.bits, spec.ggml).items():
            got = reader.info(f"{m}.{s}")
            if got != (tuple(want[0]), want[1]):
                raise UserError(
                    f"{path}: the packed tensors of {m} disagree with ruyi_quant.json "
                    f"({s} is {list(got[0])} {str(got[1]).removeprefix('torch.')}, a "
                    f"{spec.bits}-bit group-{spec.group_size} grid has {list(want[0])} "
                    f"{str(want[1]).removeprefix('torch.')})"
                )
        grids[m] = _stored_grid(path, reader, layout, m, spec, (n, k))
    return QuantizedFamily(config=config, tensors=tensors, grids=grids, layout=layout)


def _stored_grid(
    path: Path, reader, layout: str, module: str, spec: QuantSpec, shape: tuple, act_order: bool | None = None
) -> LazyGrid:
    """A module's grid over its packed tensors in `reader`: unpacked (and checked) when used, the
    stored tensors handed back as they are when their own layout is asked for. act_order None:
    read from g_idx when asked."""
    gptq = layout == "gptq"
    if act_order is None:
        act_order = partial(_g_idx_descends, reader, f"{module}.g_idx") if gptq else False
    return LazyGrid(
        spec,
        shape,
        partial(_unpack_checked, path, layout, module, spec, shape, reader),
        partial(_stored, reader, module, layout),
        act_order=act_order,
        g_idx=reader.loader(f"{module}.g_idx") if gptq else None,
    )


def _g_idx_descends(reader, name: str) -> bool:
    return bool((reader[name].diff() < 0).any())


def _stored(reader, module: str, layout: str, want: str):
    """A module's packed tensors as stored, when the layout asked for is the stored one."""
    return {s: reader[f"{module}.{s}"] for s in LAYOUTS[layout]} if want == layout else None


def _unpack_checked(path: Path, layout: str, module: str, spec: QuantSpec, shape: tuple, reader) -> Grid:
    """A module's grid from its packed tensors, which must unpack to the linear's shape and pack
    back to themselves."""
    packed = {s: reader[f"{module}.{s}"] for s in LAYOUTS[layout]}
    problem = None
    bad = [s for s, t in packed.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        what = "NaN" if torch.isnan(packed[bad[0]]).any() else "Inf"
        raise UserError(
            f"{reader.file(f'{module}.{bad[0]}') or path}: tensor {module}.{bad[0]} contains "
            f"{what} values; the family is corrupt: quantize it again"
        )
    try:
        grid = Grid.unpack(layout, packed, spec)
        if grid.shape != tuple(shape):
            problem = f"they hold a [{grid.shape[0]}, {grid.shape[1]}] weight, the model's is {list(shape)}"
        elif any(not torch.equal(v, packed[s]) for s, v in grid.pack(layout).items()):
            problem = f"they are not a {spec.bits}-bit group-{spec.group_size} grid"
    except (ValueError, RuntimeError, IndexError, KeyError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem:
        raise UserError(
            f"{reader.file(f'{module}.{LAYOUTS[layout][0]}') or path}: the packed tensors of {module} "
            f"disagree with ruyi_quant.json ({problem})"
        )
    return grid


class Spill:
    """Grids moved to disk as soon as a layer is quantized, so that calibrating a family holds one
    layer's grids, not the family's: each layer's packed in the family's layout (lossless: AWQ's
    is chosen only for grids it holds) into a safetensors file of its own in `folder`, then read
    back as LazyGrids when used (the family is then written from them without repacking)."""

    def __init__(self, folder: Path):
        self.folder, self.files = Path(folder), 0

    def move(self, fam: QuantizedFamily, prefix: str) -> None:
        mods = [
            m
            for m, g in fam.grids.items()
            if isinstance(g, Grid) and (m == prefix or m.startswith(prefix + "."))
        ]
        if not mods:
            return
        path = self.folder / f"{self.files:05d}.safetensors"
        self.files += 1
        write_safetensors(path, grid_entries(fam, fam.layout, {m: m for m in mods}))
        reader = LazyTensors({f"{m}.{s}": path for m in mods for s in LAYOUTS[fam.layout]})
        for m in mods:
            g = fam.grids[m]
            fam.grids[m] = _stored_grid(path, reader, fam.layout, m, g.spec, g.shape, g.act_order)


# --- unquantized checkpoints, whole in memory ----------------------------------------------
PROGRESS_BYTES = 200_000_000  # show a progress bar when loading more than this


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def load_model(model_dir: str | Path, dtype: torch.dtype | None = torch.float32) -> FamilialModel:
    """A ruyi_qwen2, qwen2 or llama checkpoint, whole in memory as a FamilialModel on the CPU:
    load_family's checks and tensors (a Llama layer's zero q/k/v biases included), materialised.
    dtype None keeps the checkpoint's floating dtype."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"{model_dir}: no such model directory")
    fam = load_family(model_dir, hashes=False, any_kind=True)
    if fam.grids:
        raise UserError(f"{model_dir}: a quantized family; point at an unquantized checkpoint")
    tensors = fam.tensors
    names_ = list(tensors)
    if dtype is None:  # the file's dtype (not the zero biases', made in it too)
        dtype = next(
            (tensors.info(n)[1] for n in names_ if tensors.info(n)[1].is_floating_point), torch.float32
        )
    big = sum(tensors.info(n)[1].itemsize * math.prod(tensors.info(n)[0]) for n in names_) > PROGRESS_BYTES
    state = {}
    for n in bar(names_, desc="load", unit="tensor", enabled=big):
        t = tensors[n]
        state[n] = t.to(dtype) if t.is_floating_point() else t
    return materialise(skeleton(fam.config), state)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copy2(Path(src) / f, Path(dst) / f)


def save_model(
    model: FamilialModel,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: Path | None = None,
) -> None:
    """Write a ruyi_qwen2 checkpoint (into an existing directory)."""
    out_dir = Path(out_dir)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in familial_state(model).items()}
    with writing(out_dir / "model.safetensors"):
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_json()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)

"""A family -> the GGUF files of a job or of `ruyi-quant export --format gguf`: folder and file
names, llama.cpp's K-quants with our importance matrix, the multi-exit file, and stock per-exit
files copied back out of a multi-exit file."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from ...errors import UserError
from ...log import bar, say
from ...model.layout import exit_folder
from ...quant.family import QuantizedFamily
from .files import base_name, extract_exit, multi_exits, tensor_uses, write_exit, write_multi
from .ggml import block_groups, grid_type
from .imatrix import collect, for_exit, provenance_kv, requantize
from .llamacpp import K_QUANTS, llama_quantize
from .metadata import common_kv
from .ollama import write_modelfile_for
from .tensors import TYPES, EncodedCache, GGUFOptions, check_grid


def label(fam: QuantizedFamily, type_: str) -> str:
    """What a GGUF export mostly holds, for folder and file names: q4_0, q4_1, q8_0, f16, ..."""
    if fam.gguf:
        return fam.gguf
    if type_ != "auto":
        return type_
    kinds = Counter(grid_type(s.bits, s.sym) for s in fam.modules.values())
    if not kinds:
        return "f16"
    kind = kinds.most_common(1)[0][0]
    return kind.name.lower() if kind is not None else "mixed"


# --- the format's contract (exporters/__init__.py) ------------------------------------------
def check(target, ex) -> None:
    """What GGUF files cannot hold: K-quants of a quantized family (llama.cpp's quantizer starts
    from float weights) or in the multi-exit file, scaled RoPE, a grid no ggml type holds exactly
    (or not the type asked for); a family of llama.cpp blocks in another type."""
    if target.config.rope_scaled:
        raw = target.config.raw
        raise UserError(
            "gguf: scaled RoPE is not exported yet; the model uses "
            f"{raw.get('rope_parameters') or raw.get('rope_scaling')}"
        )
    if target.gguf:
        if ex.type not in ("auto", target.gguf):
            raise UserError(
                f"type {ex.type}: this family's grids are llama.cpp's {target.gguf} blocks, written "
                f"as they are; use type auto (or {target.gguf})"
            )
        return
    if ex.type in K_QUANTS and target.plan:
        raise UserError(
            f"type {ex.type}: llama.cpp's K-quants start from float weights, and this "
            "family is already quantized; use type auto, or export an unquantized "
            "family (quantize method none)"
        )
    if ex.type in K_QUANTS and ex.multi:
        raise UserError(f"type {ex.type}: the multi-exit file holds our own grids; drop multi")
    want = TYPES.get(ex.type)
    for m, spec in target.plan.items():
        check_grid(m, spec, want, lambda m=m: block_groups(target.groups(m), target.widths[m]))


def folder(fam: QuantizedFamily, ex) -> str:
    return f"gguf-{label(fam, ex.type)}"


def written(info: dict, out: Path) -> list[str]:
    lines = [
        f"wrote {out / exit_folder(x['exit']) / x['file']} ({x['bytes'] / 1e6:.2f} MB) + Modelfile"
        for x in info["exits"]
    ]
    if info["multi"]:
        m = info["multi"]
        lines.append(
            f"wrote {out / m['file']} ({m['bytes'] / 1e6:.2f} MB, every exit; per-exit files "
            f"together {sum(x['bytes'] for x in info['exits']) / 1e6:.2f} MB)"
        )
    return lines


def export(
    fam: QuantizedFamily, out_root: Path, tokenizer_dir: Path, ex, progress: bool = True, calibration=None
) -> dict:
    """Per-exit GGUF files (each with an Ollama Modelfile) and/or the multi-exit file under
    out_root (a fresh directory), as the GGUFExport settings `ex` say. Returns what was written.
    `calibration`: the Calibration settings K-quants' importance matrix is computed from (default:
    the recipe's default)."""
    from .. import Target

    check(Target.of_family(fam), ex)  # before any file or progress bar
    kquant = ex.type if ex.type in K_QUANTS and not fam.gguf else None
    opt = GGUFOptions(
        type="f16" if kquant else "auto" if fam.gguf else ex.type,
        embed_type=ex.embed_type,
        head_type=ex.head_type,
        name=ex.name,
        license=ex.license,
    )
    base, kind = base_name(fam, opt), label(fam, ex.type)
    out_root.mkdir(parents=True, exist_ok=True)
    info_all: dict = {"exits": [], "multi": None}
    exits = fam.config.exit_list(ex.exits) if ex.per_exit else []
    common = common_kv(fam, tokenizer_dir, opt)  # the tokenizer, read once for every file
    imat = None
    if kquant and ex.imatrix and exits:
        windows, imat_kv = _windows(tokenizer_dir, calibration)
        imat = collect(fam, windows, progress)
    # the trunk is in every exit's file (and the multi-exit one): encode each module once
    cache_dir = out_root / ".encoded"
    cache = (
        EncodedCache(cache_dir, tensor_uses(fam, exits, ex.multi))
        if not kquant and not fam.gguf and len(exits) + bool(ex.multi) > 1
        else None
    )
    try:
        for e in bar(exits, desc="export gguf", unit="exit", enabled=progress):
            d = out_root / exit_folder(e)
            d.mkdir()
            fname = f"{base}-e{e}-{kind}.gguf"
            if kquant:
                f16 = d / "f16.tmp.gguf"
                info = write_exit(fam, e, f16, tokenizer_dir, opt, common)
                info.update(bytes=llama_quantize(f16, d / fname, kquant), file=fname, types=[kquant.upper()])
                if imat is not None:
                    matrices = for_exit(imat, fam.config, fam.config.exit_index(e))
                    info["imatrix_tensors"] = requantize(f16, d / fname, matrices, imat_kv)
                    info["bytes"] = (d / fname).stat().st_size
                f16.unlink()
                write_modelfile_for(d / fname)
            else:
                info = write_exit(fam, e, d / fname, tokenizer_dir, opt, common, cache)
            info_all["exits"].append(info)
        if ex.multi:
            if progress:
                say(f"  writing the multi-exit file {base}-family-{kind}.gguf")
            info_all["multi"] = write_multi(
                fam, out_root / f"{base}-family-{kind}.gguf", tokenizer_dir, opt, common, cache
            )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return info_all


def _windows(tokenizer_dir: Path, calibration):
    """The importance matrix's token windows and the provenance keys that describe them."""
    from ...recipe import Calibration
    from ...text import calib_windows

    cal = calibration or Calibration()
    w = calib_windows(tokenizer_dir, cal)
    return w, provenance_kv(cal, len(w))


def extract(source: Path, exits: list[int] | None, out_root: Path) -> list[dict]:
    """Stock per-exit files copied out of a multi-exit GGUF into out_root/exit-E/ (no
    re-quantization): `NAME-family-TYPE.gguf` -> `NAME-eE-TYPE.gguf`; every exit when None."""
    stem = Path(source).name.removesuffix(".gguf")
    infos = []
    for e in multi_exits(Path(source)) if exits is None else exits:
        d = out_root / exit_folder(e)
        d.mkdir()
        name = stem.replace("-family-", f"-e{e}-") if "-family-" in stem else f"{stem}-e{e}"
        infos.append(extract_exit(Path(source), e, d / f"{name}.gguf"))
    return infos

"""A family -> the GGUF files of a job or of `ruyi-quant export --format gguf`: folder and file
names, llama.cpp's K-quants with our importance matrix, the multi-exit file, and stock per-exit
files copied back out of a multi-exit file."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ...errors import UserError
from ...quant.family import QuantizedFamily
from .files import base_name, extract_exit, multi_exits, tensor_uses, write_exit, write_multi
from .ggml import grid_type
from .imatrix import collect, for_exit, requantize
from .llamacpp import K_QUANTS, llama_quantize
from .metadata import common_kv
from .ollama import write_modelfile_for
from .tensors import EncodedCache, GGUFOptions, check_gguf


def label(fam: QuantizedFamily, type_: str) -> str:
    """What a GGUF export mostly holds, for folder and file names: q4_0, q4_1, q8_0, f16, ..."""
    if type_ != "auto":
        return type_
    kinds = Counter(grid_type(s.bits, s.sym) for s in fam.modules.values())
    if not kinds:
        return "f16"
    kind = kinds.most_common(1)[0][0]
    return kind.name.lower() if kind is not None else "mixed"


def export(fam: QuantizedFamily, out_root: Path, tokenizer_dir: Path, ex, progress: bool = True,
           calib_windows=None) -> dict:
    """Per-exit GGUF files (each with an Ollama Modelfile) and/or the multi-exit file under
    out_root (a fresh directory), as the GGUFExport settings `ex` say. Returns what was written.
    `calib_windows()`: the token windows K-quants' importance matrix is computed from."""
    kquant = ex.type if ex.type in K_QUANTS else None
    if kquant and fam.grids:
        raise UserError(f"type {kquant}: llama.cpp's K-quants start from float weights, and this "
                        "family is already quantized; export the unquantized model (or use type auto)")
    if kquant and ex.multi:
        raise UserError(f"type {kquant}: the multi-exit file holds our own grids; drop multi")
    opt = GGUFOptions(type="f16" if kquant else ex.type, embed_type=ex.embed_type,
                      head_type=ex.head_type, name=ex.name, license=ex.license)
    base, kind = base_name(fam, opt), label(fam, ex.type)
    out_root.mkdir(parents=True, exist_ok=True)
    written: dict = {"exits": [], "multi": None}
    exits = fam.config.exit_list(ex.exits) if ex.per_exit else []
    check_gguf(fam, opt)       # refuse a grid GGUF cannot hold before any file or progress bar
    common = common_kv(fam, tokenizer_dir, opt)        # the tokenizer, read once for every file
    imat = None
    if kquant and ex.imatrix and exits:
        windows, imat_kv = calib_windows()
        imat = collect(fam, windows, progress)
    # the trunk is in every exit's file (and the multi-exit one): encode each module once
    cache_dir = out_root / ".encoded"
    cache = (EncodedCache(cache_dir, tensor_uses(fam, exits, ex.multi))
             if not kquant and len(exits) + bool(ex.multi) > 1 else None)
    try:
        for e in tqdm(exits, desc="export gguf", unit="exit", disable=not progress, leave=False):
            d = out_root / f"exit-{e}"
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
            written["exits"].append(info)
        if ex.multi:
            if progress:
                tqdm.write(f"  writing the multi-exit file {base}-family-{kind}.gguf")
            written["multi"] = write_multi(fam, out_root / f"{base}-family-{kind}.gguf", tokenizer_dir,
                                           opt, common, cache)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return written


def extract(source: Path, exits: list[int] | None, out_root: Path) -> list[dict]:
    """Stock per-exit files copied out of a multi-exit GGUF into out_root/exit-E/ (no
    re-quantization): `NAME-family-TYPE.gguf` -> `NAME-eE-TYPE.gguf`; every exit when None."""
    stem = Path(source).name.removesuffix(".gguf")
    infos = []
    for e in (multi_exits(Path(source)) if exits is None else exits):
        d = out_root / f"exit-{e}"
        d.mkdir()
        name = stem.replace("-family-", f"-e{e}-") if "-family-" in stem else f"{stem}-e{e}"
        infos.append(extract_exit(Path(source), e, d / f"{name}.gguf"))
    return infos

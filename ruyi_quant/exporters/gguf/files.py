"""The files: one stock `qwen2` (or `llama`) GGUF per exit, one multi-exit file (architecture
`ruyi`) that holds the trunk once with every branch layer, norm and head and the family's
config, and `extract_exit`, which copies a stock per-exit file out of a multi-exit one with
tensor bytes untouched. The contract is exporters/gguf.md.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import Keys

from ... import names
from ...errors import UserError, name_problem
from ...model import layout
from ...model.config import parse_config
from ...quant.family import QuantizedFamily
from ...quant.ktypes import exit_types
from .metadata import RuyiKeys, common_kv, exit_kv, read_kv, size_label, write_gguf
from .ollama import write_modelfile
from .tensors import (
    ARCH,
    BLOCK_FILE_TYPES,
    MULTI_ARCH,
    EncodedCache,
    GGUFOptions,
    exit_arch,
    family_arrays,
)


def base_name(fam: QuantizedFamily, opt: GGUFOptions) -> str:
    """The files' stem: the name given (one path component, checked with the settings), else the
    model's folder name, else "model"."""
    if opt.name:
        return opt.name
    src = str((fam.provenance.model if fam.provenance else None) or "model")
    name = Path(src.removeprefix("builtin:")).name
    return "model" if name_problem(name) else name


def exit_arrays(fam: QuantizedFamily, j: int, opt: GGUFOptions, cache: EncodedCache | None = None):
    exit_map = fam.config.exit_map(j)
    tensors = fam.exit_tensor_names(j)
    pairs = [(f, names.gguf_name(exit_map.rename(f))) for f in tensors]
    return family_arrays(fam, pairs, opt, cache, exit_blocks(fam, j))


def exit_blocks(fam: QuantizedFamily, j: int) -> dict[str, str] | None:
    """{module: block type} of exit j's file when the family's grids are llama.cpp blocks."""
    if not fam.gguf:
        return None
    modules = [n.removesuffix(".weight") for n in fam.exit_tensor_names(j) if n.endswith(".weight")]
    return exit_types(fam.config, fam.gguf, j, modules, fam.linear_shape)


def multi_blocks(fam: QuantizedFamily) -> dict[str, str] | None:
    """{module: block type} of the multi-exit file of a family in llama.cpp's blocks: one type per
    module, the one with the most bits among those its exits' files give it (a trunk layer no
    exit's file holds in fewer bits than its own); the embedding as in every exit's file."""
    if not fam.gguf:
        return None
    last = exit_blocks(fam, len(fam.config.exits) - 1)
    embed = {m: t for m, t in last.items() if m not in fam.grids and layout.role(m) == "embedding"}
    return {**embed, **{m: g.spec.ggml[0] for m, g in fam.grids.items()}}


def tensor_uses(fam: QuantizedFamily, exits: list[int], multi: bool) -> Counter:
    """How many of the files an export writes (exits' files, the multi-exit file) hold each
    familial tensor: what an EncodedCache keeps."""
    cfg = fam.config
    uses = Counter(f for e in exits for f in fam.exit_tensor_names(cfg.exit_index(e)))
    return uses + Counter(fam.weight_names()) if multi else uses


def write_exit(
    fam: QuantizedFamily,
    exit: int,
    path: Path,
    tok_dir: Path,
    opt: GGUFOptions = GGUFOptions(),
    common: list[tuple] | None = None,
    cache: EncodedCache | None = None,
) -> dict:
    """A stock qwen2 (or llama) GGUF of one exit. `common`: common_kv(fam, tok_dir, opt) when the caller
    writes several files (it reads the tokenizer); `cache`: the encoded tensors they share."""
    cfg = fam.config
    j = cfg.exit_index(exit)
    arrays = exit_arrays(fam, j, opt, cache)
    params = fam.size(fam.exit_tensor_names(j))[0]
    arch = exit_arch(fam)
    kv = exit_kv(cfg, j, params, base_name(fam, opt), arch) + (common or common_kv(fam, tok_dir, opt))
    size = write_gguf(Path(path), arch, kv, arrays, BLOCK_FILE_TYPES.get(fam.gguf))
    write_modelfile(Path(path), kv)
    return {
        "exit": cfg.exits[j],
        "file": Path(path).name,
        "bytes": size,
        "tensor_bytes": sum(int(a.nbytes) for _, a, _ in arrays),
        "types": sorted({t.name for _, _, t in arrays}),
    }


def write_multi(
    fam: QuantizedFamily,
    path: Path,
    tok_dir: Path,
    opt: GGUFOptions = GGUFOptions(),
    common: list[tuple] | None = None,
    cache: EncodedCache | None = None,
) -> dict:
    """One file: every tensor of the family once, the family's config, the exit list."""
    pairs = [(f, names.gguf_multi_name(f)) for f in fam.weight_names()]
    arrays = family_arrays(fam, pairs, opt, cache, multi_blocks(fam))
    kv = [
        (Keys.General.NAME, base_name(fam, opt), V.STRING, None),
        (Keys.General.SIZE_LABEL, size_label(fam.size()[0]), V.STRING, None),
        (RuyiKeys.CONFIG, json.dumps(fam.config.to_json(), sort_keys=True), V.STRING, None),
        (RuyiKeys.EXIT_ARCHITECTURE, exit_arch(fam), V.STRING, None),
    ]
    kv += common or common_kv(fam, tok_dir, opt)
    size = write_gguf(Path(path), MULTI_ARCH, kv, arrays, BLOCK_FILE_TYPES.get(fam.gguf))
    return {"file": Path(path).name, "bytes": size, "tensor_bytes": sum(int(a.nbytes) for _, a, _ in arrays)}


def _read_multi(multi_path: Path):
    """(reader, family config) of a multi-exit file, or a one-line error."""
    try:
        r = gguf.GGUFReader(str(multi_path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
        raise UserError(f"{multi_path}: not a GGUF file ({e})") from None
    arch = r.fields.get(Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != MULTI_ARCH or RuyiKeys.CONFIG not in r.fields:
        raise UserError(
            f"{multi_path}: not a ruyi-quant multi-exit GGUF (architecture "
            f"'{arch.contents() if arch else None}'); export one with --multi"
        )
    return r, parse_config(json.loads(r.fields[RuyiKeys.CONFIG].contents()), where=str(multi_path))


def multi_exits(multi_path: Path) -> list[int]:
    """The exits a multi-exit file holds."""
    return list(_read_multi(Path(multi_path))[1].exits)


def extract_exit(multi_path: Path, exit: int, path: Path) -> dict:
    """A stock per-exit file copied out of a multi-exit file: tensor bytes untouched."""
    multi_path = Path(multi_path)
    r, cfg = _read_multi(multi_path)
    j = cfg.exit_index(exit)
    arrays, params = [], 0
    for t in r.tensors:
        new = names.gguf_multi_to_exit(t.name, cfg.exit_map(j))
        if new is None:
            continue
        qtype = T(t.tensor_type)
        arrays.append((new, np.asarray(t.data), qtype))
        params += int(t.n_elements)
    arrays.sort(key=lambda a: _exit_order(a[0]))
    kv, _, file_type = read_kv(
        r, skip=(Keys.General.NAME, Keys.General.SIZE_LABEL, RuyiKeys.CONFIG, RuyiKeys.EXIT_ARCHITECTURE)
    )
    mix = file_type if file_type in BLOCK_FILE_TYPES.values() else None  # llama.cpp's mixes kept
    base = r.fields[Keys.General.NAME].contents()
    arch = r.fields.get(RuyiKeys.EXIT_ARCHITECTURE)
    arch = arch.contents() if arch is not None else ARCH
    kv = exit_kv(cfg, j, params, base, arch) + kv
    size = write_gguf(Path(path), arch, kv, arrays, mix)
    write_modelfile(Path(path), kv)
    return {"exit": cfg.exits[j], "file": Path(path).name, "bytes": size}


def _exit_order(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if name.startswith("token_embd") else 2, 0, name)

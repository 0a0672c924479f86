"""Files: the cache directory, all-or-nothing output directories, checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

MARKER = "ruyi_quant.json"          # every directory we write carries this file


def cache_dir() -> Path:
    return Path(os.environ.get("RUYI_QUANT_CACHE", Path.home() / ".cache" / "ruyi-quant"))


def write_marker(directory: Path, meta: dict) -> None:
    """The marker file that says a directory is ours, with what it holds (`kind`, ...)."""
    (Path(directory) / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def is_ours(directory: Path) -> bool:
    """Whether a directory carries our marker: a JSON object with a `kind` (every writer sets one;
    an empty or foreign ruyi_quant.json does not make a directory ours)."""
    path = Path(directory) / MARKER
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("kind"), str)


def check_output_dir(path: Path, force: bool = True, inputs: tuple = ()) -> None:
    """Refuse to overwrite a directory that is not ours (or, without force, any existing one),
    and an output that is, holds or lies inside one of the command's inputs."""
    path = Path(path)
    out = path.resolve()
    for src in (p for p in inputs if Path(p).exists()):   # builtin names are not paths
        s = Path(src).resolve()
        if out == s or s.is_relative_to(out) or out.is_relative_to(s):
            raise UserError(f"{path}: is, holds or lies inside the input {src}; choose another "
                            "output path")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory; choose another output path")
        if any(path.iterdir()) and not is_ours(path):
            raise UserError(f"{path}: exists and was not written by ruyi-quant; choose another "
                            "output path or remove it")
        if not force:
            raise UserError(f"{path}: exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary directory beside `path`; on success it replaces `path`, else vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (what `du --apparent-size` adds up)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

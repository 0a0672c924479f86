"""Files: the cache directory, output checks, locks, all-or-nothing output directories, manifests,
and reading JSON/text so that a bad file is one line naming it.

Every directory we write carries `ruyi_quant.json`: a manifest with the tool, its version, the
directory's `kind` and the sha256 of every other file in it (`files`). A directory is ours only
when that manifest is valid and lists every file in the directory; `--force` replaces only such a
directory, so it never removes a file we did not write (a listed file that changed is ours,
damaged, and is rewritten).

An output is written under a lock (`.NAME.lock` beside it, flock: released by the kernel when a
run dies) into a temporary sibling `.NAME.tmp-*` that replaces NAME when the work succeeds; a
run that holds the lock removes the temporary siblings that dead runs left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import UserError, write_problem, writing
from ..names import MARKER

TOOL = "ruyi-quant"
TMP_SUFFIX = ".tmp-XXXXXXXX"  # what mkdtemp adds to ".NAME" (8 random characters)
DEEPEST = 96  # longest path we write inside an output (hf-gptq/exit-NN/...)


def cache_dir() -> Path:
    return Path(os.environ.get("RUYI_QUANT_CACHE", Path.home() / ".cache" / "ruyi-quant"))


# --- manifests and ownership ---------------------------------------------------------------
def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listing(directory: Path) -> list[str]:
    """Every file under a directory but its top-level marker, as sorted posix paths."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if (p.is_file() or p.is_symlink()) and p != directory / MARKER
    )


def write_marker(directory: Path, meta: dict) -> dict:
    """Write the manifest: `meta` (which must have a `kind`) with the tool, its version and the
    sha256 and size of every file now in the directory. Returns the file list."""
    from .. import __version__

    directory = Path(directory)
    listing = _listing(directory)
    files = {p: sha256(directory / p) for p in listing}
    sizes = {p: (directory / p).stat().st_size for p in listing}
    manifest = {"tool": TOOL, "ruyi_quant_version": __version__, **meta, "files": files, "sizes": sizes}
    (directory / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    return files


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a directory of ours, or None when its marker is missing or not ours."""
    try:
        meta = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (
        isinstance(meta, dict)
        and meta.get("tool") == TOOL
        and isinstance(meta.get("kind"), str)
        and isinstance(meta.get("files"), dict)
    ):
        return None
    return meta


class ListedFiles:
    """The files a directory's manifest lists, checked as the directory is read: every one present
    with its listed size, at once; its sha256 in a background thread while the work reads the
    files, which `verify()` waits for (a command calls it before its output is renamed into place,
    so that nothing made from a damaged input is ever written)."""

    def __init__(self, directory: Path, meta: dict, hashes: bool = True):
        self.directory, self.kind = Path(directory), meta.get("kind", "directory")
        files, sizes = meta.get("files") or {}, meta.get("sizes") or {}
        for rel in files:
            p = self.directory / rel
            if not p.is_file():
                raise UserError(
                    f"{p}: listed in {MARKER} but missing; the {self.kind} is damaged: "
                    "restore it or write it again"
                )
            if isinstance(sizes.get(rel), int) and p.stat().st_size != sizes[rel]:
                raise UserError(
                    f"{p}: {p.stat().st_size} bytes, {MARKER} lists {sizes[rel]}; the "
                    f"{self.kind} is damaged: restore it or write it again"
                )
        self.files, self.bad, self.thread = files, None, None
        if hashes and files:
            self.thread = threading.Thread(target=self._hash, daemon=True, name="sha256")
            self.thread.start()

    def _hash(self) -> None:
        for rel, h in self.files.items():
            try:
                same = sha256(self.directory / rel) == h
            except OSError:
                same = False
            if not same:
                self.bad = rel
                return

    def verify(self) -> None:
        """Wait for the sha256 of every listed file; a UserError naming the first that differs."""
        if self.thread is not None:
            self.thread.join()
        if self.bad is not None:
            raise UserError(
                f"{self.directory / self.bad}: its sha256 is not the one {MARKER} lists (it "
                f"changed after it was written); the {self.kind} is damaged: restore it or "
                "write it again"
            )


def foreign_files(directory: Path) -> list[str] | None:
    """Files in a directory that its manifest does not list (someone else's); None when the
    directory has no valid manifest at all. A listed file that changed is ours, damaged: a rerun
    replaces it."""
    meta = read_manifest(directory)
    if meta is None:
        return None
    return [p for p in _listing(directory) if p not in meta["files"]]


def intact(directory: Path) -> bool:
    """Ours, and every listed file present with its sha256."""
    meta = read_manifest(directory)
    return (
        meta is not None
        and foreign_files(directory) == []
        and all(
            (Path(directory) / p).is_file() and sha256(Path(directory) / p) == h
            for p, h in meta["files"].items()
        )
    )


def is_ours(directory: Path) -> bool:
    """A valid manifest that lists every file in the directory."""
    return foreign_files(directory) == []


# --- output checks -------------------------------------------------------------------------


def check_writable(path: Path, flag: str = "--out", directory: bool = True) -> None:
    """Fail now, not after the work, when `path` could not be written: a name too long (for it or
    its temporary sibling), a path over the system's limit, a parent that is a file, a location
    where nothing can be created (read-only, permissions)."""
    path = Path(os.path.abspath(path))
    name_max = 255
    for part in path.parts[1:]:
        if len(part.encode()) > name_max:
            raise UserError(f"{flag} {path}: the name '{part[:40]}...' is longer than {name_max} bytes")
    if len(f".{path.name}{TMP_SUFFIX}".encode()) > name_max:
        raise UserError(
            f"{flag} {path}: the name is too long for its temporary sibling "
            f"(at most {name_max - len(TMP_SUFFIX) - 1} bytes)"
        )
    limit = 4096 - (DEEPEST if directory else 0)
    if len(str(path).encode()) + len(TMP_SUFFIX) + 1 > limit:
        raise UserError(
            f"{flag} {path}: the path is too long (at most {limit - len(TMP_SUFFIX) - 1} "
            "bytes, for the files written inside it)"
        )
    if path.is_dir() and not directory:
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    try:  # os.access says yes to root even on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".ruyi-quant-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


def check_output_dir(
    path: Path, force: bool = True, inputs: tuple = (), flag: str = "--out", kind: str | None = None
) -> None:
    """Refuse an output that cannot be written, that is not ours, that is ours but of another
    `kind` than the one to be written (a family, a job, an export, an eval: not even with force),
    without force any existing one, or that is, holds or lies inside one of the command's inputs."""
    path = Path(path)
    out = path.resolve()
    for src in (p for p in inputs if p is not None and Path(p).exists()):  # builtin names are not paths
        s = Path(src).resolve()
        if out == s or s.is_relative_to(out) or out.is_relative_to(s):
            raise UserError(
                f"{flag} {path}: is, holds or lies inside the input {src}; choose another output path"
            )
    check_writable(path, flag)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path}: exists and is not a directory; choose another output path")
        if any(path.iterdir()):
            bad = foreign_files(path)
            if bad is None:
                raise UserError(
                    f"{flag} {path}: exists and was not written by ruyi-quant; choose "
                    "another output path or remove it"
                )
            if bad:
                raise UserError(
                    f"{flag} {path}: holds {bad[0]}, which ruyi-quant did not write "
                    f"({len(bad)} such file(s)); move it away or choose another output path"
                )
            held = read_manifest(path)["kind"]
            if kind is not None and held != kind:
                article = "an" if kind[0] in "aeiou" else "a"
                raise UserError(
                    f"{flag} {path}: holds a ruyi-quant {held}, which {article} {kind} "
                    "never replaces (not even with --force); choose another output path"
                )
        if not force:
            raise UserError(f"{flag} {path}: exists; pass --force to replace it")


# --- locks and all-or-nothing outputs ------------------------------------------------------
@contextlib.contextmanager
def output_lock(path: Path, flag: str = "--out"):
    """Hold `.NAME.lock` beside `path` for the duration; a second writer gets a UserError. The lock
    file is removed on release (the inode check makes that safe against a racing opener)."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{flag} {path}: another ruyi-quant run is writing it (holds {lock.name}); "
                "wait for it or choose another output path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: try again
    try:
        for kind in ("tmp", "old"):  # temporaries of dead runs
            for stale in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
                _remove(stale)
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size == 0:  # ours are empty: never remove a file someone wrote
                os.unlink(lock)
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


LEFTOVER = re.compile(r"\.(.+)\.(?:tmp-[a-z0-9_]{8}|old-\d+|lock)")  # what our runs leave beside NAME


def sweep(folder: Path) -> None:
    """Remove what dead runs left in a folder: the temporaries, old copies and lock files of every
    output whose lock nobody holds (a live run's are left alone). Every run that touches a folder
    calls it, whether or not it then writes there."""
    folder = Path(folder)
    try:
        names = {
            m.group(1)
            for p in folder.iterdir()
            if (m := LEFTOVER.fullmatch(p.name))
            and not (p.name.endswith(".lock") and (not p.is_file() or p.stat().st_size))
        }
    except OSError:
        return
    for name in sorted(names):
        try:
            with output_lock(folder / name):
                pass
        except (UserError, OSError):  # held by a live run, or a folder we may not write
            continue


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(
    path: Path,
    force: bool = True,
    inputs: tuple = (),
    flag: str = "--out",
    check: bool = True,
    kind: str | None = None,
):
    """Yield a temporary directory beside `path`; on success it replaces `path`, else vanishes
    (with any parent directories it had to create). Holds `path`'s lock throughout and checks the
    output again under it (check=False: a cache entry, ours by where it is)."""
    path = Path(path)
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with output_lock(path, flag):
            sweep(path.parent)
            if check:
                check_output_dir(path, force=force, inputs=inputs, flag=flag, kind=kind)
            with scratch_dir(path) as tmp:
                try:
                    yield tmp
                except UserError:
                    raise
                except Exception as e:
                    problem = write_problem(e, tmp)
                    if problem is None:
                        raise
                    raise UserError(_refused(e, problem, tmp, path, flag)) from None
                normal_modes(tmp)
                if path.exists():
                    old = path.with_name(f".{path.name}.old-{os.getpid()}")
                    path.rename(old)
                    tmp.rename(path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(path)
                ok = True
    finally:
        if not ok:
            for d in missing:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()


def _refused(e: BaseException, problem: str, tmp: Path, path: Path, flag: str) -> str:
    """The one line for an OS error inside an output's work: the file it names (under the output's
    own name, not its temporary one), else the output."""
    name = getattr(e, "filename", None)
    full = problem in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)) or "stopped short" in problem
    hint = "free some space or choose another output path" if full else "choose another output path"
    if (
        name
        and Path(name).parent.name.startswith(f".{path.name}.tmp-")
        and not Path(name).is_relative_to(tmp)
    ):
        return f"{flag} {path}: cannot write its scratch files beside it ({problem}); {hint}"
    if name and not Path(name).is_relative_to(tmp):
        return f"{name}: {problem}"  # an input that could not be read
    where = path / Path(name).relative_to(tmp) if name else path
    return f"{flag} {where}: cannot write it ({problem}); {hint}"


@contextlib.contextmanager
def scratch_dir(path: Path):
    """A temporary directory beside `path`, named `.NAME.tmp-*` (so that a run killed on the way
    leaves nothing the next holder of `path`'s lock does not remove), removed on leaving unless
    it was renamed away."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(path).name}.tmp-", dir=Path(path).parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def normal_modes(root: Path) -> None:
    """Files 0666 and directories 0777 less the umask, as a plain `open`/`mkdir` would make them
    (mkdtemp makes 0700 and safetensors writes 0600, which other users of a machine cannot read)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for p in Path(root).rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_file(path: Path, text: str, flag: str = "--out") -> None:
    """Write a text file whole or not at all (a temporary sibling renamed over it, under the lock)."""
    path = Path(path)
    with output_lock(path, flag):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with writing(path), os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def check_cache(path: Path) -> None:
    """Before building into the cache: the cache directory must be writable."""
    try:
        check_writable(path, "RUYI_QUANT_CACHE")
    except UserError as e:
        raise UserError(
            f"{e} (the cache for built-in models; set RUYI_QUANT_CACHE to a writable directory)"
        ) from None


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (what `du --apparent-size` adds up)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

"""The one exception a user can cause, and the OS failures that are the user's too (a full disk,
permissions): the CLI prints either as one line and exits with code 2. Beside them, the checked
readers (a bad JSON or text file is one line naming it) and the rule for names a user gives to files
and folders."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input: a missing path, a malformed config, an exit the model lacks, ...

    The message must name the input and say what to do; it is shown without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C (exit code 143)."""


def require(module: str, what: str, install: str) -> None:
    """A UserError naming what needs an optional package that is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module} ({install})")


OS_ERRORS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EFBIG,
    errno.EMFILE,
    errno.EIO,
)
# the OS errors a user can cause (a full disk, permissions, ...): one line and exit code 2, not a bug


# --- failed writes -------------------------------------------------------------------------
def write_problem(e: BaseException, path: Path | None = None) -> str | None:
    """The reason a write failed, in the OS's words, when the OS refused it (disk full, quota,
    read-only, ...); None when the failure is a bug. Writers lose the errno in two ways: numpy's
    `tofile` (GGUF tensors) reports only a short write, and safetensors' (Rust) writer puts the OS
    error in its message."""
    if isinstance(e, OSError) and e.errno in OS_ERRORS:
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    m = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", text)  # Rust's io::Error, shown or debugged
    code = int(m.group(1) or m.group(2)) if m else None
    if code in OS_ERRORS:
        return os.strerror(code)
    if isinstance(e, OSError) and e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", text):
        if too_little_space(path, 1 << 20):
            return os.strerror(errno.ENOSPC)
        return f"the write stopped short ({text}; {free_bytes(path)} bytes free there)"
    return None


def os_error_line(e: OSError) -> str | None:
    """The one line for an OSError the OS refused (`write_problem`), naming its file; None for a bug."""
    problem = write_problem(e, e.filename)
    if problem is None:
        return None
    return f"{e.filename}: {problem}" if e.filename else problem


def too_little_space(path: Path | None, need: int) -> bool:
    """Whether the file system that `path` would be on has fewer than `need` bytes free (for
    writers that report a failure without the OS's reason)."""
    free = free_bytes(path)
    return free is not None and free < need


def free_bytes(path: Path | None) -> int | None:
    """Bytes free on the file system that `path` is (or would be) on; None when unknown."""
    if path is None:
        return None
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: Path):
    """Around one file's writer: a write the OS refused becomes an OSError that names the file and
    gives the OS's reason (atomic_dir, or the CLI, makes it one line)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        problem = write_problem(e, path)
        if problem is None or (isinstance(e, OSError) and e.filename):  # a bug, or names its file
            raise
        code = e.errno if isinstance(e, OSError) and e.errno in OS_ERRORS else errno.EIO
        raise OSError(code, problem, str(path)) from None


# --- checked readers ----------------------------------------------------------------------
def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 file is one UserError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read this {what} ({e.strerror})") from None
    if b"\x00" in data:
        raise UserError(f"{path}: binary data (NUL bytes), not a UTF-8 text {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_json(path: Path, what: str = "JSON file"):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


# --- names a user gives to files and folders -----------------------------------------------
NAME_MAX = 200  # bytes of a name we make a file or folder of (with room to
# add "-eNN-q4_k_m.gguf" and the temporary suffix)


def name_problem(name: str) -> str | None:
    """Why a name given for a file or folder (an export's `--name`, a job's name, an export's
    folder) is not one plain path component inside its folder, or None when it is: not empty, no
    '/' or '\\', not '.', '..' or any hidden name (a leading '.': our temporaries look so), no
    control characters, at most NAME_MAX bytes."""
    if not name or not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator; give a plain name (one path component)"
    if name.startswith("."):
        return "starts with '.'; give a plain name (not '.', '..' or a hidden name)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if len(name.encode()) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return None

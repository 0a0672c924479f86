"""What a run tells: the library warns through logging (logger `ruyi_quant`), which the CLI shows
as one stderr line each (`ruyi-quant: warning: ...`); the progress of every long step (`bar`: a
progress bar on a terminal, one line as the step starts and one as it ends in a log); and the
seconds and peak memory of each stage of a job (`Stages`).

Seconds and peak memory of each stage of a job (the job's JSON and its terminal lines).

Peak RSS is the kernel's high-water mark (VmHWM), reset at the start of each stage where Linux
allows it (writing 5 to /proc/self/clear_refs), so each stage reports its own peak; elsewhere the
process's peak so far (getrusage). On CUDA, the peak device memory torch allocated in the stage.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"ruyi-quant: {record.levelname.lower()}: {record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run more than once, as in tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


_STDERR = _Stderr()
_STDERR.setFormatter(_OneLine())


def log_to_stderr() -> None:
    """The library's warnings (logging, logger `ruyi_quant`) as one stderr line each."""
    log = logging.getLogger("ruyi_quant")
    if _STDERR not in log.handlers:
        log.addHandler(_STDERR)
    log.setLevel(logging.WARNING)


def peak_rss_bytes() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _terminal() -> bool:
    return getattr(sys.stderr, "isatty", lambda: False)()


def bar(iterable=None, *, desc: str, unit: str, total=None, enabled: bool = True, unit_scale=False):
    """A progress bar over iterable (or updated by hand: total, .update(n)) on stderr: tqdm's on a
    terminal; elsewhere (a pipe, a log file) one line as it starts and one as it ends, with no
    carriage returns. `enabled` False: silent."""
    if enabled and not _terminal():
        return _Lines(iterable, desc, unit, total, unit_scale)
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, unit=unit, total=total, unit_scale=unit_scale, disable=not enabled, leave=False
    )


def say(text: str) -> None:
    """A line on stdout among progress bars (they redraw below it on a terminal)."""
    from tqdm.auto import tqdm

    tqdm.write(text)


class _Lines:
    """`bar` when stderr is not a terminal: `desc: N unit ...` as it starts, `desc: N unit in S s`
    as it ends (exhausted or closed; nothing more when an error stops it)."""

    def __init__(self, iterable, desc, unit, total, unit_scale):
        self.iterable, self.desc, self.unit, self.scale = iterable, desc, unit, unit_scale
        self.total = total if total is not None else _len(iterable)
        self.n, self.t0, self.closed = 0, time.perf_counter(), False
        print(f"{desc}: {self._count(self.total)} ...", file=sys.stderr, flush=True)

    def _count(self, n) -> str:
        if n is None:
            return self.unit + "s"
        if self.scale:
            return f"{n / 1e9:.2f} G{self.unit}" if n >= 1e9 else f"{n / 1e6:.1f} M{self.unit}"
        return f"{n} {self.unit}{'' if n == 1 else 's'}"

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            took = time.perf_counter() - self.t0
            print(f"{self.desc}: {self._count(self.n)} in {took:.1f} s", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:  # a failed step's error line says what happened
            self.close()


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


class Stages:
    def __init__(self):
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        import torch

        cuda = torch.cuda.is_available()
        reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        row = {"stage": name, "seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_bytes() / 1e9}
        if cuda:
            row["peak_device_gb"] = torch.cuda.max_memory_allocated() / 1e9
        self.rows.append(row)

    def line(self, row: dict) -> str:
        dev = f", device {row['peak_device_gb']:.2f} GB" if "peak_device_gb" in row else ""
        return f"{row['stage']}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB{dev}"

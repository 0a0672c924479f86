"""What a run tells: the library warns through logging (logger `ruyi_quant`), which the CLI shows
as one stderr line each (`ruyi-quant: warning: ...`); and the seconds and peak memory of each stage
of a job (`Stages`).

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

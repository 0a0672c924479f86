"""The library warns through logging (logger `ruyi_quant`); the CLI shows each warning as one
stderr line: `ruyi-quant: warning: ...`."""

from __future__ import annotations

import logging
import sys


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

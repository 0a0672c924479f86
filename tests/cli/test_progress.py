"""What a user sees while a lazy family is quantized and exported: a progress bar on a terminal,
and in a pipe (a log file) one line as each step starts and one as it ends, never a carriage
return."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest


def run_cli(args: list[str], terminal: bool) -> str:
    """The CLI's stderr, written to a pipe or to a pseudo-terminal."""
    cmd = [sys.executable, "-m", "ruyi_quant.cli", *map(str, args)]
    if not terminal:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        return p.stderr
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert p.wait(timeout=600) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("terminal", [False, True])
def test_quantize_and_export_of_a_lazy_family_show_progress(tiny_dir, tmp_path, terminal):
    fam, out = tmp_path / "q", tmp_path / "gguf"
    err = run_cli(
        ["quantize", tiny_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", fam], terminal
    )
    err += run_cli(["export", fam, "--format", "gguf", "--out", out], terminal)
    if terminal:  # tqdm's bars, redrawn in place
        assert "\r" in err and "write" in err and "export gguf" in err, err
    else:
        lines = err.splitlines()
        assert "\r" not in err, err
        start = [x for x in lines if x.startswith("write: ") and x.endswith(" ...")]
        end = [x for x in lines if x.startswith("write: ") and x.endswith(" s")]
        assert len(start) == len(end) == 1, lines
        assert "export gguf: 3 exits ..." in lines, lines
        assert any(x.startswith("export gguf: 3 exits in ") for x in lines), lines

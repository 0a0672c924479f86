"""Issue 13's fault tests: runs killed (SIGKILL) or terminated (SIGTERM) at several points, two
writers to one output, a full disk, damaged and stale outputs, file modes."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ruyi_quant.cli import main
from ruyi_quant.fsutil import MARKER, is_ours

QUANTIZE = ["quantize", "builtin:tiny", "--method", "gptq", "--samples", "32", "--seq-len", "256",
            "--group-size", "32"]


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Temporary directories, old copies and lock files of `name` in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def start(argv, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ruyi_quant.cli", *map(str, argv)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=120.0) -> bool:
    """Poll until cond() holds (True) or the process ends first (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out")


def messages(err: str) -> list[str]:
    """stderr without the progress bars (tqdm's carriage-return redraws, erased when done)."""
    return [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]


def tmp_dirs(parent: Path, name: str = "out") -> list[Path]:
    return [p for p in parent.glob(f".{name}.tmp-*") if p.is_dir()]


POINTS = {
    "starting": lambda parent: (lambda: (time.sleep(1.0), True)[1]),
    "working": lambda parent: (lambda: bool(tmp_dirs(parent))),
    "writing": lambda parent: (lambda: any(any(d.iterdir()) for d in tmp_dirs(parent))),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "fam"
    assert main(["quantize", "builtin:tiny", "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_killed_run_leaves_nothing_and_a_rerun_succeeds(command, point, sig, family, tmp_path):
    out = tmp_path / "out"
    argv = (QUANTIZE if command == "quantize" else
            ["export", family, "--format", "gguf", "--multi"]) + ["--out", out]
    main(["inspect", "builtin:tiny"])                   # the cache is built outside the timed run
    proc = start(argv, tmp_path)
    reached = wait_for(POINTS[point](tmp_path), proc)
    assert reached, f"the run ended before the {point} point: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, (proc.returncode, err)
        assert messages(err) == ["ruyi-quant: terminated"], err
        assert "Traceback" not in err
        assert leftovers(tmp_path) == [] and not out.exists()     # cleaned up on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()                                  # never half-written under its name
    assert main([*map(str, argv)]) == 0
    assert leftovers(tmp_path) == []                             # the rerun removed the dead run's
    assert is_ours(out)


def test_two_writers_to_one_output(tmp_path, capsys):
    out = tmp_path / "out"
    main(["inspect", "builtin:tiny"])
    proc = start(QUANTIZE + ["--out", out], tmp_path)
    assert wait_for(lambda: (tmp_path / ".out.lock").exists() and bool(tmp_dirs(tmp_path)), proc)
    capsys.readouterr()
    code = main(QUANTIZE[:1] + ["builtin:tiny", "--bits", "8", "--out", str(out)])
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "another ruyi-quant run is writing it" in err[0], err
    _, perr = proc.communicate(timeout=300)
    assert proc.returncode == 0, perr
    meta = json.loads((out / MARKER).read_text())
    assert meta["quantization"]["method"] == "gptq"              # the first writer's result, whole
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["quantize", "export", "eval"])
def test_a_full_disk_is_one_line_and_leaves_nothing(where, family, tmp_path, capsys, monkeypatch):
    import ruyi_quant.checkpoint
    import ruyi_quant.exporters.gguf.files
    import ruyi_quant.report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "x"))
    target = {"quantize": (ruyi_quant.checkpoint, "write_safetensors"),
              "export": (ruyi_quant.exporters.gguf.files.gguf.GGUFWriter, "write_tensor_data"),
              "eval": (ruyi_quant.report, "eval_markdown")}[where]
    monkeypatch.setattr(*target, full)
    argv = {"quantize": ["quantize", "builtin:tiny", "--bits", "8"],
            "export": ["export", str(family), "--format", "gguf"],
            "eval": ["eval", "builtin:tiny", str(family), "--samples", "1", "--seq-len", "32"]}[where]
    parent = tmp_path / "new" / "deeper"
    code = main(argv + ["--out", str(parent / "out")])
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []          # not even the parent directories it created


def test_stale_temporary_directories_are_removed(family, tmp_path, capsys):
    """A dead run's `.out.tmp-*` (here holding a loadable family with our manifest) and a crash
    between renames' `.out.old-*` are removed by the next run that writes `out`."""
    import shutil
    shutil.copytree(family, tmp_path / ".out.tmp-dead1234")
    (tmp_path / ".out.old-999").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()               # another output's: not ours to touch
    assert main(["quantize", "builtin:tiny", "--bits", "8", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "out"]


def test_a_damaged_output_is_rerun_never_skipped(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"jobs:\n  - name: a\n    model: {tiny_dir}\n    output: out\n"
                      "    quantize: {bits: 8, group_size: 32}\n")
    assert main(["run", str(recipe)]) == 0
    weights = tmp_path / "out" / "family" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])            # truncated after the run
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert weights.read_bytes() == good
    (tmp_path / "out" / "family" / "config.json").unlink()  # a listed file missing
    assert main(["run", str(recipe)]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert (tmp_path / "out" / "family" / "config.json").is_file()


def test_outputs_respect_the_umask(family, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["export", str(family), "--out", str(tmp_path / "hf")]) == 0
        assert main(["quantize", "builtin:tiny", "--bits", "8", "--out", str(tmp_path / "q")]) == 0
        assert main(["inspect", str(family), "--json", str(tmp_path / "i.json")]) == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "hf", tmp_path / "q", tmp_path / "i.json", *(tmp_path / "hf").rglob("*"),
              *(tmp_path / "q").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))

"""Fault tests: runs killed (SIGKILL) or terminated (SIGTERM) at several points, two
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
from conftest import error_lines

from ruyi_quant.cli import main
from ruyi_quant.names import MARKER
from ruyi_quant.store.files import is_ours

QUANTIZE = [
    "quantize",
    "builtin:tiny",
    "--method",
    "gptq",
    "--samples",
    "32",
    "--seq-len",
    "256",
    "--group-size",
    "32",
]


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Temporary directories, old copies and lock files of `name` in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def start(argv, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ruyi_quant.cli", *map(str, argv)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
    """stderr without its progress (tqdm's redraws on a terminal, a step's lines in a pipe)."""
    return error_lines(err)


def tmp_dirs(parent: Path, name: str = "out") -> list[Path]:
    return [p for p in parent.glob(f".{name}.tmp-*") if p.is_dir()]


POINTS = {
    "starting": lambda parent: lambda: (time.sleep(1.0), True)[1],
    "working": lambda parent: lambda: bool(tmp_dirs(parent)),
    "writing": lambda parent: lambda: any(any(d.iterdir()) for d in tmp_dirs(parent)),
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
    argv = (QUANTIZE if command == "quantize" else ["export", family, "--format", "gguf", "--multi"]) + [
        "--out",
        out,
    ]
    main(["inspect", "builtin:tiny"])  # the cache is built outside the timed run
    proc = start(argv, tmp_path)
    reached = wait_for(POINTS[point](tmp_path), proc)
    assert reached, f"the run ended before the {point} point: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, (proc.returncode, err)
        assert messages(err) == ["ruyi-quant: terminated"], err
        assert "Traceback" not in err
        assert leftovers(tmp_path) == [] and not out.exists()  # cleaned up on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # never half-written under its name
    assert main([*map(str, argv)]) == 0
    assert leftovers(tmp_path) == []  # the rerun removed the dead run's
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
    assert meta["quantization"]["method"] == "gptq"  # the first writer's result, whole
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["quantize", "export", "eval"])
def test_a_full_disk_is_one_line_and_leaves_nothing(where, family, tmp_path, capsys, monkeypatch):
    import ruyi_quant.exporters.gguf.files
    import ruyi_quant.report
    import ruyi_quant.store.checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "x"))

    target = {
        "quantize": (ruyi_quant.store.checkpoint, "write_safetensors"),
        "export": (ruyi_quant.exporters.gguf.files.gguf.GGUFWriter, "write_tensor_data"),
        "eval": (ruyi_quant.report, "eval_markdown"),
    }[where]
    monkeypatch.setattr(*target, full)
    argv = {
        "quantize": ["quantize", "builtin:tiny", "--bits", "8"],
        "export": ["export", str(family), "--format", "gguf"],
        "eval": ["eval", "builtin:tiny", str(family), "--samples", "1", "--seq-len", "32"],
    }[where]
    parent = tmp_path / "new" / "deeper"
    code = main(argv + ["--out", str(parent / "out")])
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []  # not even the parent directories it created


def test_stale_temporary_directories_are_removed(family, tmp_path, capsys):
    """A dead run's `.out.tmp-*` (here holding a loadable family with our manifest) and a crash
    between renames' `.out.old-*` are removed by the next run that writes `out`."""
    import shutil

    shutil.copytree(family, tmp_path / ".out.tmp-dead1234")
    (tmp_path / ".out.old-999").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not ours to touch
    assert main(["quantize", "builtin:tiny", "--bits", "8", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "out"]


def test_a_damaged_output_is_rerun_never_skipped(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"jobs:\n  - name: a\n    model: {tiny_dir}\n    output: out\n"
        "    quantize: {bits: 8, group_size: 32}\n"
    )
    assert main(["run", str(recipe)]) == 0
    weights = tmp_path / "out" / "family" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated after the run
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
    for p in [
        tmp_path / "hf",
        tmp_path / "q",
        tmp_path / "i.json",
        *(tmp_path / "hf").rglob("*"),
        *(tmp_path / "q").rglob("*"),
    ]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


# --- every writer under a full disk --------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 320 KB tmpfs: a real file system that fills up (needs root and mount; skipped without)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip(reason="mounting a small tmpfs needs root; the simulated full-disk tests still run")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            reason=f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated tests still run"
        )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # busy: detach it all the same
            pytest.fail("a file on the small disk was still open after the command")


FULL_DISK_COMMANDS = {
    "quantize rtn": ["quantize", "builtin:tiny", "--bits", "8"],
    "quantize gptq (spill)": QUANTIZE,
    "export hf": ["export", "{family}"],
    "export gguf": ["export", "{family}", "--format", "gguf", "--multi"],
    "export onnx": ["export", "{family}", "--format", "onnx", "--multi"],
    "eval": ["eval", "builtin:tiny", "{family}", "--samples", "1", "--seq-len", "32"],
    "run (gguf export)": ["run", "{recipe}"],
}


@pytest.mark.parametrize("command", sorted(FULL_DISK_COMMANDS))
def test_a_real_full_disk_is_one_line_naming_the_output_and_leaves_nothing(
    command, family, small_disk, tmp_path, capsys
):
    pytest.importorskip("onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"jobs:\n  - name: a\n    model: builtin:tiny\n    output: {small_disk}/out\n"
        "    quantize: {bits: 4, group_size: 32}\n    export: [{format: gguf, multi: true}]\n"
    )
    (small_disk / "ballast").write_bytes(b"x" * 300_000)  # the eval's small files must not fit either
    argv = [a.format(family=family, recipe=recipe) for a in FULL_DISK_COMMANDS[command]]
    if command != "run (gguf export)":
        argv += ["--out", str(small_disk / "out")]
    main(["inspect", "builtin:tiny"])
    capsys.readouterr()
    code = main(argv)
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and str(small_disk / "out") in err[0], err
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]


class FullFile:
    """A file on a full disk: opening creates it, every write fails as the OS's write(2) does
    (ENOSPC, no file name)."""

    def __init__(self, file=None, mode="wb"):
        import builtins

        self.f = builtins.open(file, mode) if file is not None else None

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def tell(self):
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self.f is not None:
            self.f.close()


def full_open(file, mode="r", *a, **k):
    """`open` on a full disk: files open as usual, writes to them fail."""
    import builtins

    return FullFile(file, mode) if any(c in mode for c in "wax") else builtins.open(file, mode, *a, **k)


def short_write(*a, **k):
    """What numpy's tofile raises on a full disk (GGUF tensors, the encoded-module cache): no errno."""
    raise OSError("23040 requested and 8192 written")


def rust_full(*a, **k):
    """What safetensors' own (Rust) writer raises on a full disk."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def patch(module: str, owner: str | None, attr: str, fake):
    """A monkeypatch target: an attribute of a module, or of a class in it."""

    def apply(monkeypatch):
        import importlib

        obj = importlib.import_module(module)
        monkeypatch.setattr(getattr(obj, owner) if owner else obj, attr, fake, raising=False)

    return apply


def short_array(monkeypatch):
    """numpy in the encoded-module cache only: its arrays' tofile stops short."""
    import numpy

    import ruyi_quant.exporters.gguf.tensors as tensors

    class Numpy:
        def __getattr__(self, name):
            return getattr(numpy, name)

        @staticmethod
        def ascontiguousarray(a):
            return type("Full", (), {"tofile": short_write})()

    monkeypatch.setattr(tensors, "np", Numpy())


WRITERS = {  # writer -> (the patch, the command that reaches it, what the line names)
    "safetensors stream": (
        patch("ruyi_quant.store.safetensors", None, "open", full_open),
        ["quantize", "builtin:tiny", "--bits", "8"],
        "{out}/model.safetensors",
    ),
    "spill": (
        patch("ruyi_quant.store.safetensors", None, "open", full_open),
        QUANTIZE,
        "{out}: cannot write its scratch files",
    ),
    "gguf tensors": (
        patch("gguf", "GGUFWriter", "write_tensor_data", short_write),
        ["export", "{family}", "--format", "gguf"],
        "{out}/exit-2/",
    ),
    "gguf encoded cache": (
        short_array,
        ["export", "{family}", "--format", "gguf", "--multi"],
        "{out}/.encoded/",
    ),
    "onnx data": (
        patch("ruyi_quant.exporters.onnx.files", None, "open", full_open),
        ["export", "{family}", "--format", "onnx"],
        "{out}/exit-2/model.onnx.data",
    ),
    "json": (
        patch("pathlib", "Path", "write_text", lambda *a, **k: FullFile().write("")),
        ["export", "{family}"],
        "{out}: cannot write it",
    ),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_under_a_full_disk_is_one_line_naming_its_file(
    writer, family, tmp_path, capsys, monkeypatch
):
    import ruyi_quant.errors

    pytest.importorskip("onnx")
    apply, argv, needle = WRITERS[writer]
    out = tmp_path / "new" / "out"
    main(["inspect", "builtin:tiny"])  # the cache is built before the disk fills
    monkeypatch.setattr(ruyi_quant.errors, "free_bytes", lambda path: 0)
    apply(monkeypatch)
    capsys.readouterr()
    code = main([a.format(family=family) for a in argv] + ["--out", str(out)])
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and "Traceback" not in err[0], err
    assert needle.format(out=out) in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_safetensors_own_writer_under_a_full_disk_names_its_file(tmp_path, monkeypatch):
    """save_file (Rust) puts the OS error in its message: read back as the OS's reason, with the file."""
    import ruyi_quant.store.checkpoint as io
    from ruyi_quant.errors import write_problem
    from ruyi_quant.model.config import parse_config
    from ruyi_quant.model.familial import FamilialModel
    from ruyi_quant.sources.tiny import tiny_config

    monkeypatch.setattr(io, "save_file", rust_full)
    with pytest.raises(OSError) as info:
        io.save_model(FamilialModel(parse_config(tiny_config())), tmp_path)
    assert info.value.filename == str(tmp_path / "model.safetensors")
    assert write_problem(info.value) == "No space left on device"


# --- what dead runs leave behind -----------------------------------------------------------
def test_a_run_killed_while_replacing_a_job_is_cleaned_by_the_next_run_that_skips_it(tmp_path, capsys):
    """SIGKILL during `run --force` of a finished job leaves `.out.tmp-*` and `.out.lock`; the next
    `run` finds the job intact, skips it, and removes them."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "jobs:\n  - name: a\n    model: builtin:tiny\n    output: out\n"
        "    quantize: {method: gptq, group_size: 32}\n    calibration: {samples: 32, seq_len: 256}\n"
    )
    assert main(["run", str(recipe)]) == 0
    proc = start(["run", recipe, "--force"], tmp_path)
    assert wait_for(lambda: any(any(d.iterdir()) for d in tmp_dirs(tmp_path)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = leftovers(tmp_path)
    assert ".out.lock" in left and any(n.startswith(".out.tmp-") for n in left), left
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert leftovers(tmp_path) == []


def test_any_output_written_in_a_folder_removes_dead_runs_leftovers_there(tmp_path):
    """Another output's dead temporaries (a directory, a file from an atomic text write) and its lock
    file go; a live run's (its lock held) stay."""
    from ruyi_quant.store.files import output_lock

    (tmp_path / ".dead.tmp-abcd1234").mkdir()
    (tmp_path / ".dead.tmp-abcd1234" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".i.json.tmp-zz99yy88").write_text("{")
    (tmp_path / ".dead.lock").write_text("")
    (tmp_path / ".gone.lock").write_text("")
    (tmp_path / ".notes.lock").write_text("pid 1234\n")  # someone else's lock file: not ours
    with output_lock(tmp_path / "live"):
        (tmp_path / ".live.tmp-live0000").mkdir()
        assert main(["quantize", "builtin:tiny", "--bits", "8", "--out", str(tmp_path / "q")]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".live.lock",
            ".live.tmp-live0000",
            ".notes.lock",
            "q",
        ]


def test_llama_cpps_quantizer_on_a_full_disk_is_one_line_naming_its_file(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    """llama.cpp's quantizer (K-quants) reports only a non-zero code: on a file system with less
    room than its input, that is a full disk, named with the file, and nothing is left."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ruyi_quant.errors

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda src, dst, params: 1)
    monkeypatch.setattr(ruyi_quant.errors, "free_bytes", lambda path: 4096)
    out = tmp_path / "new" / "out"
    code = main(
        [
            "export",
            str(tiny_dir),
            "--format",
            "gguf",
            "--type",
            "q6_k",
            "--exits",
            "2",
            "--no-imatrix",
            "--out",
            str(out),
        ]
    )
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert f"{out}/exit-2/" in err[0] and "No space left on device" in err[0], err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ruyi_quant.errors, "free_bytes", lambda path: 1 << 40)  # room enough: a failure
    code = main(
        [
            "export",
            str(tiny_dir),
            "--format",
            "gguf",
            "--type",
            "q6_k",
            "--exits",
            "2",
            "--no-imatrix",
            "--out",
            str(out),
        ]
    )
    err = messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "llama.cpp could not quantize" in err[0], err
    assert list(tmp_path.iterdir()) == []

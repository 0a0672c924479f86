"""A recipe's jobs as Ray tasks on a local cluster of this machine's CPUs: the same files as the
serial run, intact jobs skipped, a killed worker's job submitted again, a failing job failing
alone, Ctrl-C leaving no temporary output; without Ray, one line."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ruyi_quant.cli import main

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "recipes" / "sweep.yaml"
JOBS = ("tiny-rtn4", "tiny-gptq4", "tiny-awq4-asym", "tiny-shared-gptq8")
TIMEOUT = 900


@functools.cache
def _digest():
    spec = importlib.util.spec_from_file_location(
        "behaviour_digest", ROOT / "scripts" / "behaviour_digest.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def workspace(root: Path, recipe: str | None = None) -> Path:
    """A folder with the sweep recipe (or `recipe`) in recipes/; its jobs write to out/sweep/."""
    (root / "recipes").mkdir(parents=True)
    (root / "recipes" / "sweep.yaml").write_text(recipe if recipe is not None else SWEEP.read_text())
    return root / "recipes" / "sweep.yaml"


def cli(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ruyi_quant.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def tree(out: Path) -> dict[str, str]:
    """sha256 of every file under out; JSON files without their timings (scripts/behaviour_digest)."""
    return _digest().digest_tree(out)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The sweep run one job after another: its files' digests."""
    recipe = workspace(tmp_path_factory.mktemp("serial"))
    r = cli("run", recipe)
    assert r.returncode == 0, r.stderr
    return tree(recipe.parents[1] / "out")


def test_ray_run_gives_the_serial_files_and_a_rerun_skips_every_job(tmp_path, serial):
    pytest.importorskip("ray")
    recipe = workspace(tmp_path)
    r = cli("run", recipe, "--ray")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "out") == serial
    for job in JOBS:  # progress per job on the driver: submitted, the worker's stage lines, done
        assert f"[{job}] submitted to a local Ray cluster" in r.stdout
        assert f"[{job}] started on worker" in r.stdout
        assert f"[{job}] quantize and write the family:" in r.stdout
        assert f"[{job}] done in" in r.stdout
    assert leftovers(tmp_path / "out" / "sweep") == []
    again = cli("run", recipe, "--ray")
    assert again.returncode == 0, again.stderr
    assert all(f"[{job}] outputs complete and unchanged" in again.stdout for job in JOBS)
    assert "submitted" not in again.stdout
    assert tree(tmp_path / "out") == serial


def test_the_tiny_recipe_on_ray_gives_the_serial_files(tmp_path):
    pytest.importorskip("ray")
    text = (ROOT / "recipes" / "tiny.yaml").read_text()
    serial, on_ray = workspace(tmp_path / "serial", text), workspace(tmp_path / "ray", text)
    assert cli("run", serial).returncode == 0
    r = cli("run", on_ray, "--ray")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "ray" / "out") == tree(tmp_path / "serial" / "out")
    assert len(tree(tmp_path / "ray" / "out")) > 10


def _task_process(job: str, timeout: float):
    """The Ray worker process running `job` (its title names the task), polled for."""
    import psutil

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in psutil.process_iter(["cmdline"]):
            if any(f"ruyi-quant:{job}" in part for part in (p.info["cmdline"] or [])):
                return p
        time.sleep(0.05)
    raise AssertionError(f"no worker ran {job} within {timeout} s")


def test_a_killed_worker_gets_its_job_submitted_again(tmp_path, serial):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    recipe = workspace(tmp_path)
    cmd = [sys.executable, "-m", "ruyi_quant.cli", "run", str(recipe), "--ray"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = _task_process("tiny-gptq4", 300)
    worker.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    assert "[tiny-gptq4] its worker died" in out and "submitting it once more" in out
    assert tree(tmp_path / "out") == serial
    assert leftovers(tmp_path / "out" / "sweep") == []


def test_a_job_that_fails_at_run_time_fails_alone(tmp_path, tiny_dir):
    """A model whose weights file is cut short passes every check (they read its config) and fails
    when its job loads it: that job fails, the others finish, exit code 1 names it."""
    pytest.importorskip("ray")
    bad = tmp_path / "cut"
    shutil.copytree(tiny_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    text = SWEEP.read_text().replace(
        "  - name: tiny-awq4-asym\n    model: builtin:tiny", f"  - name: tiny-awq4-asym\n    model: {bad}"
    )
    recipe = workspace(tmp_path / "ws", text)
    r = cli("run", recipe, "--ray")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == "ruyi-quant: error: 1 of 4 jobs failed: tiny-awq4-asym"
    assert "[tiny-awq4-asym] failed: " in r.stdout and "model.safetensors" in r.stdout
    sweep = tmp_path / "ws" / "out" / "sweep"
    for job in JOBS:
        manifest = sweep / job / "ruyi_quant.json"
        assert manifest.is_file() == (job != "tiny-awq4-asym"), job
    assert leftovers(sweep) == []


def test_ctrl_c_stops_the_run_and_leaves_no_temporary_output(tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    recipe = workspace(tmp_path)
    sweep = tmp_path / "out" / "sweep"
    cmd = [sys.executable, "-m", "ruyi_quant.cli", "run", str(recipe), "--ray"]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    end = time.monotonic() + 300
    while not any(".tmp-" in n for n in leftovers(sweep)):  # a job is writing its output
        assert p.poll() is None and time.monotonic() < end, p.communicate()
        time.sleep(0.05)
    group = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C on a terminal sends: the whole process group
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "ruyi-quant: interrupted"
    assert leftovers(sweep) == []
    for job in JOBS:  # each output is complete or absent, never half-written
        d = sweep / job
        assert not d.exists() or json.loads((d / "ruyi_quant.json").read_text())["kind"] == "job"
    _, alive = psutil.wait_procs(group, timeout=30)
    assert alive == [], alive  # the local cluster stopped with the run


def test_without_ray_installed_ray_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    recipe = workspace(tmp_path)
    assert main(["run", str(recipe), "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ruyi-quant: error: --ray: Ray is not installed; pip install 'ruyi-quant[ray]'"]
    recipe.write_text(recipe.read_text() + "ray: true\n")  # the recipe key means the same
    assert main(["run", str(recipe)]) == 2
    assert "pip install 'ruyi-quant[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, problem",
    [("{address: ''}", "is empty"), ("{cpus_per_job: 0}", "greater than or equal to 1"), ("[1]", "ray")],
)
def test_a_bad_ray_key_is_one_line(tmp_path, capsys, value, problem):
    recipe = workspace(tmp_path)
    recipe.write_text(recipe.read_text() + f"ray: {value}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and "ray" in err[0], err


def test_memory_estimates_cover_the_measured_peaks_and_keep_two_7b_jobs_off_a_16_gb_node():
    from ruyi_quant.model.config import parse_config
    from ruyi_quant.pipeline.cluster import job_memory
    from ruyi_quant.recipe import Job
    from ruyi_quant.sources.synthetic import synthetic_config

    ruyi = parse_config(synthetic_config(28))
    job = lambda method, ev: Job.model_validate(  # noqa: E731
        {"name": "j", "model": "m", "output": "o", "quantize": {"method": method}, "eval": ev}
    )
    # CPU peaks at Ruyi-7B's width (docs/performance.md): RTN 5.72 GB (its exports up to 5.28 GB),
    # GPTQ 5.79-6.13 GB, AWQ 6.73 GB
    assert job_memory(job("rtn", None), ruyi) > 5.72e9
    assert job_memory(job("gptq", None), ruyi) > 6.13e9
    assert job_memory(job("awq", None), ruyi) > 6.73e9
    # Ray offers a node its available memory: a 16 GB worker holds one such job, not two
    assert 2 * job_memory(job("gptq", {}), ruyi) > 16e9


@pytest.mark.parametrize(
    "address, problem", [("127.0.0.1:1", "nothing answers there"), ("auto", "no Ray cluster")]
)
def test_an_address_where_no_cluster_runs_is_one_line(tmp_path, address, problem):
    pytest.importorskip("ray")
    recipe = workspace(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = cli("run", recipe, "--ray", address, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith(f"ruyi-quant: error: --ray {address}: ")
        and problem in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_an_existing_cluster_runs_the_jobs_with_the_serial_files(tmp_path, serial):
    """`ray start --head` in another folder, then `--ray HOST:PORT` and `--ray ray://HOST:PORT`:
    the workers find the recipe's paths and the driver's cache."""
    pytest.importorskip("ray")
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, client = free_port(), free_port()
    ray_cli = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    start = ray_cli + ["start", "--head", f"--port={port}", f"--ray-client-server-port={client}"]
    start += ["--num-cpus=2", "--include-dashboard=false"]
    head = tmp_path / "head"
    head.mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(start, cwd=head, env=env, check=True, capture_output=True, timeout=300)
    try:
        recipe = workspace(tmp_path / "ws")
        r = cli("run", recipe, "--ray", f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr
        assert f"submitted to the Ray cluster at 127.0.0.1:{port}" in r.stdout
        assert tree(tmp_path / "ws" / "out") == serial
        # the same cluster through Ray Client, as from another machine (its server starts last)
        end = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < end, "Ray Client's server never answered"
                time.sleep(0.5)
        r = cli("run", recipe, "--ray", f"ray://127.0.0.1:{client}", "--force")
        assert r.returncode == 0, r.stderr
        assert f"submitted to the Ray cluster at ray://127.0.0.1:{client}" in r.stdout
        assert tree(tmp_path / "ws" / "out") == serial
    finally:
        subprocess.run(ray_cli + ["stop", "--force"], env=env, capture_output=True, timeout=300)

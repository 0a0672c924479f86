"""A recipe's jobs as Ray tasks: `ruyi-quant run RECIPE --ray [ADDRESS]`.

Each job is one task with the resources it needs: one GPU when it computes on CUDA, else
`cpus_per_job` CPUs, and an estimate of its peak memory (`job_memory`), so that Ray starts no
more jobs on a node than its memory holds. Every job computes with `cpus_per_job` torch threads,
by default the driver's own thread count, which a serial run here uses: float32 sums split
across threads round differently, and GPTQ's Hessians and factorizations are such sums, so the
thread count is part of what makes the files the serial run's bit for bit. (More threads than
reserved CPUs would not pay: two jobs of two threads on two cores ran 4-16x slower each than
two of one thread.) ADDRESS is an existing cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`);
`local` starts a cluster on this machine for the run and stops it after.

What the serial runner guarantees holds here too. Every job is checked on the driver before the
first is submitted, and a job whose outputs are intact is skipped there. A worker writes its
output as a serial run does (store.files.atomic_dir: a temporary sibling under the output's lock),
so two workers never write one output, and what a killed worker leaves is swept by the next
writer. A job whose worker dies is submitted once more; a job that fails is reported and the
others finish. Ctrl-C cancels every job (each removes its temporary output), stops a local
cluster and sweeps what killed workers left.

A job's settings go to its task, and its summary comes back, as JSON text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import Terminated, UserError
from ..recipe import Job, RaySettings
from ..store.files import LEFTOVER, sweep

INSTALL = "pip install 'ruyi-quant[ray]'"
OBJECT_STORE_BYTES = 128 << 20  # a local cluster's object store: tasks exchange only JSON text
GRACE_S = 20.0  # how long cancelled jobs get to remove their temporary outputs before a kill

# A job's peak memory: the process itself, plus a multiple of its largest float32 unit (a decoder
# layer or a head: calibration streams the family one unit at a time), plus evaluation's
# log-probabilities, added (the stages run one after another: an upper bound). The multiples cover
# the measured peaks at Ruyi-7B's width on the CPU (RTN 5.72 GB, exports up to 5.28 GB, GPTQ
# 5.79-6.13 GB, AWQ 6.73 GB: up to 2.1, 1.9, 2.3 and 2.6 heads above the process) and ruyi-mini's
# demo (2.54 GB).
BASE_BYTES = 1 << 30
METHOD_UNITS = {"none": 2.5, "rtn": 2.5, "gptq": 2.5, "awq": 3.0}  # none/rtn: exports' 1.9
EVAL_COPIES = 6  # [batch, seq, vocab] float32 arrays evaluation holds at once


def import_ray():
    # every job's lines as its worker prints them: not merged across jobs (read as Ray is
    # imported), no colour codes in a log
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # `ray start` turns token authentication on where a token exists (~/.ray/auth_token), but a
    # driver connecting to it does not unless told: say so (a cluster without it still connects)
    token = "RAY_AUTH_TOKEN" in os.environ or (Path.home() / ".ray" / "auth_token").is_file()
    if token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray: Ray is not installed; {INSTALL}") from None
    return ray


def job_memory(job: Job, cfg) -> int:
    """Bytes a job is expected to peak at (module docstring), from its model's FamilialConfig."""
    h, v = cfg.hidden_size, cfg.vocab_size
    inter = int(cfg.raw.get("intermediate_size") or 4 * h)
    unit = 4 * max(4 * h * h + 3 * h * inter, h * v)
    total = BASE_BYTES + METHOD_UNITS[job.quantize.method] * unit
    if job.eval is not None:
        total += EVAL_COPIES * 4 * job.eval.batch * job.eval.seq_len * v
    return int(total)


def wants_gpu(job: Job, index: int, node: dict) -> bool:
    """Whether the job's task asks Ray for a GPU (`node`: the cluster's largest node's resources);
    a device the cluster cannot give is an error."""
    dev = job.quantize.device
    key = f"jobs[{index}].quantize.device"
    if dev.startswith("cuda:") and dev != "cuda:0":
        raise UserError(
            f"{key} {dev}: under --ray each job gets one GPU, which it sees as cuda; give cuda or auto"
        )
    if dev.startswith("cuda") and not node.get("GPU"):
        raise UserError(f"{key} {dev}: the Ray cluster has no GPU; use cpu or auto")
    return dev.startswith("cuda") or (dev == "auto" and bool(node.get("GPU")))


def _task(job_json: str, base: str, index: int, force: bool, threads: int) -> str:
    """A job on a worker: run_job as the serial runner calls it, with `threads` torch threads,
    stage lines on stdout (Ray shows them on the driver), progress bars off. A user's mistake is a
    failed job, not a crash."""
    import socket

    import torch

    from ..errors import os_error_line
    from ..log import log_to_stderr
    from . import run_job

    log_to_stderr()
    torch.set_num_threads(threads)
    job = Job.model_validate_json(job_json)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"[{job.name}] started on worker {worker}")
    try:
        res = run_job(job, Path(base), force=force, progress=False, say=say, index=index)
    except UserError as e:
        return json.dumps({"status": "failed", "error": str(e), "worker": worker})
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        return json.dumps({"status": "failed", "error": line, "worker": worker})
    return json.dumps({**res, "worker": worker})


def _start(ray, settings: RaySettings) -> None:
    kw = dict(logging_level=logging.ERROR, log_to_driver=True)
    if settings.address == "local":
        ray.init(object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **kw)
        return
    _reachable(settings.address)
    env = {k: os.environ[k] for k in ("RUYI_QUANT_CACHE",) if k in os.environ}
    # Ray Client's server starts a process per session, which a busy head can fail to start:
    # a ray:// address is tried three times
    tries = 3 if settings.address.startswith("ray://") else 1
    try:
        for attempt in range(tries):
            try:
                ray.init(address=settings.address, runtime_env={"env_vars": env} if env else None, **kw)
                break
            except ConnectionError:
                if attempt == tries - 1:
                    raise
                time.sleep(2.0)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if settings.address == "auto":
            raise UserError(
                "--ray auto: no Ray cluster runs on this machine; start one with `ray start --head`, "
                "give its address, or leave ADDRESS out for a cluster of this run's own"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--ray {settings.address}: cannot connect to a Ray cluster there ({first})"
        ) from None


def _reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection: Ray itself retries a dead
    address for minutes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"--ray {address}: nothing answers there ({reason}); start a cluster with "
            "`ray start --head` or check the address"
        ) from None


def _largest_node(ray) -> dict:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {k: max(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU", "memory")} if nodes else {}


def _clear(folders: list[Path], names: set[str], timeout: float) -> None:
    """Sweep the output folders until no temporaries of these outputs are left (a killed
    worker's lock goes when its process is gone) or the timeout passes."""
    end = time.monotonic() + timeout
    while True:
        for f in folders:
            sweep(f)
        left = [
            p
            for f in folders
            if f.is_dir()
            for p in f.iterdir()
            if (m := LEFTOVER.fullmatch(p.name)) and m.group(1) in names
        ]
        if not left or time.monotonic() > end:
            return
        time.sleep(0.2)


def run_on_ray(
    jobs: list[tuple[int, Job, Path, Path]], base: Path, force: bool, settings: RaySettings, say
) -> dict[int, dict]:
    """Run checked jobs ((recipe index, job, output, model dir) each) as Ray tasks; returns each
    job's summary by recipe index ({'status': 'done'|'skipped'|'failed', ...})."""
    import torch

    from ..model.config import read_config
    from . import skip_intact

    ray = import_ray()
    results: dict[int, dict] = {}
    todo = []
    for index, job, out, src in jobs:
        if (skipped := skip_intact(job, out, force, say)) is not None:
            results[index] = skipped
        else:
            todo.append((index, job, out, src))
    if not todo:
        return results
    mem = {index: job_memory(job, read_config(src)) for index, job, _, src in todo}
    _start(ray, settings)
    where = "a local Ray cluster" if settings.address == "local" else f"the Ray cluster at {settings.address}"
    pending: dict = {}
    try:
        node = _largest_node(ray)
        gpu = {index: wants_gpu(job, index, node) for index, job, _, _ in todo}
        largest = int(node.get("CPU", 0))
        if settings.cpus_per_job and settings.cpus_per_job > largest:
            raise UserError(
                f"ray.cpus_per_job {settings.cpus_per_job}: no node of {where} has that many CPUs "
                f"(the largest has {largest})"
            )
        threads = settings.cpus_per_job or max(1, min(torch.get_num_threads(), largest))
        task = ray.remote(max_retries=0)(_task)
        # a local cluster's workers start in this directory, so the paths (and the manifests that
        # record them) are the serial run's; a remote worker needs them absolute
        job_base = str(base) if settings.address == "local" else str(Path(base).resolve())

        def submit(index: int, job: Job, attempt: int):
            need = mem[index]
            if need > node.get("memory", need):
                say(
                    f"[{job.name}] needs about {need / 1e9:.1f} GB, more than any node offers "
                    f"({node['memory'] / 1e9:.1f} GB): asks for that"
                )
                need = int(node["memory"])
            res = {"num_gpus": 1, "num_cpus": 1} if gpu[index] else {"num_cpus": threads}
            ref = task.options(name=f"ruyi-quant:{job.name}", memory=need, **res).remote(
                job.model_dump_json(), job_base, index, force, threads
            )
            cpus = f"{res['num_cpus']} CPU{'s' if res['num_cpus'] > 1 else ''}"
            what = f"{'1 GPU, ' if gpu[index] else ''}{cpus}, {threads} thread{'s' if threads > 1 else ''}"
            say(f"[{job.name}] submitted to {where}: {what}, {need / 1e9:.1f} GB")
            pending[ref] = (index, job, attempt)

        for index, job, _, _ in todo:
            submit(index, job, 0)
        outs = {index: out for index, _, out, _ in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            index, job, attempt = pending.pop(ref)
            try:
                res = json.loads(ray.get(ref))
            except ray.exceptions.RayTaskError as e:  # a bug: its traceback, then the others go on
                say(f"[{job.name}] failed with an error in ruyi-quant:\n{e}")
                res = {"status": "failed", "error": f"{type(e.cause).__name__}: {e.cause}"}
            except ray.exceptions.RayError as e:  # the worker (or its node) died
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if attempt == 0:
                    say(f"[{job.name}] its worker died ({first}); submitting it once more")
                    submit(index, job, 1)
                    continue
                res = {"status": "failed", "error": f"its worker died twice ({first})"}
            res.setdefault("output", str(outs[index]))
            if res["status"] == "failed":
                say(f"[{job.name}] failed: {res['error']}")
            else:
                say(
                    f"[{job.name}] {res['status']} in {res.get('seconds', 0):.1f} s on worker {res.get('worker')}"
                )
            results[index] = res
    except (KeyboardInterrupt, Terminated):
        if pending:
            say(f"interrupted: cancelling {len(pending)} job(s)")
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)  # KeyboardInterrupt in the task: atomic_dir removes its output
            with contextlib.suppress(Exception):
                ray.wait(list(pending), num_returns=len(pending), timeout=GRACE_S)
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        folders = sorted({out.parent for _, _, out, _ in todo})
        _clear(folders, {out.name for _, _, out, _ in todo}, GRACE_S)
    return results

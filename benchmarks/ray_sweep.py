"""A sweep recipe one job after another and as Ray tasks (`--ray`: a local cluster started for
each run), in four modes taken in turn RUNS times, and the files of each compared.

    python benchmarks/ray_sweep.py                       # recipes/sweep.yaml, 3 rounds
    python benchmarks/ray_sweep.py --recipe R --runs 5

The modes: serial (torch's default threads); `--ray` with its default, each job reserving and
computing with that many CPUs; serial with one thread (OMP_NUM_THREADS=1); `--ray` with
`ray: {cpus_per_job: 1}`, so that as many jobs run side by side as there are CPUs. A Ray mode's
files must equal those of the serial mode of the same thread count. Each run is a fresh
`ruyi-quant run RECIPE --force` process (every job runs; a Ray run pays for starting and
stopping its cluster, as a user's does). The table gives per run the wall seconds, the load
average before it, and whether every file equals its serial mode's (sha256; JSON files without
their timings, as scripts/behaviour_digest.py digests them); then the median, min and max.
Writes --out.json and --out.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_flags, digest_tree, write_result

# name: (recipe addition, --ray, environment, the serial mode whose files it must give)
MODES = {
    "serial": ("", False, {}, "serial"),
    "ray": ("", True, {}, "serial"),
    "serial, 1 thread": ("", False, {"OMP_NUM_THREADS": "1"}, "serial, 1 thread"),
    "ray, 1 CPU per job": ("ray: {cpus_per_job: 1}\n", True, {}, "serial, 1 thread"),
}


def run_once(recipe: Path, ray: bool, env: dict) -> dict:
    cmd = [sys.executable, "-m", "ruyi_quant.cli", "run", str(recipe), "--force", *(["--ray"] if ray else [])]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        err = proc.stderr.strip()
        raise SystemExit(f"run failed: {err.splitlines()[-1] if err else proc.returncode}")
    return {"load_before": load, "wall_s": round(wall, 2)}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "sweep.yaml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ray_sweep")
    a = ap.parse_args()
    import ray
    import torch

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="ray_sweep-") as tmp:
        work = Path(tmp)
        (work / "recipes").mkdir()
        text = a.recipe.read_text()
        reference: dict[str, dict] = {}
        for i in range(a.runs):
            for mode, (extra, ray_on, env, serial) in MODES.items():
                for d in work.iterdir():
                    if d.name != "recipes":
                        shutil.rmtree(d)
                recipe = work / "recipes" / a.recipe.name
                recipe.write_text(text + extra)
                r = run_once(recipe, ray_on, env)
                files = digest_tree(work / "out")
                reference.setdefault(mode, files)
                r["same_files"] = files == reference[serial]
                r["files"] = len(files)
                runs[mode].append(r)
                print(
                    f"round {i + 1}/{a.runs}, {mode}: wall {r['wall_s']} s, "
                    f"files as '{serial}': {r['same_files']}",
                    flush=True,
                )
    summary = {
        mode: {"wall_s": spread([r["wall_s"] for r in rs]), "same_files": all(r["same_files"] for r in rs)}
        for mode, rs in runs.items()
    }
    env = {
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
    }
    result = {"recipe": str(a.recipe.relative_to(ROOT)) if a.recipe.is_relative_to(ROOT) else str(a.recipe)}
    result.update({"env": env, "runs": runs, "summary": summary})
    md = [
        f"# A sweep recipe, serial and on Ray: {result['recipe']}",
        "",
        f"Ray {env['ray']}, torch {env['torch']} ({env['torch_threads']} threads by default), {env['cpus']} "
        f"CPUs ({env['cpu_flags']}), no GPU. Each run is a fresh `ruyi-quant run --force` process; a Ray "
        "run starts a local cluster of this machine's CPUs and stops it. Files: sha256 of every file "
        "(JSON without timings) against the first run of the serial mode with the same thread count.",
        "",
        "| mode | wall s per run | wall s, median (min-max) | load before each run | files as serial |",
        "|---|---|---|---|---|",
    ]
    for mode, rs in runs.items():
        w = summary[mode]["wall_s"]
        md.append(
            f"| {mode} | {', '.join(str(r['wall_s']) for r in rs)} | {w['median']} ({w['min']}-{w['max']}) | "
            f"{', '.join(str(r['load_before']) for r in rs)} | "
            f"{'same' if summary[mode]['same_files'] else 'DIFFER'} ({rs[0]['files']} files) |"
        )
    write_result(a.out, result, "\n".join(md) + "\n")
    return 0 if all(s["same_files"] for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""A sweep recipe one job after another against the same recipe as Ray tasks (`--ray`, a local
cluster started for each run), RUNS pairs taken in turn, and the files of the two compared.

    python benchmarks/ray_sweep.py                       # recipes/sweep.yaml, 3 pairs
    python benchmarks/ray_sweep.py --recipe R --runs 5

Each run is a fresh `ruyi-quant run RECIPE --force` process (so every job runs, and a Ray run
pays for starting and stopping its cluster, as a user's does). The table gives per run the wall
seconds, the user + system CPU seconds of the process and everything it waited for, the peak
RSS of the largest such process, the load average before it, and whether every file equals the
serial run's (sha256; JSON files without their timings, as scripts/behaviour_digest.py digests
them); then the median, min and max. Writes --out.json and --out.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digest_tree(root: Path) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location(
        "behaviour_digest", ROOT / "scripts" / "behaviour_digest.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.digest_tree(root)


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f") if f in flags)


def run_once(recipe: Path, ray: bool) -> dict:
    cmd = [sys.executable, "-m", "ruyi_quant.cli", "run", str(recipe), "--force", *(["--ray"] if ray else [])]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    return {
        "load_before": load,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),  # KiB on Linux
    }


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

    runs: dict[str, list[dict]] = {"serial": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="ray_sweep-") as tmp:
        work = Path(tmp)
        (work / "recipes").mkdir()
        recipe = work / "recipes" / a.recipe.name
        shutil.copy(a.recipe, recipe)
        reference = None
        for i in range(a.runs):
            for mode in ("serial", "ray"):
                for d in work.iterdir():
                    if d.name != "recipes":
                        shutil.rmtree(d)
                r = run_once(recipe, mode == "ray")
                files = digest_tree(work / "out")
                reference = reference or files
                r["same_files"] = files == reference
                r["files"] = len(files)
                runs[mode].append(r)
                print(
                    f"run {i + 1}/{a.runs} {mode}: wall {r['wall_s']} s, cpu {r['cpu_s']} s, "
                    f"peak RSS {r['peak_rss_gb']} GB, same files: {r['same_files']}",
                    flush=True,
                )
    summary = {
        mode: {
            "wall_s": spread([r["wall_s"] for r in rs]),
            "cpu_s": spread([r["cpu_s"] for r in rs]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
            "same_files": all(r["same_files"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    ratio = summary["ray"]["wall_s"]["median"] / summary["serial"]["wall_s"]["median"]
    env = {
        "ray": ray.__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
    }
    result = {"recipe": str(a.recipe.relative_to(ROOT)) if a.recipe.is_relative_to(ROOT) else str(a.recipe)}
    result.update({"env": env, "runs": runs, "summary": summary, "ray_over_serial": round(ratio, 3)})
    md = [
        f"# A sweep recipe, serial and on Ray: {result['recipe']}",
        "",
        f"Ray {env['ray']}, torch {env['torch']}, {env['cpus']} CPUs ({env['cpu_flags']}), no GPU. "
        "Each run is a fresh `ruyi-quant run --force` process; a Ray run starts a local cluster of "
        "this machine's CPUs (one CPU per job) and stops it.",
        "",
        "| mode | run | load before | wall s | CPU s | peak RSS GB (largest process) | files as serial |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, rs in runs.items():
        for i, r in enumerate(rs, 1):
            md.append(
                f"| {mode} | {i} | {r['load_before']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gb']} | "
                f"{'same' if r['same_files'] else 'DIFFER'} ({r['files']} files) |"
            )
    for mode, s in summary.items():
        w, c = s["wall_s"], s["cpu_s"]
        md.append(
            f"| {mode} | median (min-max) | | {w['median']} ({w['min']}-{w['max']}) | "
            f"{c['median']} ({c['min']}-{c['max']}) | {s['peak_rss_gb']} | "
            f"{'same' if s['same_files'] else 'DIFFER'} |"
        )
    md += ["", f"Ray's median wall time over the serial one: {ratio:.2f}."]
    text = "\n".join(md) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(text)
    return 0 if all(s["same_files"] for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

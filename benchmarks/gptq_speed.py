"""How long branch-aware GPTQ of a whole family takes: `ruyi-quant quantize --method gptq` run
RUNS times, each a fresh process, and the grids it writes compared run to run.

    python benchmarks/gptq_speed.py                         # builtin:ruyi-mini, 3 runs
    python benchmarks/gptq_speed.py --runs 5 --expect SHA   # and the grids' sha256 must be SHA

Each run quantizes every trunk and branch layer (ruyi-mini: 30 + 4) at 4 bits, group 128, on
32 x 256 tokens of builtin:pydoc/calib, and writes the family. The table gives, per run, the
quantize step (the manifest's `quantize_seconds`), the whole process's wall seconds and peak RSS,
the load average before it and the sha256 of model.safetensors; then median, min and max. When
GPTQModel imports in this environment, it quantizes exit 29 alone (30 layers) in the same run, on
the same tokens, with ruyi-quant's settings (damp 0.01, no act_group_aware, desc_act off).
Writes --out.json and --out.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_flags, write_result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_once(model: str, out: Path, args: list[str]) -> dict:
    """One `ruyi-quant quantize` in a child process: wall s, peak RSS, the manifest's figures."""
    cmd = [sys.executable, "-m", "ruyi_quant.cli", "quantize", model, "--out", str(out), "--force", *args]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"quantize failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    meta = json.loads((out / "ruyi_quant.json").read_text())
    return {
        "load_before": load,
        "wall_s": round(wall, 2),
        "quantize_s": round(meta["stats"]["quantize_seconds"], 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),  # ru_maxrss is in KiB on Linux
        "sha256": sha256(out / "model.safetensors"),
    }


def gptqmodel_run(model: str, exit: int, samples: int, seq_len: int, work: Path) -> dict:
    """GPTQModel's quantize of one exit exported as a plain float checkpoint, or why not."""
    try:
        import gptqmodel
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as e:
        return {"skipped": f"GPTQModel does not import here ({e.name or e}); see gptqmodel_compare.py"}
    from ruyi_quant.recipe import Calibration
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import calib_windows

    float_root = work / "float-hf"
    subprocess.run(
        [sys.executable, "-m", "ruyi_quant.cli", "export", model, "--format", "hf", "--weights", "float"]
        + ["--dtype", "bfloat16", "--exits", str(exit), "--out", str(float_root), "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cal = Calibration(source="builtin:pydoc/calib", samples=samples, seq_len=seq_len)
    calib = calib_windows(resolve_model(model), cal)
    qc = QuantizeConfig(
        bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01, act_group_aware=False
    )
    gm = GPTQModel.load(str(float_root / f"exit-{exit}"), qc, device="cpu")
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    gm.quantize(data, batch_size=1)
    return {
        "version": gptqmodel.__version__,
        "load_before": load,
        "quantize_s": round(time.perf_counter() - t0, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--exit", type=int, default=29, help="the exit GPTQModel quantizes")
    ap.add_argument("--no-gptqmodel", action="store_true", help="skip GPTQModel even where it imports")
    ap.add_argument("--expect", help="sha256 every run's model.safetensors must have")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gptq_speed")
    a = ap.parse_args()
    import torch

    args = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", "builtin:pydoc/calib"]
    args += ["--samples", str(a.samples), "--seq-len", str(a.seq_len)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="gptq_speed-") as tmp:
        for i in range(a.runs):
            r = run_once(a.model, Path(tmp) / "family", args)
            runs.append(r)
            print(
                f"run {i + 1}/{a.runs}: quantize {r['quantize_s']} s, wall {r['wall_s']} s, "
                f"peak RSS {r['peak_rss_gb']} GB, sha256 {r['sha256'][:16]}",
                flush=True,
            )
        gq = (
            {"skipped": "--no-gptqmodel"}
            if a.no_gptqmodel
            else gptqmodel_run(a.model, a.exit, a.samples, a.seq_len, Path(tmp))
        )
    shas = {r["sha256"] for r in runs}
    q = [r["quantize_s"] for r in runs]
    wall = [r["wall_s"] for r in runs]
    summary = {
        "quantize_s": {"median": statistics.median(q), "min": min(q), "max": max(q)},
        "wall_s": {"median": statistics.median(wall), "min": min(wall), "max": max(wall)},
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "grids_identical": len(shas) == 1,
        "matches_expected": None if a.expect is None else shas == {a.expect},
    }
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cuda": torch.cuda.is_available(),
    }
    result = {"model": a.model, "args": args, "env": env, "runs": runs, "summary": summary, "gptqmodel": gq}
    md = [
        f"# Family GPTQ speed: {a.model}, 4-bit g128, {a.samples} x {a.seq_len} tokens of builtin:pydoc/calib",
        "",
        f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpus']} CPUs ({env['cpu_flags']}), "
        f"no GPU used. Each run is a fresh `ruyi-quant quantize` process.",
        "",
        "| run | load before | quantize s | wall s | peak RSS GB | model.safetensors sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        md.append(
            f"| {i} | {r['load_before']} | {r['quantize_s']} | {r['wall_s']} | {r['peak_rss_gb']} | "
            f"{r['sha256'][:16]} |"
        )
    s = summary
    md.append(
        f"| median (min-max) | | {s['quantize_s']['median']} ({s['quantize_s']['min']}-{s['quantize_s']['max']}) "
        f"| {s['wall_s']['median']} ({s['wall_s']['min']}-{s['wall_s']['max']}) | {s['peak_rss_gb']} | "
        f"{'identical' if s['grids_identical'] else 'DIFFER'} |"
    )
    md.append("")
    if "skipped" in gq:
        md.append(f"GPTQModel: not run ({gq['skipped']}).")
    else:
        md.append(
            f"GPTQModel {gq['version']}, exit {a.exit} alone, same tokens and settings: quantize "
            f"{gq['quantize_s']} s (load before {gq['load_before']})."
        )
    if a.expect is not None:
        md.append(
            f"Expected sha256 {a.expect[:16]}: {'matched' if s['matches_expected'] else 'NOT matched'}."
        )
    write_result(a.out, result, "\n".join(md) + "\n")
    return 0 if s["grids_identical"] and s["matches_expected"] is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""GPTQ and AWQ at Ruyi-7B's full width, one layer at a time: peak RSS (it should not grow with
depth), seconds per trunk layer, branch layer and head, and the whole family's time
extrapolated from them. Synthetic families (ruyi-quant make-synthetic, random bf16 weights):
the numbers are memory and speed, not quality.

    python benchmarks/calibrate_scale.py                    # depth 3 (exits 1,2) and 6 (2,4,5), GPTQ and AWQ
    python benchmarks/calibrate_scale.py --runs 28:full:gptq --device cuda --tag h200

Each quantize is its own process (`ruyi-quant quantize ... --bits 4 --group-size 128 --heads`, or
`--gguf q4_k_m`, heads included), its peak
RSS from getrusage; seconds per layer come from the family's ruyi_quant.json
(stats.layer_seconds), peak device memory from stats.peak_device_gb. Results go to
benchmarks/results/calibrate_scale[-TAG].{json,md}, rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, RUN, step  # noqa: E402

FULL = {"layers": 28, "branches": 4, "heads": 5}  # Ruyi-7B: the last exit's branch is a trunk layer


def per_kind(seconds: dict[str, float]) -> dict[str, float]:
    """Median seconds of a trunk layer, a branch layer and a head."""
    kinds = {"trunk": "model.layers.", "branch": "model.eelayers.", "head": "lm_head"}
    return {
        k: statistics.median(v for n, v in seconds.items() if n.startswith(p))
        for k, p in kinds.items()
        if any(n.startswith(p) for n in seconds)
    }


def extrapolate(kind: dict[str, float]) -> float:
    """Seconds for the full family: 28 trunk layers, 4 branch layers, 5 heads."""
    return (
        FULL["layers"] * kind["trunk"]
        + FULL["branches"] * kind.get("branch", kind["trunk"])
        + FULL["heads"] * kind["head"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["3:1,2:gptq", "6:2,4,5:gptq", "3:1,2:awq", "6:2,4,5:awq"],
        help="DEPTH:EXITS:METHOD (EXITS 'full': Ruyi-7B's; METHOD gptq, awq, or gptq+q4_k_m: GPTQ "
        "into llama.cpp's K-quant blocks)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--awq-tokens", type=int, help="AWQ's rows per scale search (default: the tool's)")
    ap.add_argument("--work", default="/tmp/ruyi-calibrate-scale")
    ap.add_argument("--tag", default="", help="results file suffix, e.g. the GPU's name")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic families")
    ap.add_argument("--small", action="store_true", help="builtin:tiny for every run (a smoke run)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    notes = {
        "load_average_at_start": os.getloadavg(),
        "device": args.device,
        "cpus": os.cpu_count(),
        "calibration": f"{args.samples} x {args.seq_len} tokens of builtin:pydoc/calib",
        "awq_tokens": args.awq_tokens or "default (2048)",
        "synthetic": "random weights: memory and speed only",
        "runs": [],
    }
    if args.device.startswith("cuda"):
        import torch

        notes["gpu"] = torch.cuda.get_device_name(0)
    stem = "calibrate_scale" + (f"-{args.tag}" if args.tag else "")
    sources = [work / "synthetic-{}-{}".format(*r.split(":")[:2]).replace(",", "_") for r in args.runs]
    if args.small:
        from ruyi_quant.sources import resolve_model

        sources = [resolve_model("builtin:tiny")] * len(args.runs)
        notes["synthetic"] = "builtin:tiny (smoke run: the depth and exits of --runs are ignored)"
    for i, spec in enumerate(args.runs):
        depth, exits, method = spec.split(":")
        src = sources[i]
        rows: list[dict] = []
        if not args.small and not (src / "ruyi_quant.json").is_file():
            syn = ["make-synthetic", "--out", src, "--depth", depth, "--force"]
            step(
                f"make-synthetic depth {depth}",
                RUN,
                syn + ([] if exits == "full" else ["--exits", exits]),
                rows,
            )
        fam = work / f"family-{method}"
        base, _, ftype = method.partition("+")  # gptq+q4_k_m: GPTQ into llama.cpp's q4_k_m blocks
        grid = ["--gguf", ftype] if ftype else ["--bits", "4", "--group-size", "128", "--heads"]
        row = step(
            f"quantize {method} depth {depth}",
            RUN,
            [
                "quantize",
                src,
                "--method",
                base,
                *grid,
                "--calib",
                "builtin:pydoc/calib",
                "--samples",
                args.samples,
                "--seq-len",
                args.seq_len,
                "--device",
                args.device,
                "--out",
                fam,
                "--force",
            ]
            + (["--awq-tokens", args.awq_tokens] if method == "awq" and args.awq_tokens else []),
            rows,
        )
        stats = json.loads((fam / "ruyi_quant.json").read_text())["stats"]
        kind = per_kind(stats["layer_seconds"])
        src_cfg = json.loads((src / "config.json").read_text())
        run = {
            "depth": src_cfg.get("num_hidden_layers", int(depth)),
            "exits": src_cfg["early_exit_points"],
            "method": method,
            "seconds": row["seconds"],
            "peak_rss_gb": row["peak_rss_gb"],
            "peak_device_gb": stats.get("peak_device_gb"),
            "calibrate_seconds": sum(stats["layer_seconds"].values()),
            "median_seconds": kind,
            "full_family_seconds_extrapolated": extrapolate(kind),
            "layer_seconds": stats["layer_seconds"],
            "steps": rows,
        }
        notes["runs"].append(run)
        shutil.rmtree(fam)
        if not args.keep and not args.small and src not in sources[i + 1 :]:
            shutil.rmtree(src)  # disk: the full-size family alone is 21.5 GB
        write(notes, stem)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write(notes: dict, stem: str) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(notes, indent=2) + "\n")
    where = notes.get("gpu") or f"CPU ({notes['cpus']} cores)"
    lines = [
        f"# GPTQ / AWQ 4-bit g128 at Ruyi-7B's width, on {where} (random bf16 weights: memory and "
        "speed only)",
        "",
        f"Calibration {notes['calibration']}. Load average at start: "
        f"{', '.join(f'{x:.2f}' for x in notes['load_average_at_start'])}.",
        "",
        "| method | depth | exits | quantize s (whole command) | calibration s | peak RSS GB | peak device GB "
        "| s / trunk layer | s / branch | s / head | full family (28 layers, 5 heads), extrapolated s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in notes["runs"]:
        k = r["median_seconds"]
        dev = f"{r['peak_device_gb']:.2f}" if r.get("peak_device_gb") is not None else "-"
        lines.append(
            f"| {r['method']} | {r['depth']} | {r['exits']} | {r['seconds']:.0f} | "
            f"{r['calibrate_seconds']:.0f} | {r['peak_rss_gb']:.2f} | {dev} | {k['trunk']:.1f} | "
            f"{k.get('branch', float('nan')):.1f} | {k['head']:.1f} | "
            f"{r['full_family_seconds_extrapolated']:.0f} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[calibrate_scale] total {time.time() - t0:.0f} s")

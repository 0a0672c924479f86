"""Ruyi-7B at full size on this machine: time and peak memory of every step, from a synthetic
family with Ruyi-7B's exact shapes and random bf16 weights (ruyi-quant make-synthetic; random
weights: the numbers here are memory and speed, not quality).

    python benchmarks/scale.py                       # full size: 28 layers, 5 exits, 21.5 GB
    python benchmarks/scale.py --depth 3 --exits 1,2 # full width, 2.56B parameters

Steps, each its own process (peak RSS is that process's own, from getrusage):
  make-synthetic; quantize --method rtn --bits 4 --group-size 128; export gguf (per-exit Q4_0 +
  Modelfiles); export gguf --multi-only; export hf (GPTQ layout, sharded); every per-exit GGUF
  loaded in llama.cpp (llama-cpp-python), logits of a short prompt checked finite; the multi-exit
  file's size against the sum of the family's distinct tensors as written.
Outputs are removed as soon as they are checked, so the whole run needs about 40 GB of disk at
full size. Writes benchmarks/results/scale[-depthN].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import resource, sys, time
from ruyi_quant.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print("STEP", rc, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      file=sys.stderr)
sys.exit(rc)
"""
LLAMA = """
import resource, sys, time
import numpy as np
from ruyi_quant.exporters.gguf.llamacpp import open_llama
t0 = time.perf_counter()
m = open_llama(sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=2)
toks = m.tokenize(b"The quick brown fox", add_bos=False)
m.eval(toks)
logits = np.array(m.scores[: len(toks)])
ok = bool(np.isfinite(logits).all()) and logits.shape[1] == m.n_vocab()
print("STEP", 0 if ok else 1, time.perf_counter() - t0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, logits.shape[1], file=sys.stderr)
sys.exit(0 if ok else 1)
"""


def step(name: str, code: str, args: list[str], rows: list[dict]) -> dict:
    # SIGTERM (kill, pkill) as an exception, so that subprocess.run kills the running step too
    # instead of leaving it to run on beside whatever is measured next
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"[scale] {name}: {' '.join(map(str, args))}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    line = next((x for x in proc.stderr.splitlines()[::-1] if x.startswith("STEP ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"[scale] {name} failed (exit {proc.returncode})")
    parts = line.split()
    row = {"step": name, "seconds": float(parts[2]), "peak_rss_gb": int(parts[3]) * 1024 / 1e9}
    rows.append(row)
    print(f"[scale] {name}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    return row


def gb(path: Path) -> float:
    from ruyi_quant.store.files import disk_bytes

    return disk_bytes(path) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--exits", default=None)
    ap.add_argument("--work", default="/tmp/ruyi-scale", help="scratch folder (removed at the end)")
    ap.add_argument("--keep-source", action="store_true", help="reuse and keep the synthetic family")
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, fam = work / "synthetic", work / "family"
    rows: list[dict] = []
    notes: dict = {"load_average_at_start": os.getloadavg(), "depth": args.depth}
    if not (src / "ruyi_quant.json").is_file():
        syn = ["make-synthetic", "--out", src, "--depth", args.depth, "--force"]
        step("make-synthetic", RUN, syn + (["--exits", args.exits] if args.exits else []), rows)
    notes["source_gb"] = gb(src)
    cfg = json.loads((src / "config.json").read_text())
    notes["exits"] = cfg["early_exit_points"]
    step(
        "quantize rtn 4-bit g128",
        RUN,
        ["quantize", src, "--method", "rtn", "--bits", "4", "--group-size", "128", "--out", fam, "--force"],
        rows,
    )
    notes["family_gb"] = gb(fam)
    if not args.keep_source:
        shutil.rmtree(src)  # exports read the family (and its tokenizer copy)
    g = work / "gguf"
    step("export gguf per exit (Q4_0)", RUN, ["export", fam, "--format", "gguf", "--out", g, "--force"], rows)
    files = sorted(g.glob("exit-*/*.gguf"), key=lambda p: int(p.parent.name.split("-")[1]))
    notes["gguf_per_exit_gb"] = {p.parent.name: p.stat().st_size / 1e9 for p in files}
    if not args.skip_llama:
        for p in files:
            step(f"llama.cpp loads {p.parent.name} (finite logits)", LLAMA, [p], rows)
    shutil.rmtree(g)
    m = work / "multi"
    step(
        "export gguf --multi-only",
        RUN,
        ["export", fam, "--format", "gguf", "--multi-only", "--out", m, "--force"],
        rows,
    )
    multi = next(m.glob("*.gguf"))
    notes["multi"] = multi_check(fam, multi)
    shutil.rmtree(m)
    h = work / "hf"
    step("export hf (GPTQ layout)", RUN, ["export", fam, "--out", h, "--force"], rows)
    notes["hf_per_exit_gb"] = {d.name: gb(d) for d in sorted(h.glob("exit-*"))}
    notes["hf_shards"] = {d.name: len(list(d.glob("*.safetensors"))) for d in sorted(h.glob("exit-*"))}
    shutil.rmtree(h)
    write(rows, notes, args.depth)
    if not args.keep_source:
        shutil.rmtree(work, ignore_errors=True)


def multi_check(fam_dir: Path, multi: Path) -> dict:
    """The multi-exit file against the sum of the family's distinct tensors as GGUF data."""
    import gguf

    from ruyi_quant import names
    from ruyi_quant.exporters.gguf.tensors import GGUFOptions, family_arrays
    from ruyi_quant.store.checkpoint import load_family

    f = load_family(fam_dir)
    arrays = family_arrays(f, [(n, names.gguf_multi_name(n)) for n in f.weight_names()], GGUFOptions())
    distinct = sum(a.nbytes for _, a, _ in arrays)
    r = gguf.GGUFReader(str(multi))
    stored = sum(int(t.n_bytes) for t in r.tensors)
    size = multi.stat().st_size
    return {
        "file_gb": size / 1e9,
        "distinct_tensor_gb": distinct / 1e9,
        "tensor_bytes_in_file_gb": stored / 1e9,
        "tensors": len(r.tensors),
        "distinct_tensors": len(arrays),
        "overhead_mb": (size - distinct) / 1e6,
    }


def write(rows: list[dict], notes: dict, depth: int) -> None:
    out = ROOT / "benchmarks" / "results"
    stem = "scale" if depth == 28 else f"scale-depth{depth}"
    (out / f"{stem}.json").write_text(
        json.dumps({"steps": rows, **notes, "synthetic": "random weights: memory and speed only"}, indent=2)
        + "\n"
    )
    lines = [
        f"# Ruyi-7B-shaped synthetic family, depth {depth}, exits {notes['exits']} "
        "(random bf16 weights: memory and speed only)",
        "",
        f"Load average at start: {', '.join(f'{x:.2f}' for x in notes['load_average_at_start'])}. "
        f"Source {notes['source_gb']:.2f} GB on disk, quantized family {notes['family_gb']:.2f} GB.",
        "",
        "| step | seconds | peak RSS GB |",
        "|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |" for r in rows]
    mu = notes["multi"]
    lines += [
        "",
        f"Multi-exit GGUF: {mu['file_gb']:.3f} GB for {mu['tensors']} tensors; the family's "
        f"{mu['distinct_tensors']} distinct tensors as GGUF data: {mu['distinct_tensor_gb']:.3f} GB "
        f"(difference {mu['overhead_mb']:.1f} MB: metadata, tokenizer, alignment).",
        f"Per-exit GGUF GB: {json.dumps({k: round(v, 3) for k, v in notes['gguf_per_exit_gb'].items()})}",
        f"Per-exit HF GB (shards): {json.dumps({k: round(v, 3) for k, v in notes['hf_per_exit_gb'].items()})} "
        f"{json.dumps(notes['hf_shards'])}",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[scale] total {time.time() - t0:.0f} s")

"""Every CUDA check in one command, sized for one GPU lease: the environment, the `gpu` tests, the
int4 runtime against bf16 at Ruyi-7B's size, and a full-family GPTQ on the GPU.

    python3 scripts/gpu_checks.py --out "$OUT"                # on the lent machine, project root
    python3 scripts/gpu_checks.py --small --out /tmp/gpu-rehearsal   # the same stages on the CPU

The project is not installed: it runs from the working tree (PYTHONPATH), and packages the
machine lacks travel as wheels in `.whl/` (installed with --no-index into OUT's site folder;
`python3 scripts/gpu_checks.py --wheels` prints the download command to run beforehand, here).
Stages, in order, each under what is left of --budget (default 540 s):

  env        python, torch, CUDA, the GPU's name and driver, every import the project needs
  tests      python -m pytest -m gpu (14 tests; on a CPU they skip, and the count is checked)
  int4-b1    benchmarks/gpu.py at batch 1, every exit (full-size synthetic Ruyi-7B: make-synthetic,
             then quantize --method rtn; --small: builtin:tiny on the CPU)
  int4-b8    benchmarks/gpu.py at batch 8, the first and the last exit
  gptq       benchmarks/calibrate_scale.py --runs 28:full:gptq --device cuda when --gptq-seconds
             are left, else the depth-6 run (--small: builtin:tiny)

Each stage prints one line as it ends (`== STAGE ok|failed|timed out, N s`) and rewrites
OUT/summary.json, so a lease that runs out still returns what finished; a stage's whole output
is OUT/STAGE.log and the benchmarks' tables are copied into OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = [
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "numpy",
    "pydantic",
    "yaml",
    "rich",
    "tqdm",
    "gguf",
]
# what the lent machine's image lacks (its transformers is older than pyproject's floor: the env
# stage records its version; carrying a newer one needs a newer huggingface-hub and its needs too)
WHEELS = "pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection gguf"
DOWNLOAD = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    f"--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl {WHEELS}"
)


class Run:
    """The stages so far, written to OUT/summary.json after each."""

    def __init__(self, out: Path, budget: float, wheels: Path):
        self.out, self.deadline, self.t0 = out, time.monotonic() + budget, time.monotonic()
        self.stages: list[dict] = []
        self.env: dict = dict(os.environ)
        self.wheels = wheels

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, cmd: list[str], reserve: float = 0.0) -> dict:
        """Run cmd as stage `name`, its output streamed into OUT/name.log, under what is left of
        the budget less `reserve` (the seconds kept for later stages)."""
        limit = self.left() - reserve
        row = {"stage": name, "command": " ".join(map(str, cmd))}
        if limit < 10:
            row.update(status="skipped", reason=f"{max(limit, 0):.0f} s left")
            return self.done(row)
        t0 = time.monotonic()
        with open(self.out / f"{name}.log", "w") as log:
            log.write(f"$ {row['command']}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=limit)
                row["status"] = "ok" if rc == 0 else "failed"
                row["returncode"] = rc
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                row["status"] = "timed out"
        row["seconds"] = round(time.monotonic() - t0, 1)
        tail = (self.out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        row["tail"] = tail
        return self.done(row)

    def done(self, row: dict) -> dict:
        self.stages.append(row)
        took = f", {row['seconds']:.0f} s" if "seconds" in row else f" ({row.get('reason', '')})"
        print(f"== {row['stage']} {row['status']}{took}", flush=True)
        if row["status"] not in ("ok", "skipped"):
            print("\n".join(row.get("tail", [])), flush=True)
        summary = {"elapsed_s": round(time.monotonic() - self.t0, 1), "stages": self.stages}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return row


def environment(run: Run) -> dict:
    """Install the carried wheels, put the working tree on the path, read what the machine is."""
    site = run.out / "site"
    wheels = sorted(run.wheels.glob("*.whl"))
    path = [str(ROOT)]
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            + ["--target", str(site), *map(str, wheels)],
            check=True,
        )
        path.append(str(site))
    run.env["PYTHONPATH"] = os.pathsep.join(path + [run.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run.env["PYTHONUNBUFFERED"] = "1"
    probe = (
        "import importlib, json, torch\n"
        f"mods = {IMPORTS + ['ruyi_quant']!r}\n"
        "out = {'python': __import__('sys').version.split()[0], 'torch': torch.__version__,\n"
        "       'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,\n"
        "       'missing': [], 'versions': {}}\n"
        "for m in mods:\n"
        "    try:\n"
        "        out['versions'][m] = getattr(importlib.import_module(m), '__version__', '?')\n"
        "    except Exception as e:\n"
        "        out['missing'].append(f'{m}: {e}')\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], env=run.env, capture_output=True, text=True)
    info = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-2000:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = q.stdout.strip()
    info["wheels"] = [w.name for w in wheels]
    (run.out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    ok = "error" not in info and not info["missing"]
    row = {"stage": "env", "status": "ok" if ok else "failed", "seconds": 0.0, "env": info}
    if not ok:
        row["tail"] = [f"missing: {info.get('missing') or info.get('error')}", f"carry wheels: {DOWNLOAD}"]
    run.done(row)
    return info


def collect(run: Run, tag: str) -> None:
    """Copy the benchmarks' tables of this run into OUT."""
    for f in sorted((ROOT / "benchmarks" / "results").glob(f"*-{tag}*")):
        shutil.copy(f, run.out / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-checks")))
    ap.add_argument("--small", action="store_true", help="tiny families on the CPU: the rehearsal")
    ap.add_argument("--budget", type=float, default=540, help="seconds for every stage together")
    ap.add_argument("--gptq-seconds", type=float, default=300, help="left at least: full-depth GPTQ")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ruyi-gpu"))
    ap.add_argument("--wheels", action="store_true", help="print what to carry as wheels, and stop")
    ap.add_argument("--wheel-dir", type=Path, default=ROOT / ".whl", help="the carried wheels")
    a = ap.parse_args()
    if a.wheels:
        print(DOWNLOAD)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    run = Run(a.out, a.budget, a.wheel_dir)
    info = environment(run)
    if run.stages[-1]["status"] != "ok":
        raise SystemExit(1)
    py = sys.executable
    tag = "rehearsal" if a.small else (info.get("gpu") or "gpu").split()[-1].lower()
    gpu_bench = [py, "benchmarks/gpu.py", "--work", str(a.work)]
    if a.small:
        gpu_bench += ["--small", "--device", "cpu", "--prompts", "16,32", "--new", "4", "--repeats", "1"]
    tests = run.stage("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"], 300)
    if a.small and tests["status"] == "ok" and "14 skipped" not in (a.out / "tests.log").read_text():
        run.done({"stage": "tests-count", "status": "failed", "tail": ["expected: 14 skipped (no CUDA)"]})
    run.stage("int4-b1", gpu_bench + ["--batches", "1", "--tag", f"{tag}-b1"], 120)
    exits = first_and_last(run, a)
    if exits is None:
        run.done({"stage": "int4-b8", "status": "skipped", "reason": "no family from int4-b1"})
    else:
        run.stage("int4-b8", gpu_bench + ["--batches", "8", "--exits", exits, "--tag", f"{tag}-b8"], 60)
    scale = [py, "benchmarks/calibrate_scale.py", "--work", str(a.work / "scale"), "--tag", tag]
    if a.small:
        scale += ["--small", "--runs", "3:1,2:gptq", "--samples", "4", "--seq-len", "32"]
    elif run.left() >= a.gptq_seconds:
        scale += ["--runs", "28:full:gptq", "--device", "cuda"]
    else:
        scale += ["--runs", "6:2,4,5:gptq", "--device", "cuda"]
    run.stage("gptq", scale)
    collect(run, tag)
    if a.small:  # the rehearsal's tables are not results: they live in OUT only
        for f in (ROOT / "benchmarks" / "results").glob(f"*-{tag}*"):
            f.unlink()
    bad = [s["stage"] for s in run.stages if s["status"] != "ok"]
    print(
        f"== all stages {'ok' if not bad else 'done; not ok: ' + ', '.join(bad)} in {a.budget - run.left():.0f} s"
    )
    raise SystemExit(1 if bad else 0)


def first_and_last(run: Run, a) -> str | None:
    """The first and last exit of the family the batch-1 stage used (None: it has none)."""
    where = "resolve_model('builtin:tiny')" if a.small else repr(str(a.work / "synthetic"))
    code = (
        "import json; from pathlib import Path; from ruyi_quant.sources import resolve_model; "
        f"e = json.loads((Path({where}) / 'config.json').read_text())['early_exit_points']; "
        "print(f'{e[0]},{e[-1]}')"
    )
    p = subprocess.run([sys.executable, "-c", code], env=run.env, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


if __name__ == "__main__":
    main()

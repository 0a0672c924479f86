"""Accuracy of every method at every exit: perplexity, Δppl, KL to bf16, top-1, bytes, time.

    python benchmarks/accuracy.py                                # ruyi-mini, rtn/gptq/awq, 4-bit g128 and 8-bit g128
    python benchmarks/accuracy.py --model builtin:tiny --settings 4:32 --samples 8   # quick

Every method quantizes the trunk and branch linears (heads stay bf16) through the same code as
`ruyi-quant quantize`, calibrating on the same tokens (builtin:pydoc/calib), and is evaluated
against the unquantized model on held-out text (builtin:pydoc/eval, disjoint from calibration
and from ruyi-mini's training text). Prints a markdown table; writes JSON and the table to
--out (default benchmarks/results/accuracy.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ruyi_quant.evaluate import evaluate
from ruyi_quant.pipeline import quantize
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.recipe import Calibration, Eval, Quantize
from ruyi_quant.report import markdown_table
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_model
from ruyi_quant.text import calib_windows, eval_windows

HEADERS = [
    "method",
    "bits (a: asym)",
    "group",
    "exit",
    "ppl",
    "Δppl %",
    "KL(bf16‖q)",
    "top-1 %",
    "weights MB (as stored)",
    "quantize s",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument(
        "--settings",
        default="4:128,4:128:asym,8:128",
        help="bits:group_size[:asym], comma-separated (default symmetric)",
    )
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    a = ap.parse_args()

    src = resolve_model(a.model)
    calib = calib_windows(
        src, Calibration(source="builtin:pydoc/calib", samples=a.samples, seq_len=a.seq_len)
    )
    ev = eval_windows(src, Eval(samples=a.eval_samples, seq_len=a.seq_len))
    ref = QuantizedFamily.from_model(load_model(src))
    results, rows = [], []
    ref_rows = None
    for setting in a.settings.split(","):
        bits, group, *kind = setting.split(":")
        bits, group, sym = int(bits), int(group), kind != ["asym"]
        for method in a.methods.split(","):
            q = Quantize(method=method, bits=bits, group_size=group, sym=sym)
            model = load_model(src)
            t0 = time.perf_counter()
            fam = quantize(model, q, calib if method != "rtn" else None)
            seconds = time.perf_counter() - t0
            report = evaluate(ref, fam, ev, progress=True)
            ref_rows = ref_rows or {r["exit"]: r for r in report["rows"]}
            results.append(
                {
                    "method": method,
                    "bits": bits,
                    "group_size": group,
                    "sym": sym,
                    "quantize_seconds": seconds,
                    "layout": fam.layout,
                    **report,
                }
            )
            for r in report["rows"]:
                rows.append(
                    [
                        method,
                        f"{bits}{'' if sym else 'a'}",
                        str(group),
                        str(r["exit"]),
                        f"{r['ppl_quant']:.3f}",
                        f"{r['delta_ppl_pct']:+.2f}",
                        f"{r['kl']:.4f}",
                        f"{100 * r['top1']:.2f}",
                        f"{r['bytes_quant'] / 1e6:.1f}",
                        f"{seconds:.0f}",
                    ]
                )
            print(f"{method} {bits}-bit g{group} {'sym' if sym else 'asym'}: {seconds:.1f} s", flush=True)
    ref_table = [
        ["bf16", "16", "-", str(e), f"{r['ppl_ref']:.3f}", "", "", "", f"{r['bytes_ref'] / 1e6:.1f}", ""]
        for e, r in sorted(ref_rows.items())
    ]
    table = markdown_table(HEADERS, ref_table + rows)
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": a.model,
        "calibration": {"source": "builtin:pydoc/calib", "windows": list(calib.shape)},
        "eval": {"source": "builtin:pydoc/eval", "windows": list(ev.shape)},
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
    }
    a.out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

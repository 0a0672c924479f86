"""Where one decode step's time goes on this CPU: our bf16 model against our int4 runtime, per
exit, batch 1. For each: wall milliseconds per decoded token (no profiler; timed as `eval --runtime`
times decode, `runtime.validate.speed`), and the same steps
under torch.profiler split into the linear kernels (dense `mm`/`addmm` for bf16, tinygemm's
`_weight_int4pack_mm_for_cpu` for int4), attention (`scaled_dot_product_attention`) and every
other op, each op's own time. The ratio of the two sides' linear-kernel times is what int4 could
gain over bf16 if nothing but the linears cost anything.

    ruyi-quant quantize builtin:ruyi-mini --method gptq --bits 4 --group-size 128 --heads --out out/q4
    python benchmarks/decode_profile.py --family out/q4             # about 3 min on two cores

Writes benchmarks/results/decode_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ruyi_quant.report import markdown_table
from ruyi_quant.runtime.generate import generate
from ruyi_quant.runtime.model import int4_model
from ruyi_quant.runtime.validate import speed
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_family

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ("aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def op_ms(model, prompt: list[int], e: int, new: int) -> dict[str, float]:
    """Each op's own milliseconds per decoded token under torch.profiler, prefill subtracted."""

    def ops(n: int) -> dict[str, float]:
        with torch.profiler.profile() as p:
            generate(model, [prompt], e, n)
        return {a.key: a.self_cpu_time_total / 1e3 for a in p.key_averages()}

    one, many = ops(1), ops(new + 1)
    return {k: (v - one.get(k, 0.0)) / new for k, v in many.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, help="a quantized ruyi-mini family (4-bit)")
    ap.add_argument("--exits", help="comma-separated exits (default all)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ref_fam, fam = load_family(resolve_model("builtin:ruyi-mini")), load_family(Path(args.family))
    exits = fam.config.exit_list(None if not args.exits else [int(x) for x in args.exits.split(",")])
    prompt = [100 + i % 1000 for i in range(args.prompt)]  # token ids; the content does not matter
    notes = {
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "family": args.family,
        "prompt": args.prompt,
        "new": args.new,
        "repeats": args.repeats,
        "rows": [],
    }
    models = {
        "bf16": int4_model(ref_fam, dtype=torch.bfloat16, progress=False),
        "int4": int4_model(fam, dtype=torch.bfloat16, progress=False),
    }
    with torch.no_grad():
        for m in models.values():
            generate(m, [prompt], exits[0], 4)  # warm up
        for e in exits:
            row = {"exit": e}
            for name, m in models.items():
                ops = op_ms(m, prompt, e, args.new)
                lin = sum(v for k, v in ops.items() if k in LINEAR)
                att = sum(v for k, v in ops.items() if k in ATTENTION)
                wall = 1e3 / speed(m, e, torch.tensor([prompt]), args.new, args.repeats)["decode_tok_s"]
                row[name] = {
                    "wall_ms": wall,
                    "linear_ms": lin,
                    "attention_ms": att,
                    "other_ops_ms": sum(ops.values()) - lin - att,
                }
            row["linear_ratio"] = row["bf16"]["linear_ms"] / row["int4"]["linear_ms"]
            row["wall_ratio"] = row["bf16"]["wall_ms"] / row["int4"]["wall_ms"]
            notes["rows"].append(row)
            print(
                f"exit {e}: bf16 {row['bf16']['wall_ms']:.1f} ms/token (linear kernels "
                f"{row['bf16']['linear_ms']:.1f}), int4 {row['int4']['wall_ms']:.1f} (linear kernels "
                f"{row['int4']['linear_ms']:.1f}): decode ratio {row['wall_ratio']:.2f}, kernels alone "
                f"{row['linear_ratio']:.2f}",
                flush=True,
            )
    write(notes)


def write(notes: dict) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps(notes, indent=2) + "\n")
    head = [
        "exit",
        "bf16 ms / token",
        "int4 ms / token",
        "int4 ÷ bf16 decode speed",
        "linear kernels bf16 / int4 ms",
        "kernels alone: bf16 ÷ int4",
        "attention bf16 / int4 ms",
        "other ops bf16 / int4 ms",
    ]
    rows = [
        [
            str(r["exit"]),
            f"{r['bf16']['wall_ms']:.1f}",
            f"{r['int4']['wall_ms']:.1f}",
            f"{r['wall_ratio']:.2f}",
            f"{r['bf16']['linear_ms']:.1f} / {r['int4']['linear_ms']:.1f}",
            f"{r['linear_ratio']:.2f}",
            f"{r['bf16']['attention_ms']:.1f} / {r['int4']['attention_ms']:.1f}",
            f"{r['bf16']['other_ops_ms']:.1f} / {r['int4']['other_ops_ms']:.1f}",
        ]
        for r in notes["rows"]
    ]
    lines = [
        f"# One decode step on this CPU ({notes['cpus']} cores, {notes['threads']} threads), ruyi-mini",
        "",
        f"Family {notes['family']}; batch 1, prompt {notes['prompt']} tokens, {notes['new']} tokens "
        f"decoded; wall time without the profiler (median of {notes['repeats']}), op times with it "
        f"(each op's own time, prefill subtracted). Load average at the start: "
        f"{', '.join(f'{x:.2f}' for x in notes['load_average_at_start'])}.",
        "",
        markdown_table(head, rows),
    ]
    (out / "decode_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

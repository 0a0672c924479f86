"""Which runtime on a CPU: ruyi-mini per exit, our int4 runtime against our bf16 (and float32)
model, and beside them, in the same run and on the same quantized family, llama.cpp on our Q4_0
file of the exit and onnxruntime on our int4 graph of the exit.

    python benchmarks/runtime_cpu.py                       # about 15 min on two cores
    python benchmarks/runtime_cpu.py --family out/x/family --exits 29

The family: GPTQ 4-bit g128 symmetric, act-order with static groups (the demo's), the heads too at
g128 symmetric, so that every runtime runs exactly the same grids (Q4_0 holds a symmetric g128
grid exactly; the ONNX graph takes the tied head's grid for the embedding too). Table 1 is
`ruyi-quant eval --runtime int4`'s (per exit: KL and top-1 of int4 against the float side, both
in the same dtype). Table 2 puts the four runtimes side by side per exit, each scored against
the same float32 reference model (KL(fp32 || runtime), top-1, perplexity) and timed on the same
prompt (batch 1, `--prompt` tokens, then `--new` greedy tokens; median of `--repeats`); memory as
the bytes of weights each holds (ours: the model's tensors for every exit, one trunk; llama.cpp:
the exit's file, memory-mapped; onnxruntime: the exit's graph and data). Table 1 has each of our
sides' peak RSS (the whole process: torch, the tokenizer and the text included). Writes benchmarks/results/runtime_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf_vs_llama import llama_logits, score  # noqa: E402  (benchmarks/ is sys.path[0] here)

# benchmarks/onnx.py would shadow the onnx package: drop this folder from the path now
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ruyi_quant.exporters import export
from ruyi_quant.model import layout
from ruyi_quant.pipeline import quantize
from ruyi_quant.recipe import Calibration, Eval, GGUFExport, GPTQOptions, ONNXExport, Provenance, Quantize
from ruyi_quant.report import markdown_table, runtime_cells
from ruyi_quant.runtime.model import int4_model
from ruyi_quant.runtime.validate import model_bytes, runtime_report, speed
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_family
from ruyi_quant.text import calib_windows, eval_windows

ROOT = Path(__file__).resolve().parents[1]


def onnx_bench():
    """benchmarks/onnx.py (its name would shadow the onnx package as a plain import)."""
    spec = importlib.util.spec_from_file_location("onnx_bench", ROOT / "benchmarks" / "onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llama_speed(path: Path, prompt: list[int], new: int, repeats: int, threads: int) -> dict:
    from ruyi_quant.exporters.gguf.llamacpp import open_llama

    llm = open_llama(
        path,
        n_ctx=len(prompt) + new + 8,
        n_batch=len(prompt),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last() -> int:  # the batch's last logits (llama-cpp-python keeps none itself here)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    pre, dec = [], []
    for r in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new if r else 2):
            llm.eval([last()])
        if r:
            pre.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
    llm.close()
    return {
        "prefill_tok_s": len(prompt) / statistics.median(pre),
        "decode_tok_s": new / statistics.median(dec),
    }


def kernels(fam) -> list[dict]:
    """Microseconds per call of one linear of each shape (layer 0's and exit 0's head), at 1 and
    at 256 rows: our Int4Linear (the tinygemm CPU kernel and its wrapper) against torch's dense
    bf16 and float32 linear of the same weight: where the decode time goes."""
    from ruyi_quant.runtime.int4 import Int4Linear

    def us(f) -> float:
        f()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            f()
            n += 1
        return 1e6 * (time.perf_counter() - t0) / n

    head = layout.head_prefix(fam.config.shared_heads, 0)
    rows = []
    for name in [
        f"model.layers.0.{m}"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
    ] + [head]:
        grid = fam.grids[name].get()
        w = grid.dequantize().float()
        q = Int4Linear(grid, dtype=torch.bfloat16)
        q32 = Int4Linear(grid, dtype=torch.float32)
        wb = w.bfloat16()
        for m in (1, 256):
            xb = torch.randn(m, w.shape[1]).bfloat16()
            xf = xb.float()
            with torch.no_grad():
                rows.append(
                    {
                        "linear": name.rsplit(".", 1)[-1] if name != head else "head",
                        "n": w.shape[0],
                        "k": w.shape[1],
                        "rows": m,
                        "int4_us": us(lambda: q(xb)),
                        "bf16_us": us(lambda: torch.nn.functional.linear(xb, wb)),
                        "fp32_us": us(lambda: torch.nn.functional.linear(xf, w)),
                        "int4_fp32_us": us(lambda: q32(xf)) if m == 1 else None,
                    }
                )
    return rows


def ours_logits(model, windows: torch.Tensor, e: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(w[None], exit=e).logits[0].float() for w in windows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", help="a quantized ruyi-mini family (default: quantize as the docstring says)")
    ap.add_argument("--exits", help="comma-separated exits (default all)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compiled-exits", default="29", help="exits timed again with --compile on ('' for none)"
    )
    ap.add_argument("--work", default="/tmp/ruyi-runtime-cpu")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    notes = {
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "prompt": args.prompt,
        "new": args.new,
        "repeats": args.repeats,
    }
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = resolve_model("builtin:ruyi-mini")
    ref_fam = load_family(src)
    exits = ref_fam.config.exit_list(None if not args.exits else [int(x) for x in args.exits.split(",")])
    if args.family:
        fam = load_family(Path(args.family))
        notes["family"] = f"{args.family} ({fam.method})"
    else:
        q = Quantize(
            method="gptq",
            bits=4,
            group_size=128,
            sym=True,
            heads=True,
            gptq=GPTQOptions(act_order=True, static_groups=True),
        )
        cal = Calibration(source="builtin:pydoc/calib")
        t0 = time.perf_counter()
        fam = quantize(ref_fam, q, calib_windows(src, cal), progress=True)
        fam.provenance = Provenance(model="builtin:ruyi-mini", quantize=q, calibration=cal)
        notes["quantize_seconds"] = time.perf_counter() - t0
        notes["family"] = (
            "GPTQ 4-bit g128 sym, act-order + static groups, heads too (g128 sym), "
            f"{cal.samples} x {cal.seq_len} tokens of {cal.source}"
        )
    windows = eval_windows(src, Eval(samples=args.eval_windows))
    prompt = windows.reshape(-1)[: args.prompt]

    # table 1: eval --runtime int4 (bf16; int4 with float32 activations takes PyTorch's reference
    # CPU kernel, tens of times slower: the kernel table shows it, no model is timed on it)
    notes["runtime"] = {}
    rep = runtime_report(
        ref_fam, fam, windows, exits, "cpu", torch.bfloat16, args.prompt, args.new, 1, args.repeats, say=print
    )
    notes["runtime"]["bfloat16"] = rep
    print(markdown_table(*runtime_cells(rep)), flush=True)
    if args.compiled_exits:  # decode through torch.compile (inductor): a minute per model and exit
        rep = runtime_report(
            ref_fam,
            fam,
            windows,
            [int(x) for x in args.compiled_exits.split(",")],
            "cpu",
            torch.bfloat16,
            args.prompt,
            args.new,
            1,
            args.repeats,
            say=print,
            compiled=True,
        )
        notes["runtime"]["bfloat16, compiled"] = rep
        print(markdown_table(*runtime_cells(rep)), flush=True)

    notes["kernels"] = kernels(fam)
    for r in notes["kernels"]:
        print(
            f"{r['linear']:>10} [{r['n']} x {r['k']}] x {r['rows']:>3} rows: int4 {r['int4_us']:.0f} us, "
            f"bf16 {r['bf16_us']:.0f} us, fp32 {r['fp32_us']:.0f} us",
            flush=True,
        )

    # table 2: the same exits in four runtimes, against one float32 reference
    embed = "head" if fam.config.tie_word_embeddings and "lm_head" in fam.grids else "int8"
    export(fam, work / "gguf", src, GGUFExport(exits=exits), progress=False)
    export(fam, work / "onnx", src, ONNXExport(exits=exits, embed=embed, accuracy_level=4), progress=False)
    ob = onnx_bench()
    hd = ref_fam.config.head_dim
    notes["rows"] = []
    for e in exits:
        ref_model = int4_model(ref_fam, dtype=torch.float32, progress=False)
        ref = ours_logits(ref_model, windows, e)
        del ref_model
        gc.collect()
        gguf_file = next((work / "gguf" / f"exit-{e}").glob("*.gguf"))
        runs = {}
        for name, dtype in (
            ("ours bf16", torch.bfloat16),
            ("ours int4 (bf16)", torch.bfloat16),
            ("ours float32", torch.float32),
        ):
            model = int4_model(fam if "int4" in name else ref_fam, dtype=dtype, progress=False)
            sp = speed(model, e, prompt[None], args.new, args.repeats)
            runs[name] = {
                **score(ref, ours_logits(model, windows, e), windows),
                **sp,
                "weights_mb": model_bytes(model) / 1e6,
            }
            del model
        sp = llama_speed(gguf_file, prompt.tolist(), args.new, args.repeats, threads)
        runs["llama.cpp Q4_0 (our file)"] = {
            **score(ref, llama_logits(gguf_file, windows), windows),
            **sp,
            "weights_mb": gguf_file.stat().st_size / 1e6,
        }
        folder = work / "onnx" / f"exit-{e}"
        sp = ob.speed(folder, prompt.tolist(), args.new)
        acc = ob.accuracy(folder / "model.onnx", [{e: r[None]} for r in ref], windows, e, hd)
        runs["onnxruntime int4 (our graph)"] = {
            "kl": acc["kl"],
            "top1": acc["top1"],
            "ppl": acc["ppl_quant"],
            **sp,
            "weights_mb": sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6,
        }
        for name, r in runs.items():
            notes["rows"].append({"exit": e, "runtime": name, **r})
            print(
                f"exit {e} {name}: ppl {r['ppl']:.3f} KL {r['kl']:.4f} top-1 {r['top1']:.3f} "
                f"prefill {r['prefill_tok_s']:.0f} decode {r['decode_tok_s']:.1f} tok/s, "
                f"weights {r['weights_mb']:.1f} MB",
                flush=True,
            )
    notes["seconds"] = time.perf_counter() - t_start
    write(notes)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write(notes: dict) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps(notes, indent=2) + "\n")
    lines = [
        f"# Runtimes on this CPU ({notes['cpus']} cores, {notes['threads']} threads), ruyi-mini",
        "",
        f"Family: {notes['family']}. Load average at the start: "
        f"{', '.join(f'{x:.2f}' for x in notes['load_average_at_start'])}.",
        "",
    ]
    for dtype, rep in notes["runtime"].items():
        flag = " --compile on" if "compiled" in dtype else ""
        lines += [
            f"## `ruyi-quant eval --runtime int4`{flag} (bf16 against int4)",
            "",
            markdown_table(*runtime_cells(rep)),
        ]
    lines += [
        "## Four runtimes, the same grids, against one float32 reference",
        "",
        f"Batch 1, prompt {notes['prompt']} tokens, {notes['new']} greedy tokens decoded, "
        f"median of {notes['repeats']}.",
        "",
    ]
    head = ["exit", "runtime", "ppl", "KL(fp32‖x)", "top-1 %", "prefill tok/s", "decode tok/s", "weights MB"]
    rows = [
        [
            str(r["exit"]),
            r["runtime"],
            f"{r['ppl']:.3f}",
            f"{r['kl']:.4f}",
            f"{100 * r['top1']:.2f}",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['weights_mb']:.1f}",
        ]
        for r in notes["rows"]
    ]
    lines.append(markdown_table(head, rows))
    lines += [
        "## One linear per call (microseconds): where the decode time goes",
        "",
        markdown_table(
            [
                "linear",
                "N x K",
                "rows",
                "int4, bf16 activations",
                "bf16 dense",
                "fp32 dense",
                "int4, fp32 activations",
            ],
            [
                [
                    r["linear"],
                    f"{r['n']} x {r['k']}",
                    str(r["rows"]),
                    f"{r['int4_us']:.0f}",
                    f"{r['bf16_us']:.0f}",
                    f"{r['fp32_us']:.0f}",
                    "-" if r["int4_fp32_us"] is None else f"{r['int4_fp32_us']:.0f}",
                ]
                for r in notes["kernels"]
            ],
        ),
    ]
    (out / "runtime_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

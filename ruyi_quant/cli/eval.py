"""`ruyi-quant eval`: a quantized family against its reference, exit by exit (perplexity, KL,
top-1, bytes); with `--runtime int4`, both run on our runtime, with speed and memory."""

from __future__ import annotations

import json
from pathlib import Path

from ..recipe import Eval
from .options import (
    add_benchmark_args,
    add_runtime_args,
    benchmark,
    console,
    default,
    exits,
    runtime,
    validated,
)


def add_parser(sub) -> None:
    E = lambda f: default(Eval, f)
    s = sub.add_parser(
        "eval",
        help="per-exit perplexity, KL and top-1 of a quantized family",
        description="Compare a quantized family with its reference, exit by exit: "
        "perplexity of both, mean KL(ref || quant), top-1 agreement, bytes.",
    )
    s.add_argument("reference", metavar="REFERENCE")
    s.add_argument("quantized", metavar="QUANTIZED")
    s.add_argument(
        "--data", help=f"text: {E('source')} (default), builtin:stdlib/eval, a .txt or .jsonl file"
    )
    s.add_argument("--samples", type=int, help=f"windows (default {E('samples')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {E('seq_len')})")
    s.add_argument("--exits", help="comma-separated exit layers, or all (default)")
    s.add_argument("--batch", type=int, help=f"windows per forward pass (default {E('batch')})")
    s.add_argument("--out", help="directory for eval.json, eval.md and eval.png")
    s.add_argument("--force", action="store_true", help="replace an existing --out of ours")
    s.add_argument(
        "--runtime",
        choices=["int4"],
        help="int4: run both families on the runtime, the "
        "reference in --dtype against the quantized family in int4: accuracy, prefill and "
        "decode tokens/s and peak memory per exit (runtime.json, .md, .png in --out)",
    )
    add_runtime_args(s)
    add_benchmark_args(s)
    s.set_defaults(func=run)


def run(args) -> None:
    from ..pipeline import eval_report, open_family
    from ..preflight import check_reference, preflight
    from ..report import eval_cells, rich_table
    from ..sources import resolve_model
    from ..store.files import atomic_dir, check_output_dir, write_marker

    ev = validated(
        Eval,
        source=args.data,
        samples=args.samples,
        seq_len=args.seq_len,
        exits=exits(args.exits),
        batch=args.batch,
        plot=args.out is not None,
    )
    inputs = [args.reference, args.quantized]
    if args.out:  # before any work: never replace a family or a job with eval files
        check_output_dir(Path(args.out), force=args.force, inputs=inputs, kind="eval")
    ref_dir = resolve_model(args.reference)
    preflight(ref_dir, ev=ev)
    ref, tok_dir = open_family(args.reference)
    fam, _ = open_family(args.quantized)
    check_reference(ref, fam, args.reference, args.quantized)
    ref.config.exit_list(ev.exits)
    if args.runtime:
        return run_runtime(args, ref, fam, tok_dir, ev)
    if args.out:
        with atomic_dir(Path(args.out), force=args.force, inputs=inputs, kind="eval") as tmp:
            report = eval_report(ref, fam, tok_dir, ev, tmp)
            ref.verify()
            fam.verify()
            write_marker(tmp, {"kind": "eval"})
    else:
        report = eval_report(ref, fam, tok_dir, ev, None)
        ref.verify()
        fam.verify()
    console().print(rich_table(f"{fam.method} vs reference on {ev.source}", *eval_cells(report)))


def run_runtime(args, ref, fam, tok_dir, ev) -> None:
    """`eval --runtime int4`: the reference in bf16 (or --dtype) against the family in int4."""
    from ..quant.calibrate import pick_device
    from ..recipe import dtype_of
    from ..report import rich_table, runtime_cells, runtime_markdown, runtime_plot
    from ..runtime.validate import runtime_report
    from ..store.files import atomic_dir, write_marker
    from ..text import eval_windows

    rt, bench = runtime(args), benchmark(args)
    device, dtype = pick_device(rt.device), dtype_of(rt.dtype)
    con = console()
    windows = eval_windows(tok_dir, ev)
    exits_ = ref.config.exit_list(ev.exits)

    def measure():
        return runtime_report(
            ref,
            fam,
            windows,
            exits_,
            device,
            dtype,
            bench.prefill,
            bench.decode_tokens,
            bench.prompts,
            bench.repeats,
            ev.batch,
            say=lambda m: con.print(m, markup=False),
            compiled=compiled(rt, device),
        )

    if args.out:
        with atomic_dir(
            Path(args.out), force=args.force, inputs=[args.reference, args.quantized], kind="eval"
        ) as tmp:
            report = measure()
            ref.verify()
            fam.verify()
            report["source"] = ev.source
            (tmp / "runtime.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "runtime.md").write_text(runtime_markdown(report))
            runtime_plot(report, tmp / "runtime.png")
            write_marker(tmp, {"kind": "eval"})
    else:
        report = measure()
        ref.verify()
        fam.verify()
    con.print(rich_table(runtime_markdown(report).splitlines()[0], *runtime_cells(report)))


def compiled(rt, device) -> bool:
    """Decode through torch.compile: `on`, or `auto` on CUDA."""
    return rt.compile == "on" or (rt.compile == "auto" and device.type == "cuda")

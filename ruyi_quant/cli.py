"""`ruyi-quant` subcommands. Argument parsing and printing only; the work is in pipeline.py.

A user's mistake is one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. The builders (make-familial, make-synthetic) are in cli_make.py, option helpers in
cli_options.py; over 400 lines because of the argparse tables (build_parser, about half), which
read best in one place.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_make import cmd_make_familial, cmd_make_synthetic
from .cli_onnx import add_export_args
from .cli_options import _console
from .cli_runtime import add_eval_args, add_parsers as add_runtime_parsers
from .cli_options import _default, _exits, _override, _validated
from .errors import Terminated, UserError
from .log import log_to_stderr

EXAMPLES = """examples:
  ruyi-quant inspect builtin:tiny
  ruyi-quant quantize builtin:tiny --bits 4 --group-size 32 --out out/tiny-rtn4
  ruyi-quant export out/tiny-rtn4 --format hf --out out/tiny-rtn4-hf
  ruyi-quant eval builtin:tiny out/tiny-rtn4 --samples 8 --seq-len 128
  ruyi-quant run recipes/demo.yaml
"""


# --- subcommands ---------------------------------------------------------------------------
def cmd_inspect(args) -> None:
    from .fsutil import atomic_file, check_writable
    from .pipeline import open_family
    from .report import rich_table
    if args.json:
        check_writable(Path(args.json), "--json", directory=False)
    fam, where = open_family(args.model, hashes=False)     # headers and sizes: no values are read
    c = fam.config
    con = _console()
    heads = "tied to embeddings" if c.tie_word_embeddings else ("shared" if c.shared_heads else "per exit")
    con.print(f"{args.model}: {c.source_type}, {c.num_layers} trunk layers, hidden {c.hidden_size}, "
              f"vocab {c.vocab_size}, heads {heads}, exits {c.exits}, quantization: {fam.method}",
              soft_wrap=True, markup=False)
    rows = []
    for j, e in enumerate(c.exits):
        params, nbytes = fam.stored_size(fam.exit_tensor_names(j))
        rows.append([f"E{j} (layer {e})", str(e + 1), f"{params / 1e6:.2f}", f"{nbytes / 1e6:.2f}"])
    params, nbytes = fam.stored_size()
    rows.append(["family", str(c.num_layers + len(c.exits) - 1), f"{params / 1e6:.2f}",
                 f"{nbytes / 1e6:.2f}"])
    con.print(rich_table("parameters and bytes per exit",
                         ["exit", "layers run", "params (M)", "weights MB (as stored)"], rows))
    from .fsutil import disk_bytes
    on_disk = disk_bytes(where)
    con.print(f"on disk: {on_disk / 1e6:.2f} MB (every file under {where})", markup=False, soft_wrap=True)
    if args.json:
        out = {"exits": c.exits, "per_exit": rows, "family": {"params": params, "bytes": nbytes},
               "disk_bytes": on_disk}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_file(Path(args.json), json.dumps(out, indent=2) + "\n", "--json")


def cmd_quantize(args) -> None:
    from .checkpoint import save_family
    from .fsutil import atomic_dir, check_output_dir
    from .pipeline import quantize_source, spilling
    from .preflight import preflight
    from .recipe import AWQOptions, Calibration, GPTQOptions, Override, Provenance, Quantize
    from .sources import resolve_model
    flag = dict.fromkeys(("pattern", "bits", "group_size", "sym"), "--override")
    overrides = [_validated(Override, flag, **_override(t)) for t in args.override or []]
    overrides += [_validated(Override, {"pattern": "--skip"}, **_override(t, skip=True))
                  for t in args.skip or []]
    q = _validated(Quantize, method=args.method, bits=args.bits, group_size=args.group_size,
                   sym=False if args.asym else None, heads=args.heads, overrides=overrides,
                   device=args.device,
                   gptq=_validated(GPTQOptions, damp_percent=args.damp, act_order=args.act_order,
                                   static_groups=args.static_groups),
                   awq=_validated(AWQOptions, {"max_tokens": "--awq-tokens"},
                                  clip=False if args.no_clip else None, max_tokens=args.awq_tokens))
    cal = _validated(Calibration, {"source": "--calib"}, source=args.calib, samples=args.samples,
                     seq_len=args.seq_len, seed=args.seed)
    out = Path(args.out)
    check_output_dir(out, force=args.force, inputs=[args.model], kind="family")
    src = resolve_model(args.model)
    preflight(src, q, cal)
    with atomic_dir(out, force=args.force, inputs=[src], kind="family") as tmp, spilling(out) as spill:
        ref, fam = quantize_source(src, q, cal, spill=spill)
        fam.provenance = Provenance(model=args.model, quantize=q, calibration=cal)
        save_family(fam, tmp, src)
        ref.verify()
    from .fsutil import disk_bytes
    from .resources import peak_rss_bytes
    print(f"wrote {out} ({len(fam.grids)} quantized linears, {disk_bytes(out) / 1e6:.2f} MB on disk; "
          f"peak RSS {peak_rss_bytes() / 1e9:.2f} GB)")


def cmd_export(args) -> None:
    from .data import check_tokenizer
    from .fsutil import atomic_dir, check_output_dir, write_marker
    from .pipeline import export_gguf, export_hf, open_family
    from .recipe import Calibration, GGUFExport, HFExport, Provenance
    source, fmt = args.source or args.family, args.format
    if args.family in ("hf", "gguf", "onnx") and args.source and not Path(args.family).exists():
        fmt = fmt or args.family                  # `export gguf --from X`
    if args.family and args.source and args.family != fmt:
        raise UserError(f"give the family once: FAMILY ({args.family}) or --from ({args.source})")
    if source is None:
        raise UserError("export: name the family to export (FAMILY or --from)")
    fmt = fmt or ("gguf" if source.endswith(".gguf") else "hf")
    out = Path(args.out)
    if fmt == "gguf":
        ex = _validated(GGUFExport, exits=_exits(args.exits), type=args.type, embed_type=args.embed_type,
                        head_type=args.head_type, multi=args.multi or args.multi_only,
                        per_exit=not args.multi_only, name=args.name, license=args.license,
                        imatrix=not args.no_imatrix)
        if source.endswith(".gguf"):
            return _extract_gguf(source, ex, out, args.force)
        check_output_dir(out, force=args.force, inputs=[source], kind="export")
        fam, tok_dir = open_family(source)
        fam.provenance = fam.provenance or Provenance(model=source)   # a source model: its own name
        fam.config.exit_list(ex.exits)
        check_tokenizer(tok_dir)
        with atomic_dir(out, force=args.force, inputs=[tok_dir], kind="export") as tmp:
            info = export_gguf(fam, tmp, tok_dir, ex,
                               calib=_validated(Calibration, source=args.calib))
            fam.verify()
            write_marker(tmp, {"kind": "export", "format": "gguf", **info})
        for x in info["exits"]:
            print(f"wrote {out / ('exit-%d' % x['exit']) / x['file']} ({x['bytes'] / 1e6:.2f} MB) + Modelfile")
        if info["multi"]:
            m = info["multi"]
            print(f"wrote {out / m['file']} ({m['bytes'] / 1e6:.2f} MB, every exit; per-exit files "
                  f"together {sum(x['bytes'] for x in info['exits']) / 1e6:.2f} MB)")
        return None
    if fmt == "onnx":
        from .cli_onnx import cmd_export_onnx
        return cmd_export_onnx(args, source, out)
    if fmt != "hf":
        raise UserError(f"--format {fmt}: supported formats are hf, gguf and onnx")
    ex = _validated(HFExport, format=fmt, exits=_exits(args.exits), weights=args.weights, dtype=args.dtype)
    check_output_dir(out, force=args.force, inputs=[source], kind="export")
    fam, tok_dir = open_family(source)
    fam.config.exit_list(ex.exits)
    check_tokenizer(tok_dir)
    with atomic_dir(out, force=args.force, inputs=[tok_dir], kind="export") as tmp:
        dirs = export_hf(fam, tmp, tok_dir, ex.exits, ex.weights, ex.dtype)
        fam.verify()
        write_marker(tmp, {"kind": "export", "format": ex.format, "exits": [d.name for d in dirs]})
    from .exporters.hf import load_note
    from .fsutil import MARKER, disk_bytes
    for d in dirs:
        print(f"wrote {out / d.name} ({disk_bytes(out / d.name) / 1e6:.2f} MB on disk)")
    note = load_note(json.loads((out / dirs[0].name / MARKER).read_text())["weights"]) if dirs else None
    if note:
        print(f"note: {note}")


def _extract_gguf(source: str, ex, out: Path, force: bool) -> None:
    """Stock per-exit files copied out of a multi-exit GGUF (no re-quantization)."""
    from .exporters.gguf import extract
    from .fsutil import atomic_dir, check_output_dir, write_marker
    if not Path(source).is_file():
        raise UserError(f"{source}: no such file")
    check_output_dir(out, force=force, inputs=[source], kind="export")
    with atomic_dir(out, force=force, inputs=[source], kind="export") as tmp:
        infos = extract(Path(source), None if ex.exits == "all" else ex.exits, tmp)
        write_marker(tmp, {"kind": "export", "format": "gguf", "from": source, "exits": infos})
    for x in infos:
        print(f"wrote {out / ('exit-%d' % x['exit']) / x['file']} ({x['bytes'] / 1e6:.2f} MB)")


def cmd_eval(args) -> None:
    from .fsutil import atomic_dir, check_output_dir, write_marker
    from .pipeline import eval_report, open_family
    from .preflight import check_reference, preflight
    from .recipe import Eval
    from .sources import resolve_model
    from .report import eval_cells, rich_table
    ev = _validated(Eval, {"source": "--data"}, source=args.data, samples=args.samples,
                    seq_len=args.seq_len, exits=_exits(args.exits), batch=args.batch,
                    plot=args.out is not None)
    inputs = [args.reference, args.quantized]
    if args.out:                  # before any work: never replace a family or a job with eval files
        check_output_dir(Path(args.out), force=args.force, inputs=inputs, kind="eval")
    ref_dir = resolve_model(args.reference)
    preflight(ref_dir, ev=ev)
    ref, tok_dir = open_family(args.reference)
    fam, _ = open_family(args.quantized)
    check_reference(ref, fam, args.reference, args.quantized)
    ref.config.exit_list(ev.exits)
    if args.runtime:
        from .cli_runtime import cmd_eval_runtime
        return cmd_eval_runtime(args, ref, fam, tok_dir, ev)
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
    _console().print(rich_table(f"{fam.method} vs reference on {ev.source}", *eval_cells(report)))


def cmd_run(args) -> None:
    from .pipeline import run_job
    from .recipe import load_recipe
    from .report import eval_cells, rich_table
    recipe, base = load_recipe(args.recipe)
    jobs = [j for j in recipe.jobs if not args.only or j.name in args.only]
    if args.only and not jobs:
        raise UserError(f"--only {','.join(args.only)}: no such job (jobs: "
                        f"{', '.join(j.name for j in recipe.jobs)})")
    from .preflight import check_job
    index = {id(j): i for i, j in enumerate(recipe.jobs)}
    for job in jobs:                                 # every job checked before the first runs
        check_job(job, base, index[id(job)])
    con = _console()
    results = []
    for job in jobs:
        res = run_job(job, base, force=args.force, say=lambda m: con.print(m, markup=False),
                      index=index[id(job)])
        results.append((job, res))
        if res.get("eval"):
            con.print(rich_table(f"{job.name}: {res['method']} vs reference",
                                 *eval_cells(res["eval"])))
    rows = [[j.name, r["status"], r["output"], f"{r.get('seconds', 0):.1f}"] for j, r in results]
    con.print(rich_table("jobs", ["job", "status", "output", "seconds"], rows))


# --- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .recipe import AWQOptions, Calibration, Eval, GGUFExport, GPTQOptions, HFExport, ONNXExport, Quantize, Training
    Q, C, E, T = (lambda f: _default(Quantize, f)), (lambda f: _default(Calibration, f)), \
        (lambda f: _default(Eval, f)), (lambda f: _default(Training, f))
    p = argparse.ArgumentParser(
        prog="ruyi-quant", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize and export familial (early-exit) language models. MODEL is a "
                    "checkpoint directory (ruyi_qwen2, qwen2 or llama safetensors) or builtin:tiny.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="exits, parameters and bytes per exit and for the family",
                       description="Show a model's exits with the parameters and bytes each exit runs "
                                   "on, and the whole family's.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("quantize", help="quantize a family (trunk, branches, optionally heads)",
                       description="Quantize every trunk and branch linear (and the heads with "
                                   "--heads) and write a quantized family checkpoint.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--out", required=True, help="output directory (written whole or not at all)")
    s.add_argument("--method", help=f"rtn (round to nearest), gptq, awq, or none (no quantization: the "
                   f"family as it is, e.g. to export it in float) (default {Q('method')})")
    s.add_argument("--bits", type=int, help=f"2, 3, 4 or 8 (default {Q('bits')})")
    s.add_argument("--group-size", type=int,
                   help=f"-1 or 16..1024, power of two (default {Q('group_size')})")
    s.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    s.add_argument("--heads", action="store_true", help="quantize the heads too")
    s.add_argument("--override", action="append", metavar="PATTERN:KEY=VAL,...",
                   help="per-module grid, e.g. 'model.layers.*.mlp.down_proj:bits=8'")
    s.add_argument("--skip", action="append", metavar="PATTERN", help="leave matching modules unquantized")
    s.add_argument("--calib", help=f"calibration text for gptq/awq: {C('source')} (default), a .txt "
                   "or .jsonl file")
    s.add_argument("--samples", type=int, help=f"calibration windows (default {C('samples')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {C('seq_len')})")
    s.add_argument("--seed", type=int, help=f"calibration window seed (default {C('seed')})")
    s.add_argument("--damp", type=float,
                   help=f"gptq dampening (default {_default(GPTQOptions, 'damp_percent')})")
    s.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing diag(H)")
    s.add_argument("--static-groups", action="store_true", help="gptq: group grids fixed up front")
    s.add_argument("--no-clip", action="store_true", help="awq: skip the clipping search")
    s.add_argument("--awq-tokens", type=int, help="awq: activation rows sampled per scale search "
                   f"(default {_default(AWQOptions, 'max_tokens')}; fewer is faster on a CPU)")
    s.add_argument("--device", help=f"auto (cuda when present), cpu, cuda (default {Q('device')})")
    s.add_argument("--force", action="store_true", help="replace an existing output of ours")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("export", help="per-exit checkpoints (hf: transformers; gguf: llama.cpp; "
                       "onnx: onnxruntime)",
                       description="Export each exit of a family as a standalone checkpoint: "
                       "hf (Qwen2ForCausalLM, or LlamaForCausalLM for a non-Qwen2 tokenizer; GPTQ/AWQ/float) or gguf (stock qwen2 GGUF + Ollama "
                       "Modelfile per exit, and/or one multi-exit GGUF). `export gguf --from "
                       "FAMILY.gguf [--exit E]` copies exits (all by default) out of a multi-exit GGUF. onnx: a "
                       "decoder graph with KV cache per exit (our grids in MatMulNBits) that "
                       "onnxruntime-genai loads, and/or one multi-exit folder.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("family", metavar="FAMILY", nargs="?",
                   help="quantized family directory, any MODEL, or a multi-exit .gguf")
    s.add_argument("--from", dest="source", metavar="FAMILY", help="the same as FAMILY")
    s.add_argument("--format", default=None, help="hf (default), gguf or onnx")
    s.add_argument("--out", required=True)
    s.add_argument("--exits", "--exit", help="comma-separated exit layers, or all (default)")
    s.add_argument("--weights", help=f"hf: auto (the family's layout), float, gptq, awq (default "
                   f"{_default(HFExport, 'weights')}); onnx: auto, float")
    s.add_argument("--dtype", help=f"hf float weights: bfloat16, float16, float32 (default "
                   f"{_default(HFExport, 'dtype')}); onnx: float32 (default), float16")
    s.add_argument("--type", help="gguf: auto (default; our grids exactly: Q4_0 sym, Q4_1 "
                   "asym, Q8_0 8-bit; float linears f16), f32, f16, bf16, q8_0, q4_0, q4_1; from a "
                   "float model also llama.cpp's q4_k_m, q5_k_m, q6_k")
    s.add_argument("--embed-type", help=f"gguf: token embedding type (default "
                   f"{_default(GGUFExport, 'embed_type')}: q8_0 in 4-bit files)")
    s.add_argument("--head-type", help=f"gguf: float head type (default "
                   f"{_default(GGUFExport, 'head_type')}: q8_0 in 4-bit files)")
    s.add_argument("--multi", action="store_true", help="gguf, onnx: also write the multi-exit file")
    s.add_argument("--multi-only", action="store_true", help="gguf, onnx: only the multi-exit file")
    add_export_args(s, lambda key: _default(ONNXExport, key))
    s.add_argument("--name", help="gguf: general.name (default: the model's name)")
    s.add_argument("--license", help="gguf: general.license (default: the source's, when known)")
    s.add_argument("--calib", help=f"gguf K-quants: text of the importance matrix (default "
                   f"{C('source')}, {C('samples')} x {C('seq_len')} tokens)")
    s.add_argument("--no-imatrix", action="store_true",
                   help="gguf K-quants: llama.cpp's plain rounding, no importance matrix")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("eval", help="per-exit perplexity, KL and top-1 of a quantized family",
                       description="Compare a quantized family with its reference, exit by exit: "
                                   "perplexity of both, mean KL(ref || quant), top-1 agreement, bytes.")
    s.add_argument("reference", metavar="REFERENCE")
    s.add_argument("quantized", metavar="QUANTIZED")
    s.add_argument("--data", help=f"text: {E('source')} (default), builtin:stdlib/eval, a .txt or "
                   ".jsonl file")
    s.add_argument("--samples", type=int, help=f"windows (default {E('samples')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {E('seq_len')})")
    s.add_argument("--exits", help="comma-separated exit layers, or all (default)")
    s.add_argument("--batch", type=int, help=f"windows per forward pass (default {E('batch')})")
    s.add_argument("--out", help="directory for eval.json, eval.md and eval.png")
    s.add_argument("--force", action="store_true", help="replace an existing --out of ours")
    add_eval_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("make-familial", help="turn a plain Qwen2/Llama model into a trained family",
                       description="Choose exit layers; each branch layer starts as a copy of trunk "
                                   "layer e and is trained with its norm (trunk and heads frozen) on "
                                   "local text: next-token loss, optionally distilled from the last "
                                   "exit. Writes a bf16 ruyi_qwen2 checkpoint.")
    s.add_argument("model", metavar="MODEL", help="a plain checkpoint directory or builtin:smollm2")
    s.add_argument("--exits", required=True, help="exit layers, e.g. 12,16,20,25,29 (the last "
                                                  "layer is always an exit)")
    s.add_argument("--out", required=True)
    s.add_argument("--separate-heads", action="store_true", help="one head per exit (default shared)")
    s.add_argument("--train", action="append", metavar="SOURCE",
                   help=f"training text, repeatable (default {' and '.join(T('sources'))})")
    s.add_argument("--windows", type=int, help=f"training windows (default {T('windows')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {T('seq_len')})")
    s.add_argument("--steps", type=int, help=f"optimizer steps per exit (default {T('steps')})")
    s.add_argument("--lr", type=float, help=f"peak learning rate (default {T('lr')})")
    s.add_argument("--positions", type=int,
                   help=f"loss positions per window and step (default {T('positions')})")
    s.add_argument("--distill", type=float,
                   help=f"weight of KL(last exit || exit) (default {T('distill_weight')})")
    s.add_argument("--seed", type=int, help=f"(default {T('seed')})")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_make_familial)

    s = sub.add_parser("make-synthetic", help="a Ruyi-7B-shaped family with random weights (for "
                       "memory and speed measurements)", description="Write AI-Flow-Ruyi-7B's "
                       "exact config with random bf16 weights, shard by shard (never in memory): "
                       "28 layers, exits 11,15,19,23,27, separate heads, 21.5 GB. Random weights: "
                       "for memory and speed measurements only.")
    s.add_argument("--out", required=True)
    s.add_argument("--depth", type=int, help="trunk layers (default 28); same widths")
    s.add_argument("--exits", help="exit layers, ascending, the last = depth - 1 (default: Ruyi's "
                   "below the depth, then depth - 1)")
    s.add_argument("--seed", type=int, help="(default 0)")
    s.add_argument("--shard-gb", type=float, help="maximum shard size in GB (default 5)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_make_synthetic)

    add_runtime_parsers(sub)

    s = sub.add_parser("run", help="run the jobs of a recipe YAML", description=(
        "Run a recipe's jobs in order. A job whose outputs are complete and unchanged (manifest "
        "with sha256 of every artifact) is skipped. See recipes/README.md for the format."))
    s.add_argument("recipe", metavar="RECIPE")
    s.add_argument("--only", action="append", metavar="JOB", help="run only this job (repeatable)")
    s.add_argument("--force", action="store_true", help="rerun jobs even when complete")
    s.set_defaults(func=cmd_run)
    return p


FREE_TEXT = ("prompt", "system")   # free text: may be empty, and the same prompt twice is a batch


def check_values(parser: argparse.ArgumentParser, args) -> None:
    """What the parser lets through: an empty value (a path, a name, a setting) and a repeatable
    option given the same value twice are one line naming the option."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        if action.dest in FREE_TEXT or not isinstance(value, (str, list)):
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise UserError(f"{name} '': is empty; give a value (ruyi-quant {args.command} --help)")
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise UserError(f"{name} {dup}: given twice; give each once")


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user's mistake or an OS error (disk full, permissions: one line),
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Interrupted or terminated work leaves nothing
    behind: the temporary output is removed on the way out."""
    import signal
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_values(parser, args)
        log_to_stderr()
        args.func(args)
    except UserError as e:
        print(f"ruyi-quant: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("ruyi-quant: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("ruyi-quant: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        from .errors import write_problem
        problem = write_problem(e, e.filename)
        if problem is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"ruyi-quant: error: {where}{problem}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`ruyi-quant make-familial` and `make-synthetic`: the subcommands that build a family rather
than quantize one."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..recipe import Training
from .options import default, validated
from .options import exits as parse_exits


def add_parser(sub) -> None:
    T = lambda f: default(Training, f)
    s = sub.add_parser(
        "make-familial",
        help="turn a plain Qwen2/Llama model into a trained family",
        description="Choose exit layers; each branch layer starts as a copy of trunk "
        "layer e and is trained with its norm (trunk and heads frozen) on "
        "local text: next-token loss, optionally distilled from the last "
        "exit. Writes a bf16 ruyi_qwen2 checkpoint.",
    )
    s.add_argument("model", metavar="MODEL", help="a plain checkpoint directory or builtin:smollm2")
    s.add_argument(
        "--exits", required=True, help="exit layers, e.g. 12,16,20,25,29 (the last layer is always an exit)"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--separate-heads", action="store_true", help="one head per exit (default shared)")
    s.add_argument(
        "--train",
        action="append",
        metavar="SOURCE",
        help=f"training text, repeatable (default {' and '.join(T('sources'))})",
    )
    s.add_argument("--windows", type=int, help=f"training windows (default {T('windows')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {T('seq_len')})")
    s.add_argument("--steps", type=int, help=f"optimizer steps per exit (default {T('steps')})")
    s.add_argument("--lr", type=float, help=f"peak learning rate (default {T('lr')})")
    s.add_argument(
        "--positions", type=int, help=f"loss positions per window and step (default {T('positions')})"
    )
    s.add_argument(
        "--distill", type=float, help=f"weight of KL(last exit || exit) (default {T('distill_weight')})"
    )
    s.add_argument("--seed", type=int, help=f"(default {T('seed')})")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=run_make_familial)

    s = sub.add_parser(
        "make-synthetic",
        help="a Ruyi-7B-shaped family with random weights (for memory and speed measurements)",
        description="Write AI-Flow-Ruyi-7B's "
        "exact config with random bf16 weights, shard by shard (never in memory): "
        "28 layers, exits 11,15,19,23,27, separate heads, 21.5 GB. Random weights: "
        "for memory and speed measurements only.",
    )
    s.add_argument("--out", required=True)
    s.add_argument("--depth", type=int, help="trunk layers (default 28); same widths")
    s.add_argument(
        "--exits",
        help="exit layers, ascending, the last = depth - 1 (default: Ruyi's below the depth, then depth - 1)",
    )
    s.add_argument("--seed", type=int, help="(default 0)")
    s.add_argument("--shard-gb", type=float, help="maximum shard size in GB (default 5)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=run_make_synthetic)


def run_make_familial(args) -> None:
    from ..model.config import read_config
    from ..preflight import check_seq_len
    from ..sources import resolve_model
    from ..sources.branches import build_familial
    from ..store.files import check_output_dir
    from ..text import check_source, check_tokenizer

    train = validated(
        Training,
        sources=args.train,
        windows=args.windows,
        seq_len=args.seq_len,
        steps=args.steps,
        lr=args.lr,
        positions=args.positions,
        distill_weight=args.distill,
        seed=args.seed,
    )
    check_output_dir(Path(args.out), force=args.force, inputs=[args.model], kind="source")
    for source in train.sources:
        check_source(source)
    src = resolve_model(args.model)
    cfg = read_config(src)
    if len(cfg.exits) != 1:
        raise UserError(f"{args.model}: already a family (exits {cfg.exits}); give a plain Qwen2/Llama model")
    exits = parse_exits(args.exits)
    if exits == "all" or not exits:
        raise UserError("--exits: give the exit layers, e.g. 12,16,20,25,29")
    last = cfg.num_layers - 1
    exits = sorted(set(exits) | {last})
    bad = [e for e in exits if not 0 <= e <= last]
    if bad:
        raise UserError(f"--exits: {bad} outside the model's layers 0..{last}")
    check_seq_len(cfg, train.seq_len, "--seq-len")
    check_tokenizer(src)
    report = build_familial(
        src, Path(args.out), exits, shared_heads=not args.separate_heads, train=train, force=args.force
    )
    ppl = report.get("ppl_bf16", {})
    print(
        f"wrote {args.out}: exits {report['exits']}"
        + (", bf16 perplexity " + ", ".join(f"{e}: {p:.1f}" for e, p in ppl.items()) if ppl else "")
    )


def run_make_synthetic(args) -> None:
    from ..errors import free_bytes
    from ..sources.synthetic import numel, synthetic_config, tensor_shapes, write_synthetic
    from ..store.files import atomic_dir, check_output_dir

    depth = 28 if args.depth is None else args.depth
    if not 1 <= depth <= 28:
        raise UserError(f"--depth {depth}: give 1..28 trunk layers")
    exits = None if args.exits is None else parse_exits(args.exits)
    if exits == "all":
        raise UserError("--exits: give the exit layers, e.g. 1,2")
    if exits is not None and (sorted(set(exits)) != exits or exits[0] < 0 or exits[-1] != depth - 1):
        raise UserError(f"--exits {args.exits}: ascending layer indices ending with depth - 1 = {depth - 1}")
    if args.shard_gb is not None and not 0.001 <= args.shard_gb <= 1000:
        raise UserError(f"--shard-gb {args.shard_gb}: give a size between 0.001 and 1000 GB")
    out = Path(args.out)
    check_output_dir(out, force=args.force, kind="source")
    cfg = synthetic_config(depth, exits)
    need = 2 * sum(numel(s) for s in tensor_shapes(cfg).values())
    free = free_bytes(out.resolve())
    if free is not None and need > free:
        raise UserError(
            f"--out {out}: needs {need / 1e9:.1f} GB, its file system has {free / 1e9:.1f} GB free"
        )
    shard = int((args.shard_gb or 5.0) * 1e9)
    with atomic_dir(out, force=args.force, kind="source") as tmp:
        report = write_synthetic(tmp, depth, exits, seed=args.seed or 0, shard_bytes=shard)
    print(
        f"wrote {out}: synthetic Ruyi-7B-shaped family (random weights: for memory and speed "
        f"measurements only), {report['parameters'] / 1e9:.2f}B parameters, exits {report['exits']}, "
        f"{need / 1e9:.2f} GB of bf16 tensors"
    )

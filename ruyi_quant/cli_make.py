"""`ruyi-quant make-familial` and `make-synthetic`: the subcommands that build a family rather
than quantize one (cli.py holds the rest; split out to keep each module a readable size)."""

from __future__ import annotations

from pathlib import Path

from .cli_options import _exits, _validated
from .errors import UserError


def cmd_make_familial(args) -> None:
    from .data import check_source, check_tokenizer
    from .fsutil import check_output_dir
    from .model.config import read_config
    from .preflight import check_seq_len
    from .recipe import Training
    from .sources import resolve_model
    from .sources.branches import build_familial
    train = _validated(Training, sources=args.train, windows=args.windows, seq_len=args.seq_len,
                       steps=args.steps, lr=args.lr, positions=args.positions, distill_weight=args.distill,
                       seed=args.seed)
    check_output_dir(Path(args.out), force=args.force, inputs=[args.model], kind="source")
    for source in train.sources:
        check_source(source)
    src = resolve_model(args.model)
    cfg = read_config(src)
    if len(cfg.exits) != 1:
        raise UserError(f"{args.model}: already a family (exits {cfg.exits}); give a plain Qwen2/Llama model")
    exits = _exits(args.exits)
    if exits == "all" or not exits:
        raise UserError("--exits: give the exit layers, e.g. 12,16,20,25,29")
    last = cfg.num_layers - 1
    exits = sorted(set(exits) | {last})
    bad = [e for e in exits if not 0 <= e <= last]
    if bad:
        raise UserError(f"--exits: {bad} outside the model's layers 0..{last}")
    check_seq_len(cfg, train.seq_len, "--seq-len")
    check_tokenizer(src)
    report = build_familial(src, Path(args.out), exits, shared_heads=not args.separate_heads,
                            train=train, force=args.force)
    ppl = report.get("ppl_bf16", {})
    print(f"wrote {args.out}: exits {report['exits']}" +
          (", bf16 perplexity " + ", ".join(f"{e}: {p:.1f}" for e, p in ppl.items()) if ppl else ""))


def cmd_make_synthetic(args) -> None:
    from .errors import free_bytes
    from .fsutil import atomic_dir, check_output_dir
    from .synthetic import numel, synthetic_config, tensor_shapes, write_synthetic
    depth = 28 if args.depth is None else args.depth
    if not 1 <= depth <= 28:
        raise UserError(f"--depth {depth}: give 1..28 trunk layers")
    exits = None if args.exits is None else _exits(args.exits)
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
        raise UserError(f"--out {out}: needs {need / 1e9:.1f} GB, its file system has {free / 1e9:.1f} GB free")
    shard = int((args.shard_gb or 5.0) * 1e9)
    with atomic_dir(out, force=args.force, kind="source") as tmp:
        report = write_synthetic(tmp, depth, exits, seed=args.seed or 0, shard_bytes=shard)
    print(f"wrote {out}: synthetic Ruyi-7B-shaped family (random weights: for memory and speed "
          f"measurements only), {report['parameters'] / 1e9:.2f}B parameters, exits {report['exits']}, "
          f"{need / 1e9:.2f} GB of bf16 tensors")

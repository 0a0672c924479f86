"""`ruyi-quant quantize`: a family's trunk, branches and (optionally) heads, into a family
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..recipe import AWQOptions, Calibration, GPTQOptions, Override, Provenance, Quantize
from .options import default, override, validated


def add_parser(sub) -> None:
    Q, C = (lambda f: default(Quantize, f)), (lambda f: default(Calibration, f))
    s = sub.add_parser(
        "quantize",
        help="quantize a family (trunk, branches, optionally heads)",
        description="Quantize every trunk and branch linear (and the heads with "
        "--heads) and write a quantized family checkpoint.",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--out", required=True, help="output directory (written whole or not at all)")
    s.add_argument(
        "--method",
        help=f"rtn (round to nearest), gptq, awq, or none (no quantization: the "
        f"family as it is, e.g. to export it in float) (default {Q('method')})",
    )
    s.add_argument("--bits", type=int, help=f"2, 3, 4 or 8 (default {Q('bits')})")
    s.add_argument("--group-size", type=int, help=f"-1 or 16..1024, power of two (default {Q('group_size')})")
    s.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    s.add_argument("--heads", action="store_true", help="quantize the heads too")
    s.add_argument(
        "--override",
        action="append",
        metavar="PATTERN:KEY=VAL,...",
        help="per-module grid, e.g. 'model.layers.*.mlp.down_proj:bits=8'",
    )
    s.add_argument("--skip", action="append", metavar="PATTERN", help="leave matching modules unquantized")
    s.add_argument(
        "--calib",
        help=f"calibration text for gptq/awq: {C('source')} (default), a .txt or .jsonl file, or "
        "several mixed, e.g. 'builtin:pydoc/calib + builtin:stdlib/calib' (windows split evenly)",
    )
    s.add_argument("--samples", type=int, help=f"calibration windows (default {C('samples')})")
    s.add_argument("--seq-len", type=int, help=f"tokens per window (default {C('seq_len')})")
    s.add_argument("--seed", type=int, help=f"calibration window seed (default {C('seed')})")
    s.add_argument(
        "--damp", type=float, help=f"gptq dampening (default {default(GPTQOptions, 'damp_percent')})"
    )
    s.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        help="gptq: columns by decreasing diag(H) (default: on with --gguf, else off)",
    )
    s.add_argument("--static-groups", action="store_true", help="gptq: group grids fixed up front")
    s.add_argument(
        "--awq-scales", action="store_true", help="gptq: AWQ's scales searched and folded in first"
    )
    s.add_argument("--no-clip", action="store_true", help="awq: skip the clipping search")
    s.add_argument(
        "--awq-tokens",
        type=int,
        help="awq: activation rows sampled per scale search "
        f"(default {default(AWQOptions, 'max_tokens')}; fewer is faster on a CPU)",
    )
    s.add_argument(
        "--gguf",
        help="gptq/awq: round into llama.cpp's block types for this file type (q4_k_m, q5_k_m, q6_k), "
        "tensor by tensor as llama.cpp's quantizer types every exit's file; export --format gguf "
        "writes them exactly",
    )
    s.add_argument("--device", help=f"auto (cuda when present), cpu, cuda (default {Q('device')})")
    s.add_argument("--force", action="store_true", help="replace an existing output of ours")
    s.set_defaults(func=run)


def run(args) -> None:
    from ..log import peak_rss_bytes
    from ..pipeline import quantize_source, spilling
    from ..preflight import preflight
    from ..sources import resolve_model
    from ..store.checkpoint import save_family
    from ..store.files import atomic_dir, check_output_dir, disk_bytes

    flag = dict.fromkeys(("pattern", "bits", "group_size", "sym"), "--override")
    overrides = [validated(Override, flag, **override(t)) for t in args.override or []]
    overrides += [
        validated(Override, {"pattern": "--skip"}, **override(t, skip=True)) for t in args.skip or []
    ]
    q = validated(
        Quantize,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=False if args.asym else None,
        heads=args.heads,
        overrides=overrides,
        device=args.device,
        gguf=args.gguf,
        gptq=validated(
            GPTQOptions,
            damp_percent=args.damp,
            act_order=args.act_order,
            static_groups=args.static_groups,
            awq_scales=args.awq_scales,
        ),
        awq=validated(
            AWQOptions,
            clip=False if args.no_clip else None,
            max_tokens=args.awq_tokens,
        ),
    )
    cal = validated(
        Calibration,
        source=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    out = Path(args.out)
    check_output_dir(out, force=args.force, inputs=[args.model], kind="family")
    src = resolve_model(args.model)
    preflight(src, q, cal)
    with atomic_dir(out, force=args.force, inputs=[src], kind="family") as tmp, spilling(out) as spill:
        ref, fam = quantize_source(src, q, cal, spill=spill)
        fam.provenance = Provenance(model=args.model, quantize=q, calibration=cal)
        save_family(fam, tmp, src, progress=True)
        ref.verify()
    print(
        f"wrote {out} ({len(fam.grids)} quantized linears, {disk_bytes(out) / 1e6:.2f} MB on disk; "
        f"peak RSS {peak_rss_bytes() / 1e9:.2f} GB)"
    )

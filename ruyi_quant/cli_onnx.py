"""`ruyi-quant export --format onnx` and `ruyi-quant generate --onnx`: the ONNX side of the
command line (cli.py holds the rest; split out to keep each module a readable size)."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_options import _exits, _validated
from .errors import UserError, require

ONNX_PIP = "pip install 'ruyi-quant[onnx]'"


def cmd_export_onnx(args, source: str, out: Path) -> None:
    """Per-exit ONNX folders and/or the multi-exit folder of a family."""
    for module in ("onnx", "onnxruntime"):
        require(module, "--format onnx", ONNX_PIP)
    from .data import check_tokenizer
    from .exporters.onnx import MULTI_FOLDER, check_onnx
    from .fsutil import atomic_dir, check_output_dir, disk_bytes, write_marker
    from .pipeline import export_onnx, open_family
    from .recipe import ONNXExport
    if args.weights not in (None, "auto", "float"):
        raise UserError(f"--weights {args.weights}: onnx takes auto (our grids as MatMulNBits) or float")
    ex = _validated(ONNXExport, exits=_exits(args.exits), dtype=args.dtype, weights=args.weights,
                    head=args.head, embed=args.embed, accuracy_level=args.accuracy_level,
                    multi=args.multi or args.multi_only, per_exit=not args.multi_only)
    check_output_dir(out, force=args.force, inputs=[source], kind="export")
    fam, tok_dir = open_family(source)
    fam.config.exit_list(ex.exits)
    check_onnx(fam.config, fam.modules, ex)
    check_tokenizer(tok_dir)
    with atomic_dir(out, force=args.force, inputs=[tok_dir], kind="export") as tmp:
        info = export_onnx(fam, tmp, tok_dir, ex)
        fam.verify()
        write_marker(tmp, {"kind": "export", "format": "onnx", **info})
    for x in info["exits"]:
        print(f"wrote {out / ('exit-%d' % x['exit'])} ({disk_bytes(out / ('exit-%d' % x['exit'])) / 1e6:.2f} MB)")
    if info["multi"]:
        m = info["multi"]
        print(f"wrote {out / MULTI_FOLDER} ({m['bytes'] / 1e6:.2f} MB for exits {m['exits']}: "
              f"{m['tensor_bytes'] / 1e6:.2f} MB of distinct tensors in one data file)")


def add_export_args(s, default) -> None:
    s.add_argument("--head", help=f"onnx: auto (a quantized head keeps its grid, a float one stays "
                   f"float), float, int8 (default {default('head')})")
    s.add_argument("--embed", help="onnx: token embedding float, int8, or head (the rows of a tied, "
                   f"quantized head's grid: no bytes of its own) (default {default('embed')})")
    s.add_argument("--accuracy-level", type=int, help="onnx: MatMulNBits compute, 0 (the float type) "
                   f"or 4 (int8 activations, faster on CPUs) (default {default('accuracy_level')})")


def generate_onnx(args, search: dict) -> None:
    """`generate --onnx DIR`: one prompt through onnxruntime-genai (cli_runtime parses the rest)."""
    require("onnxruntime_genai", "generate --onnx", ONNX_PIP)
    from .exporters.onnx.runner import generate
    exit = None if args.exit in (None, "last") else _exits(args.exit, "--exit")
    if isinstance(exit, list) and len(exit) != 1:
        raise UserError(f"--exit {args.exit}: give one exit layer")
    res = generate(Path(args.onnx), args.prompt[0], exit[0] if exit else None, args.max_new_tokens,
                   chat=not args.no_chat, on_text=lambda piece: print(piece, end="", flush=True),
                   **search)
    print()
    print(f"[exit {res['exit']}: {res['prompt_tokens']} prompt tokens, {len(res['tokens'])} new]",
          file=sys.stderr)

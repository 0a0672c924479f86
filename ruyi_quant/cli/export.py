"""`ruyi-quant export`: each exit of a family as a standalone checkpoint, in any format of the
registry (exporters/__init__.py), and exits copied out of a multi-exit GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..model.layout import exit_folder
from ..recipe import Calibration, GGUFExport, HFExport, ONNXExport, Provenance
from .options import default, exits, validated

# settings fields that do not come from the option of their own name (the format is the registry's)
DERIVED = ("format", "exits", "multi", "per_exit", "imatrix")


def add_parser(sub) -> None:
    C = lambda f: default(Calibration, f)
    s = sub.add_parser(
        "export",
        help="per-exit checkpoints (hf: transformers; gguf: llama.cpp; onnx: onnxruntime)",
        description="Export each exit of a family as a standalone checkpoint: "
        "hf (Qwen2ForCausalLM, or LlamaForCausalLM for a non-Qwen2 tokenizer; GPTQ/AWQ/float) or gguf (stock qwen2 GGUF + Ollama "
        "Modelfile per exit, and/or one multi-exit GGUF). `export gguf --from "
        "FAMILY.gguf [--exit E]` copies exits (all by default) out of a multi-exit GGUF. onnx: a "
        "decoder graph with KV cache per exit (our grids in MatMulNBits) that "
        "onnxruntime-genai loads, and/or one multi-exit folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "family",
        metavar="FAMILY",
        nargs="?",
        help="quantized family directory, any MODEL, or a multi-exit .gguf",
    )
    s.add_argument("--from", dest="source", metavar="FAMILY", help="the same as FAMILY")
    s.add_argument("--format", default=None, help="hf (default), gguf or onnx")
    s.add_argument("--out", required=True)
    s.add_argument("--exits", "--exit", help="comma-separated exit layers, or all (default)")
    s.add_argument(
        "--weights",
        help=f"hf: auto (the family's layout), float, gptq, awq (default "
        f"{default(HFExport, 'weights')}); onnx: auto, float",
    )
    s.add_argument(
        "--dtype",
        help=f"hf float weights: bfloat16, float16, float32 (default "
        f"{default(HFExport, 'dtype')}); onnx: float32 (default), float16",
    )
    s.add_argument(
        "--type",
        help="gguf: auto (default; our grids exactly: Q4_0 sym, Q4_1 "
        "asym, Q8_0 8-bit; float linears f16), f32, f16, bf16, q8_0, q4_0, q4_1; from a "
        "float model also llama.cpp's q4_k_m, q5_k_m, q6_k",
    )
    s.add_argument(
        "--embed-type",
        help=f"gguf: token embedding type (default {default(GGUFExport, 'embed_type')}: q8_0 in 4-bit files)",
    )
    s.add_argument(
        "--head-type",
        help=f"gguf: float head type (default {default(GGUFExport, 'head_type')}: q8_0 in 4-bit files)",
    )
    s.add_argument("--multi", action="store_true", help="gguf, onnx: also write the multi-exit file")
    s.add_argument("--multi-only", action="store_true", help="gguf, onnx: only the multi-exit file")
    onnx = lambda f: default(ONNXExport, f)
    s.add_argument(
        "--head",
        help=f"onnx: auto (a quantized head keeps its grid, a float one stays "
        f"float), float, int8 (default {onnx('head')})",
    )
    s.add_argument(
        "--embed",
        help="onnx: token embedding float, int8, or head (the rows of a tied, "
        f"quantized head's grid: no bytes of its own) (default {onnx('embed')})",
    )
    s.add_argument(
        "--accuracy-level",
        type=int,
        help="onnx: MatMulNBits compute, 0 (the float type) "
        f"or 4 (int8 activations, faster on CPUs) (default {onnx('accuracy_level')})",
    )
    s.add_argument("--name", help="gguf: general.name (default: the model's name)")
    s.add_argument("--license", help="gguf: general.license (default: the source's, when known)")
    s.add_argument(
        "--calib",
        help=f"gguf K-quants: text of the importance matrix (default "
        f"{C('source')}, {C('samples')} x {C('seq_len')} tokens)",
    )
    s.add_argument(
        "--no-imatrix",
        action="store_true",
        help="gguf K-quants: llama.cpp's plain rounding, no importance matrix",
    )
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=run)


def settings(cls, args):
    """The format's settings from the options (each format takes the options it has fields for)."""
    kw = {f: getattr(args, f, None) for f in cls.model_fields if f not in DERIVED}
    kw.update(
        exits=exits(args.exits),
        multi=args.multi or args.multi_only,
        per_exit=not args.multi_only,
        imatrix=not args.no_imatrix,
    )
    return validated(cls, **{k: v for k, v in kw.items() if k in cls.model_fields})


def run(args) -> None:
    from .. import exporters
    from ..pipeline import open_family
    from ..store.files import atomic_dir, check_output_dir, write_marker
    from ..text import check_tokenizer

    source, name = args.source or args.family, args.format
    if args.family in exporters.FORMATS and args.source and not Path(args.family).exists():
        name = name or args.family  # `export gguf --from X`
    if args.family and args.source and args.family != name:
        raise UserError(f"give the family once: FAMILY ({args.family}) or --from ({args.source})")
    if source is None:
        raise UserError("export: name the family to export (FAMILY or --from)")
    name = name or ("gguf" if source.endswith(".gguf") else "hf")
    fmt = exporters.get(name)
    ex = settings(fmt.settings, args)
    out = Path(args.out)
    if name == "gguf" and source.endswith(".gguf"):
        return _extract_gguf(source, ex, out, args.force)
    fmt.impl(f"--format {name}")  # an optional package missing: before any work
    check_output_dir(out, force=args.force, inputs=[source], kind="export")
    fam, tok_dir = open_family(source)
    fam.provenance = fam.provenance or Provenance(model=source)  # a source model: its own name
    fam.config.exit_list(ex.exits)
    check_tokenizer(tok_dir)
    with atomic_dir(out, force=args.force, inputs=[tok_dir], kind="export") as tmp:
        info = fmt.export(fam, tmp, tok_dir, ex, calibration=validated(Calibration, source=args.calib))
        fam.verify()
        write_marker(tmp, {"kind": "export", "format": name, **info})
    for line in fmt.written(info, out):
        print(line)


def _extract_gguf(source: str, ex, out: Path, force: bool) -> None:
    """Stock per-exit files copied out of a multi-exit GGUF (no re-quantization)."""
    from ..exporters.gguf import extract
    from ..store.files import atomic_dir, check_output_dir, write_marker

    if not Path(source).is_file():
        raise UserError(f"{source}: no such file")
    check_output_dir(out, force=force, inputs=[source], kind="export")
    with atomic_dir(out, force=force, inputs=[source], kind="export") as tmp:
        infos = extract(Path(source), None if ex.exits == "all" else ex.exits, tmp)
        write_marker(tmp, {"kind": "export", "format": "gguf", "from": source, "exits": infos})
    for x in infos:
        print(f"wrote {out / exit_folder(x['exit']) / x['file']} ({x['bytes'] / 1e6:.2f} MB)")

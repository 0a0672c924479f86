"""ONNX on ruyi-mini, per exit: file sizes, perplexity / KL / top-1 against the float model, and
onnxruntime CPU prefill and decode tokens/s (through onnxruntime-genai, the runtime users run) for
the float32 graph and our int4 graph at MatMulNBits accuracy levels 0 and 4. Beside them, on the
last exit as a plain model: onnxruntime-genai's own model builder given the float model (its int4
is round-to-nearest, block 32, head int4).

    python benchmarks/onnx.py                  # about 15 min on two cores
    python benchmarks/onnx.py --exits 29       # one exit

Our int4: GPTQ 4-bit g128 symmetric with act-order and static groups (the demo recipe's), the
head too at group 32 asymmetric, calibrated on 32 x 256 tokens of builtin:pydoc/calib; the
embedding gathered from the tied head's grid (embed head), as the builder shares its int4 head
with the embedding. Writes benchmarks/results/onnx.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# this file is onnx.py: drop its own folder from the path, or `import onnx` would import it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import torch

from ruyi_quant.evaluate import summarise, token_stats
from ruyi_quant.exporters import export
from ruyi_quant.exporters import onnx as X
from ruyi_quant.pipeline import quantize
from ruyi_quant.recipe import (
    Calibration,
    Eval,
    GPTQOptions,
    HFExport,
    ONNXExport,
    Override,
    Provenance,
    Quantize,
)
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_family, load_model
from ruyi_quant.store.files import disk_bytes
from ruyi_quant.text import calib_windows, eval_windows

ROOT = Path(__file__).resolve().parents[1]


def feeds_for(sess: ort.InferenceSession, ids: np.ndarray, head_dim: int) -> dict:
    """A prefill from an empty cache for whatever inputs a decoder graph declares."""
    b, n = ids.shape
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, n), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(n), (b, 1))
        elif i.name.startswith("past_key_values"):
            dt = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((b, i.shape[1], 0, head_dim), dt)
        else:
            raise SystemExit(f"unknown graph input {i.name}")
    return feeds


def accuracy(graph: Path, ref: dict, windows: torch.Tensor, e: int, head_dim: int) -> dict:
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    sums: dict = {}
    for w, ids in enumerate(windows):
        got = sess.run(["logits"], feeds_for(sess, ids[None].numpy(), head_dim))[0]
        for k, v in token_stats(ref[w][e], torch.from_numpy(got.astype(np.float32)), ids[None]).items():
            sums[k] = sums.get(k, 0) + v
    return summarise({e: sums})[e]


def speed(
    folder: Path, prompt: list[int], new: int, graph: str | None = None, exit: int | None = None
) -> dict:
    """Prefill tokens/s (the prompt, first logits) and decode tokens/s (`new` greedy tokens), in
    onnxruntime-genai; median of 3."""
    config = og.Config(str(folder))
    if graph:
        config.overlay(json.dumps({"model": {"decoder": {"filename": graph, "num_hidden_layers": exit + 1}}}))
    model = og.Model(config)
    pre, dec = [], []
    for _ in range(3):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        pre.append(len(prompt) / (t1 - t0))
        dec.append((n - 1) / (t2 - t1))  # the first token's logits came with the prefill
    return {"prefill_tok_s": float(np.median(pre)), "decode_tok_s": float(np.median(dec))}


def with_accuracy_level(folder: Path, out: Path, level: int) -> Path:
    """A copy of an exit folder whose MatMulNBits nodes run at another accuracy level (the data
    file hard-linked: same bytes)."""
    out.mkdir()
    for f in folder.iterdir():
        (os.link if f.name.endswith(".data") else shutil.copy2)(f, out / f.name)
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    (out / "model.onnx").write_bytes(m.SerializeToString())
    return out


def builder(hf_dir: Path, out: Path, cache: Path) -> tuple[int, str]:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(cache),
        ],
        capture_output=True,
        text=True,
    )
    return r.returncode, (r.stderr or r.stdout).strip().splitlines()[-1] if r.returncode else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/ruyi-onnx-bench")
    ap.add_argument("--exits", help="comma-separated exits (default all)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256, help="prefill length")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens")
    ap.add_argument(
        "--family",
        help="a quantized ruyi-mini family to use instead of quantizing (e.g. "
        "out/ruyi-mini-gptq4/family); its head stays as it is",
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    notes = {
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_genai": og.__version__,
        "rows": [],
    }
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = resolve_model("builtin:ruyi-mini")
    ref_fam = load_family(src)
    exits = ref_fam.config.exit_list(None if not args.exits else [int(x) for x in args.exits.split(",")])
    if args.family:
        fam = load_family(Path(args.family))
        notes["ours"] = f"{args.family} ({fam.method})"
    else:
        q = Quantize(
            method="gptq",
            bits=4,
            group_size=128,
            sym=True,
            heads=True,
            gptq=GPTQOptions(act_order=True, static_groups=True),
            overrides=[Override(pattern="lm_head", group_size=32, sym=False)],
        )
        cal = Calibration(source="builtin:pydoc/calib")
        t0 = time.perf_counter()
        fam = quantize(ref_fam, q, calib_windows(src, cal), progress=True)
        notes["quantize_seconds"] = time.perf_counter() - t0
        fam.provenance = Provenance(model="builtin:ruyi-mini", quantize=q, calibration=cal)
        notes["ours"] = (
            "GPTQ 4-bit g128 sym with act-order and static groups (the demo's), the head "
            f"too at g32 asym, {cal.samples} x {cal.seq_len} tokens of {cal.source}"
        )
    embed = "head" if "lm_head" in fam.grids else "int8"
    notes["embed"] = embed
    ev = Eval(samples=args.eval_windows)
    windows = eval_windows(src, ev)
    model = load_model(src)
    with torch.no_grad():
        ref = [model.forward_exits(w[None], exits=exits) for w in windows]
    del model
    prompt = windows[0, : args.prompt].tolist()
    hd = ref_fam.config.head_dim
    exports = {
        "float32": ONNXExport(exits=exits, weights="float"),
        "int4": ONNXExport(exits=exits, embed=embed, accuracy_level=4, multi=True),
    }
    for name, ex in exports.items():
        t0 = time.perf_counter()
        X.export(fam if name == "int4" else ref_fam, work / name, src, ex, progress=False)
        notes[f"export_{name}_seconds"] = time.perf_counter() - t0
    multi = work / "int4" / X.MULTI_FOLDER
    distinct = sum(
        int({x.key: x.value for x in t.external_data}["length"])
        for t in {
            t.name: t
            for e in exits
            for t in onnx.load(str(multi / f"exit-{e}.onnx"), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        }.values()
        if not t.name.endswith(".rows")
    )
    tokenizer = sum(
        f.stat().st_size for f in multi.iterdir() if f.name.startswith(("tokenizer", "chat_template"))
    )
    notes["multi"] = {
        "bytes": disk_bytes(multi),
        "distinct_tensor_bytes": distinct,
        "tokenizer_bytes": tokenizer,
        "per_exit_folders_bytes": sum(disk_bytes(work / "int4" / f"exit-{e}") for e in exits),
    }
    notes["multi"]["overhead_pct"] = 100 * (notes["multi"]["bytes"] / (distinct + tokenizer) - 1)
    for e in exits:
        variants = {"float32": work / "float32" / f"exit-{e}", "int4 acc4": work / "int4" / f"exit-{e}"}
        variants["int4 acc0"] = with_accuracy_level(
            variants["int4 acc4"], work / "int4" / f"exit-{e}-acc0", 0
        )
        for label, d in variants.items():
            row = {
                "exit": e,
                "graph": label,
                "mb": disk_bytes(d) / 1e6
                - sum(f.stat().st_size for f in d.iterdir() if not f.name.startswith("model.onnx")) / 1e6,
                **accuracy(d / "model.onnx", ref, windows, e, hd),
                **speed(d, prompt, args.new),
            }
            notes["rows"].append(row)
            print(
                f"exit {e} {label}: {row['mb']:.1f} MB, KL {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
                f"prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_tok_s']:.1f} tok/s",
                flush=True,
            )
    last = exits[-1]
    if last == ref_fam.config.exits[-1]:
        hf = work / "hf-float"
        export(ref_fam, hf, src, HFExport(exits=[last], weights="float", dtype="float32"), progress=False)
        rc, err = builder(hf / f"exit-{last}", work / "builder", work / "builder-cache")
        if rc == 0:
            d = work / "builder"
            row = {
                "exit": last,
                "graph": "genai builder int4 (RTN b32, head int4)",
                "mb": sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx")) / 1e6,
                **accuracy(d / "model.onnx", ref, windows, last, hd),
                **speed(d, prompt, args.new),
            }
            notes["rows"].append(row)
        notes["builder"] = {"returncode": rc, "error": err}
        gptq_hf = work / "hf-gptq"  # the builder on our own GPTQ export (K = 576 at group 128)
        export(fam, gptq_hf, src, HFExport(exits=[last], weights="gptq", dtype="float32"), progress=False)
        rc, err = builder(gptq_hf / f"exit-{last}", work / "builder-gptq", work / "builder-cache")
        notes["builder_on_our_gptq_g128"] = {"returncode": rc, "error": err}
    notes["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    notes["seconds"] = time.perf_counter() - t_start
    write(notes)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write(notes: dict) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps(notes, indent=2) + "\n")
    m = notes["multi"]
    lines = [
        "# ONNX on ruyi-mini (onnxruntime "
        + notes["onnxruntime"]
        + ", onnxruntime-genai "
        + notes["onnxruntime_genai"]
        + f", CPU, {notes['cpus']} cores)",
        "",
        f"Ours: {notes['ours']}. Reference: the float model (bf16 weights, float32 compute). "
        f"Speed through onnxruntime-genai, batch 1: prefill of the prompt, then greedy decode; "
        f"median of 3. Load average at start: "
        + ", ".join(f"{x:.2f}" for x in notes["load_average_at_start"])
        + ".",
        "",
        "| exit | graph | MB | ppl | Δppl % | KL | top-1 | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in notes["rows"]:
        lines.append(
            f"| {r['exit']} | {r['graph']} | {r['mb']:.1f} | {r['ppl_quant']:.2f} | "
            f"{r['delta_ppl_pct']:+.2f} | {max(r['kl'], 0.0):.4f} | {100 * r['top1']:.1f}% | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |"
        )
    lines += [
        "",
        f"Multi-exit folder (int4, every exit): {m['bytes'] / 1e6:.2f} MB; its distinct tensors "
        f"{m['distinct_tensor_bytes'] / 1e6:.2f} MB + tokenizer {m['tokenizer_bytes'] / 1e6:.2f} MB "
        f"(overhead {m['overhead_pct']:.2f}%); the per-exit folders together "
        f"{m['per_exit_folders_bytes'] / 1e6:.2f} MB.",
    ]
    if "builder_on_our_gptq_g128" in notes:
        b = notes["builder_on_our_gptq_g128"]
        lines.append(
            "onnxruntime-genai's builder on our GPTQ g128 export of the last exit: "
            + ("built" if b["returncode"] == 0 else f"failed ({b['error']})")
            + "."
        )
    lines.append(f"Whole run {notes['seconds']:.0f} s, peak RSS {notes['peak_rss_gb']:.2f} GB.")
    (out / "onnx.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

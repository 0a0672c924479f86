"""Calibrated K-quants against llama.cpp's own, in the files llama.cpp and Ollama users pick.

    python benchmarks/kquants.py                                   # ruyi-mini, every exit
    python benchmarks/kquants.py --model builtin:tiny --eval-samples 2 --ftypes q4_k_m   # quick

For each exit and each of q4_k_m, q5_k_m and q6_k, three files with the same tensor types (llama.cpp's
map for that exit's depth) and the same bytes per tensor:
  (a) llama.cpp's quantizer from our F16 file, no importance matrix;
  (b) the same with our importance matrix (exporters/gguf/imatrix.py: what `llama-quantize
      --imatrix` does, the matrix from our calibration windows run through the float family);
  (c) ours: `quantize --method gptq --gguf FTYPE` (ggml's weighted search for every block's
      parameters, with the importance matrix of the quantized trunk's activations at each layer,
      then GPTQ's codes on them, branch-aware), written as it is.
Each file is run by llama.cpp (llama-cpp-python) and compared with our bf16 model on held-out
texts (--eval; default builtin:pydoc/eval and builtin:stdlib/eval, English docs and Python source,
the two corpora the default calibration mixes, in other splits; any .txt file adds a domain the
calibration never saw). --calib picks the calibration text (default: the tool's, that mix), for
(b) and every calibrated file alike.

--variant adds calibrated files beside (c), each with its own KL ratio to (b), e.g.
    --variant 'name=awq;method=awq' --variant 'name=awq+gptq;method=gptq;awq_scales=1'
    --variant 'name=gptq natural;act_order=0' --variant 'name=gptq pydoc;calib=builtin:pydoc/calib'
(keys: name, method gptq|awq, act_order 0|1, damp, awq_scales 0|1, calib; unset ones are (c)'s).
Writes benchmarks/results/kquants.{json,md} (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import torch
from gguf_vs_llama import bpw, llama_logits, score

from ruyi_quant.exporters import gguf as G
from ruyi_quant.exporters.gguf import imatrix as IM
from ruyi_quant.pipeline import quantize
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.recipe import Calibration, Eval, GPTQOptions, Provenance, Quantize
from ruyi_quant.report import markdown_table
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_model
from ruyi_quant.text import calib_windows, eval_windows

FILES = {"a": "llama.cpp", "b": "llama.cpp + our imatrix", "c": "ruyi-quant gptq"}
VARIANT_KEYS = {"name", "method", "act_order", "damp", "awq_scales", "calib"}


def short(domain: str) -> str:
    """builtin:pydoc/eval -> pydoc; a file -> its stem."""
    return domain.split(":")[1].split("/")[0] if domain.startswith("builtin:") else Path(domain).stem


def types_of(path: Path) -> dict[str, tuple[int, int]]:
    return {t.name: (int(t.tensor_type), int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors}


def variant(text: str, base: dict) -> dict:
    """'name=awq;method=awq;damp=0.1' -> base with those settings."""
    v = dict(base)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise SystemExit(f"--variant {text!r}: {part!r} is not one of {sorted(VARIANT_KEYS)}=VALUE")
        v[key] = value
    return {
        "name": v["name"],
        "method": v["method"],
        "act_order": str(v["act_order"]) in ("1", "True", "true"),
        "damp": float(v["damp"]),
        "awq_scales": str(v["awq_scales"]) in ("1", "True", "true"),
        "calib": v["calib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--ftypes", default="q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--exits", default="all")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--calib", default=Calibration().source, help="calibration text (a mix: A + B)")
    ap.add_argument(
        "--eval",
        nargs="+",
        default=["builtin:pydoc/eval", "builtin:stdlib/eval"],
        help="held-out texts, one table column group each",
    )
    ap.add_argument("--variant", action="append", default=[], help="another calibrated file (see above)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kquants"))
    a = ap.parse_args()
    base = dict(
        name=FILES["c"], method="gptq", act_order=a.act_order, damp=a.damp, awq_scales=0, calib=a.calib
    )
    variants = {"c": variant("", base)}
    for n, text in enumerate(a.variant, 1):
        variants[f"v{n}"] = variant(text, base)
    files = {"a": FILES["a"], "b": FILES["b"], **{k: v["name"] for k, v in variants.items()}}
    domains = a.eval
    headers = ["exit", "type", "file", "MB", "bpw"]
    headers += [f"{x} {short(d)}" for d in domains for x in ("KL", "top-1 %", "ppl")]
    headers += [f"KL /b {short(d)}" for d in domains]

    src = resolve_model(a.model)
    cal = Calibration(source=a.calib, samples=a.samples, seq_len=a.seq_len)
    calib = calib_windows(src, cal)
    evs = {d: eval_windows(src, Eval(source=d, samples=a.eval_samples, seq_len=a.seq_len)) for d in domains}
    model = load_model(src)
    cfg = model.config
    exits = cfg.exits if a.exits == "all" else [int(x) for x in a.exits.split(",")]
    float_fam = QuantizedFamily.from_model(model)
    float_fam.provenance = Provenance(model=a.model)
    with torch.no_grad():
        ref = {
            (e, d): [model(w[None], exit=e).logits[0].float() for w in ev]
            for e in exits
            for d, ev in evs.items()
        }
    t0 = time.perf_counter()
    imat = IM.collect(model, calib)
    imatrix_seconds = time.perf_counter() - t0
    ftypes = a.ftypes.split(",")
    ours, seconds = {}, {}
    for k, v in variants.items():
        vcal = cal.model_copy(update={"source": v["calib"]})
        vcalib = calib if v["calib"] == a.calib else calib_windows(src, vcal)
        for ftype in ftypes:
            g = GPTQOptions(act_order=v["act_order"], damp_percent=v["damp"], awq_scales=v["awq_scales"])
            q = Quantize(method=v["method"], gguf=ftype, gptq=g)
            t0 = time.perf_counter()
            fam = quantize(load_model(src), q, vcalib)
            seconds[f"{k} {ftype}"] = time.perf_counter() - t0
            fam.provenance = Provenance(model=a.model, quantize=q, calibration=vcal)
            ours[(k, ftype)] = fam
            print(f"{v['name']} {ftype}: calibrated in {seconds[f'{k} {ftype}']:.0f} s", flush=True)
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for e in exits:
            f16 = tmp / f"e{e}-f16.gguf"
            G.write_exit(float_fam, e, f16, src, G.GGUFOptions(type="f16"))
            for ftype in ftypes:
                paths = {k: tmp / f"e{e}-{ftype}-{k}.gguf" for k in files}
                t0 = time.perf_counter()
                G.llama_quantize(f16, paths["a"], ftype)
                llama_s = time.perf_counter() - t0
                shutil.copy(paths["a"], paths["b"])
                IM.requantize(f16, paths["b"], IM.for_exit(imat, cfg, cfg.exit_index(e)))
                for k in variants:
                    G.write_exit(ours[(k, ftype)], e, paths[k], src)
                same = all(types_of(paths["a"]) == types_of(p) for p in paths.values())
                kl = {}
                for k, p in paths.items():
                    bits, size = bpw(p)
                    s = {d: score(ref[(e, d)], llama_logits(p, ev), ev) for d, ev in evs.items()}
                    kl[k] = {d: s[d]["kl"] for d in domains}
                    results.append(
                        {
                            "exit": e,
                            "ftype": ftype,
                            "file": k,
                            "made_by": files[k],
                            "settings": variants.get(k),
                            "bpw": bits,
                            "bytes": size,
                            "same_types_and_bytes": same,
                            "scores": s,
                            "quantize_seconds": llama_s if k == "a" else None,
                        }
                    )
                    row = [str(e), ftype, files[k], f"{size / 1e6:.1f}", f"{bits:.2f}"]
                    for d in domains:
                        row += [f"{s[d]['kl']:.4f}", f"{100 * s[d]['top1']:.2f}", f"{s[d]['ppl']:.2f}"]
                    if k in variants:
                        row += [f"{kl[k][d] / kl['b'][d]:.2f}" for d in domains]
                    else:
                        row += [""] * len(domains)
                    rows.append(row)
                    print(" | ".join(row), flush=True)
                assert same, f"exit {e} {ftype}: the files differ in tensor types or sizes"
    table = markdown_table(headers, rows)
    print(table)
    meta = {
        "model": a.model,
        "exits": exits,
        "calibration": {"source": cal.source, "windows": list(calib.shape)},
        "eval": {d: list(ev.shape) for d, ev in evs.items()},
        "gptq": {"act_order": a.act_order, "damp_percent": a.damp},
        "variants": variants,
        "calibrate_seconds": seconds,
        "imatrix_seconds": imatrix_seconds,
        "ppl_bf16": {
            f"{e} {d}": score(ref[(e, d)], ref[(e, d)], evs[d])["ppl"] for e in exits for d in domains
        },
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Our calibrated int4 GGUF files against llama.cpp's own quantizers, run by llama.cpp itself.

    python benchmarks/gguf_vs_llama.py                  # ruyi-mini, first and last exit
    python benchmarks/gguf_vs_llama.py --model builtin:tiny --exits 2,5 --eval-samples 2   # quick

For each exit: our F16 file; our GPTQ and AWQ grids written exactly as Q4_0 (symmetric) and
Q4_1 (asymmetric) at group size 32 (the block size the file pays for anyway); llama.cpp's own
Q4_0, Q4_1 and Q4_K_M made by llama.cpp's quantizer from our F16 file, and Q4_K_M again with an
importance matrix that we compute from the same calibration windows (exporters/imatrix.py:
llama.cpp's mix, each tensor re-encoded by ggml's quantizer with the matrix, as
`llama-quantize --imatrix` does). Every file is run by llama.cpp
(llama-cpp-python) on held-out text and compared with our bf16 model: bits per weight (all
tensor bytes x 8 / parameters), KL(bf16 ‖ file), top-1 agreement, perplexity. Embeddings and
heads: Q8_0 in our 4-bit files; llama.cpp picks its own per type.
Writes benchmarks/results/gguf.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from ruyi_quant.exporters import gguf as G
from ruyi_quant.exporters.gguf import imatrix as IM
from ruyi_quant.pipeline import quantize
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.recipe import Calibration, Eval, Provenance, Quantize
from ruyi_quant.report import markdown_table
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_model
from ruyi_quant.text import calib_windows, eval_windows

HEADERS = ["exit", "file", "made by", "bpw", "MB", "KL(bf16‖file)", "top-1 %", "ppl", "ppl bf16"]


def llama_logits(path: Path, windows: torch.Tensor) -> list[torch.Tensor]:
    from ruyi_quant.exporters.gguf.llamacpp import open_llama

    n = windows.shape[1]
    llm = open_llama(path, n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=2)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.append(torch.tensor(np.array(llm.scores[:n]), dtype=torch.float32))
    llm.close()
    return out


def score(ref: list[torch.Tensor], got: list[torch.Tensor], windows: torch.Tensor) -> dict:
    kl = top1 = nll = 0.0
    count = 0
    for r, g, w in zip(ref, got, windows):
        lp, lq = r.log_softmax(-1), g.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
        top1 += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        nll += float(-lq[:-1].gather(-1, w[1:, None]).sum())
        count += len(w)
    return {"kl": kl / count, "top1": top1 / count, "ppl": float(np.exp(nll / (count - len(windows))))}


def bpw(path: Path) -> tuple[float, int]:
    r = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    params = sum(int(t.n_elements) for t in r.tensors)
    return 8 * nbytes / params, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--exits", default="first,last")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf"))
    a = ap.parse_args()

    src = resolve_model(a.model)
    calib = calib_windows(
        src, Calibration(source="builtin:pydoc/calib", samples=a.samples, seq_len=a.seq_len)
    )
    ev = eval_windows(src, Eval(samples=a.eval_samples, seq_len=a.seq_len))
    model = load_model(src)
    cfg = model.config
    exits = [
        cfg.exits[0] if x == "first" else cfg.exits[-1] if x == "last" else int(x) for x in a.exits.split(",")
    ]
    ref_fam = QuantizedFamily.from_model(model)
    ref_fam.provenance = Provenance(model=a.model)
    with torch.no_grad():
        ref = {e: [model(w[None], exit=e).logits[0].float() for w in ev] for e in exits}
    ours = {}
    for label, method, sym in [
        ("gptq-q4_0", "gptq", True),
        ("gptq-q4_1", "gptq", False),
        ("awq-q4_1", "awq", False),
    ]:
        t0 = time.perf_counter()
        fam = quantize(load_model(src), Quantize(method=method, bits=4, group_size=32, sym=sym), calib)
        fam.provenance = Provenance(
            model=a.model,
            quantize=Quantize(method=method),
            calibration=Calibration(source="builtin:pydoc/calib", samples=a.samples, seq_len=a.seq_len),
        )
        ours[label] = (fam, time.perf_counter() - t0)
        print(f"{label}: quantized in {ours[label][1]:.0f} s", flush=True)
    imat = IM.collect(model, calib)
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for e in exits:
            files = []
            f16 = tmp / f"e{e}-f16.gguf"
            G.write_exit(ref_fam, e, f16, src, G.GGUFOptions(type="f16"))
            files.append(("F16", "ruyi-quant", f16))
            for label, (fam, _) in ours.items():
                p = tmp / f"e{e}-{label}.gguf"
                G.write_exit(fam, e, p, src)
                files.append((label.split("-")[1].upper(), f"ruyi-quant {label.split('-')[0]}", p))
            for ftype in ("q4_0", "q4_1", "q4_k_m"):
                p = tmp / f"e{e}-llama-{ftype}.gguf"
                G.llama_quantize(f16, p, ftype)
                files.append((ftype.upper(), "llama.cpp", p))
            p = tmp / f"e{e}-llama-q4_k_m-imatrix.gguf"
            G.llama_quantize(f16, p, "q4_k_m")
            IM.requantize(f16, p, IM.for_exit(imat, cfg, cfg.exit_index(e)))
            files.append(("Q4_K_M", "llama.cpp + our imatrix", p))
            for kind, who, p in files:
                bits, size = bpw(p)
                s = score(ref[e], llama_logits(p, ev), ev)
                ppl_ref = score(ref[e], ref[e], ev)["ppl"]
                results.append(
                    {
                        "exit": e,
                        "file": kind,
                        "made_by": who,
                        "bpw": bits,
                        "bytes": size,
                        "ppl_bf16": ppl_ref,
                        **s,
                    }
                )
                rows.append(
                    [
                        str(e),
                        kind,
                        who,
                        f"{bits:.2f}",
                        f"{size / 1e6:.1f}",
                        f"{s['kl']:.4f}",
                        f"{100 * s['top1']:.2f}",
                        f"{s['ppl']:.2f}",
                        f"{ppl_ref:.2f}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(HEADERS, rows)
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": a.model,
        "exits": exits,
        "calibration": {"source": "builtin:pydoc/calib", "windows": list(calib.shape)},
        "eval": {"source": "builtin:pydoc/eval", "windows": list(ev.shape)},
        "quantize_seconds": {k: v[1] for k, v in ours.items()},
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    a.out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

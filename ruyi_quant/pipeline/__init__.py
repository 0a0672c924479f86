"""The steps a job is made of (resolve, quantize, export, evaluate), shared by the CLI's
subcommands and the recipe runner. Every output directory is written whole or not at all.

Job output layout:
    OUTPUT/ruyi_quant.json     manifest: job digest, sha256 of every artifact, summary
    OUTPUT/family/             the quantized family (store/checkpoint.py)
    OUTPUT/hf-gptq/exit-E/     per-exit Qwen2 checkpoints (hf-bfloat16/ for float weights)
    OUTPUT/gguf-q4_0/          per-exit GGUF files and Modelfiles, the multi-exit file
    OUTPUT/eval.json, eval.md  per-exit quality, eval.png when matplotlib is installed
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import exporters
from ..errors import UserError
from ..evaluate import evaluate
from ..log import Stages
from ..preflight import CALIBRATED, check_job
from ..quant.family import QuantizedFamily
from ..quant.plan import QuantSpec, act_order, settings_plan
from ..quant.rtn import rtn_family, rtn_lazy
from ..recipe import JOB_FAMILY, Eval, Job, Provenance, Quantize
from ..sources import resolve_model
from ..store.checkpoint import Spill, load_family, save_family
from ..store.files import atomic_dir, intact, read_manifest, scratch_dir, sweep, write_marker
from ..text import calib_windows, eval_windows


def quantize(
    source, settings: Quantize, calib: torch.Tensor | None = None, progress: bool = True, spill=None
) -> QuantizedFamily:
    """Quantize a float family (a lazy one is read layer by layer) or a FamilialModel (left
    unchanged) by the recipe's quantize section. `spill`: a store.checkpoint.Spill that GPTQ/AWQ move
    each layer's grids to as they go (a family of any size then fits in memory)."""
    from ..model.familial import FamilialModel

    src = source if isinstance(source, QuantizedFamily) else QuantizedFamily.from_model(source)
    if settings.method == "none":
        return src
    with torch.device("meta"):
        skeleton = FamilialModel(src.config)
    plan = checked_plan(skeleton, settings)
    t0 = time.perf_counter()
    if settings.method == "rtn":
        fam = (
            rtn_family(source, plan, progress)
            if isinstance(source, FamilialModel)
            else rtn_lazy(QuantizedFamily(config=src.config, tensors=src.tensors.copy()), plan)
        )
    else:
        from ..quant.calibrate import calibrate

        method, layout = calibration_method(settings, skeleton, plan)
        fam = calibrate(
            src,
            plan,
            calib,
            method,
            batch=settings.batch,
            device=settings.device,
            progress=progress,
            desc=settings.method,
            layout=layout,
            spill=spill,
        )
        if hasattr(method, "ratios"):
            fam.stats["awq_scale_ratios"] = method.ratios  # r per smoothing pair (None: no scaling)
    fam.method, fam.gguf = settings.method, settings.gguf
    fam.stats["quantize_seconds"] = time.perf_counter() - t0
    return fam


def calibration_method(settings: Quantize, skeleton, plan):
    """-> (the calibration method of settings, the layout its grids are stored in)."""
    from ..quant.awq import AWQ
    from ..quant.gptq import GPTQ
    from ..quant.kgptq import BlockGPTQ, BlockRounding
    from ..quant.smooth import Smoothed

    g, a = settings.gptq, settings.awq
    awq = AWQ(a.grid, a.max_shrink, a.max_tokens, a.clip)
    if settings.method == "awq" and not settings.gguf:
        return awq, ("awq" if awq_layout_fits(skeleton, plan) else "gptq")
    if settings.method == "awq":  # AWQ's scales, then llama.cpp's own rounding in its blocks
        return Smoothed(awq, BlockRounding()), "ggml"
    cls, layout = (BlockGPTQ, "ggml") if settings.gguf else (GPTQ, "gptq")
    gptq = cls(g.damp_percent, g.block_size, act_order(settings), g.static_groups)
    return (Smoothed(awq, gptq) if g.awq_scales else gptq), layout


def checked_plan(model, settings: Quantize) -> dict[str, QuantSpec]:
    """The grid of every linear the settings quantize (a meta model will do)."""
    plan = settings_plan(model, settings)
    for name, spec in plan.items():
        k = model.get_submodule(name).in_features
        if spec.group_size > k:
            raise UserError(
                f"group_size {spec.group_size} is larger than {name}'s {k} input "
                f"columns; use group_size {1 << (k.bit_length() - 1)} or -1 for it"
            )
    return plan


def quantize_source(src: Path, settings: Quantize, cal, progress: bool = True, spill=None):
    """Open a source checkpoint lazily and quantize it by `settings`, calibrating on `cal`'s text
    (GPTQ/AWQ). Returns (the float family, the quantized family); the CLI and recipe jobs both
    run this. RTN and `none` read nothing until the family is written (rtn_lazy); GPTQ and AWQ
    read one layer at a time (calibrate.py), their grids moved to `spill` as they go."""
    windows = calib_windows(src, cal) if settings.method in CALIBRATED else None  # text first: fails fast
    ref = load_family(src)
    fam = quantize(ref, settings, windows, progress, spill)  # ref stays as it was opened
    if settings.method in ("rtn", "none"):
        fam.stats["quantize_seconds"] = 0.0  # the rounding happens as the family is written
    return ref, fam


@contextmanager
def spilling(out: Path):
    """A Spill in a scratch directory beside the output `out` (store.files.scratch_dir)."""
    with scratch_dir(out) as folder:
        yield Spill(folder)


def awq_layout_fits(model, plan: dict) -> bool:
    """AWQ's gemm layout holds a family when every quantized linear shares one 4-bit grid whose
    group size divides its input width (SmolLM2's 576 columns at g128 do not: such AWQ results
    are stored in GPTQ's layout, which has no such limit)."""
    from ..quant.pack import awq_fits

    specs = set(plan.values())
    if len(specs) != 1:
        return False
    spec = next(iter(specs))
    return all(
        awq_fits(
            model.get_submodule(m).in_features,
            model.get_submodule(m).out_features,
            spec.bits,
            spec.group_size,
        )
        for m in plan
    )


def eval_report(
    ref: QuantizedFamily,
    fam: QuantizedFamily,
    model_dir: Path,
    ev: Eval,
    out_dir: Path | None,
    progress: bool = True,
    cache=None,
) -> dict:
    """Evaluate `fam` against `ref` as `ev` says and write eval.json/.md/.png in out_dir; `cache`
    (an evaluate.ReferenceCache) keeps the reference's side for the next job that shares it."""
    windows = eval_windows(model_dir, ev)
    report = evaluate(ref, fam, windows, ref.config.exit_list(ev.exits), ev.batch, progress, cache)
    report["source"] = ev.source
    if out_dir is not None:
        from ..report import eval_markdown, eval_plot

        (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "eval.md").write_text(eval_markdown(report))
        if ev.plot:
            eval_plot(report, out_dir / "eval.png")
    return report


def manifest_ok(out: Path, digest: str) -> bool:
    """True when out holds a finished job with this digest and every file is as its manifest says."""
    meta = read_manifest(out)
    if meta is None or meta.get("kind") != "job" or meta.get("digest") != digest:
        return False
    return bool(meta["files"]) and intact(out)


def write_manifest(out: Path, job: Job, summary: dict) -> None:
    write_marker(
        out,
        {
            "kind": "job",
            "name": job.name,
            "digest": job.digest(),
            "job": job.model_dump(),
            "summary": summary,
        },
    )


def skip_intact(job: Job, out: Path, force: bool, say) -> dict | None:
    """A job's summary when its outputs are complete and unchanged (and not `force`), else None."""
    if force or not manifest_ok(out, job.digest()):
        return None
    sweep(out.parent)  # a dead run's leftovers (atomic_dir sweeps when it runs)
    say(f"[{job.name}] outputs complete and unchanged in {out}: skipped")
    return {"status": "skipped", "output": str(out)}


def run_job(
    job: Job,
    base: Path,
    force: bool = False,
    progress: bool = True,
    say=print,
    index: int = 0,
    cache=None,
) -> dict:
    """Run one job; returns its summary ({'status': 'done'|'skipped', ...}). `cache`: an
    evaluate.ReferenceCache that the jobs of one run share."""
    out, src, calib, ev = check_job(job, base, index)
    if (skipped := skip_intact(job, out, force, say)) is not None:
        return skipped
    t0 = time.perf_counter()
    stages = Stages()

    def done(_):
        say(f"[{job.name}] {stages.line(stages.rows[-1])}")

    with atomic_dir(out, inputs=[src], flag=f"jobs[{index}].output", kind="job") as tmp:
        say(
            f"[{job.name}] loading {src} and quantizing: {job.quantize.method} "
            f"{job.quantize.bits}-bit g{job.quantize.group_size}"
        )
        with stages.stage("quantize and write the family"), spilling(out) as spill:
            ref, fam = quantize_source(src, job.quantize, calib, progress, spill)
            fam.provenance = Provenance.model_validate(job.model_dump())
            (tmp / JOB_FAMILY).mkdir()
            save_family(fam, tmp / JOB_FAMILY, src, progress=progress)
        done("quantize")
        fam = load_family(tmp / JOB_FAMILY, hashes=False)  # exports read it as just written, lazily
        formats = [exporters.get(ex.format) for ex in job.export]
        folders = [fmt.folder(fam, ex) for fmt, ex in zip(formats, job.export)]
        dup = next((f for f in folders if folders.count(f) > 1), None)
        if dup:
            raise UserError(f"job {job.name}: two exports write to '{dup}'; give one a 'folder'")
        for fmt, ex, folder in zip(formats, job.export, folders):
            say(f"[{job.name}] exporting {ex.format} -> {folder}/")
            with stages.stage(f"export {folder}"):
                fmt.export(fam, tmp / folder, src, ex, progress, calib)
            done(folder)
        summary: dict = {
            "status": "done",
            "output": str(out),
            "method": fam.method,
            "family_bytes": fam.size()[1],
        }
        if ev is not None:
            say(f"[{job.name}] evaluating on {ev.source}")
            with stages.stage("evaluate"):
                summary["eval"] = eval_report(ref, fam, src, ev, tmp, progress, cache)
            done("eval")
        ref.verify()  # the model read was the one its manifest lists
        summary["seconds"] = time.perf_counter() - t0
        summary["stages"] = stages.rows
        write_manifest(tmp, job, summary)
    return summary


def open_family(path: str, base: Path | None = None, hashes: bool = True) -> tuple[QuantizedFamily, Path]:
    """A family (quantized or not) from a directory or builtin name, and its tokenizer dir
    (hashes: store.checkpoint.load_family)."""
    p = resolve_model(path, base)
    return load_family(p, hashes), p

"""Checks that run before the work: everything about a command or a recipe job that can be known
from the settings and the model's config alone (device, texts, sequence lengths, outputs, exits,
whether each export can hold the planned grids), so that a mistake costs seconds, not the hour of
calibration before it. Each problem is one UserError naming the flag (CLI) or recipe key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .quant.plan import act_order as gptq_act_order
from .recipe import Eval, Job, Quantize, cli_flag
from .sources import resolve_model
from .store.files import check_output_dir
from .text import MIX, check_source, source_parts

if TYPE_CHECKING:
    from .quant.family import QuantizedFamily

CALIBRATED = ("gptq", "awq")


def preflight(
    src: Path,
    q: Quantize | None = None,
    cal=None,
    ev: Eval | None = None,
    label=cli_flag,
    device: bool = True,
) -> None:
    """Everything about a run that can be checked before the work, from the model's config alone:
    the device (unless `device` is False: a Ray cluster's, which pipeline/cluster.py checks), text
    sources (readable UTF-8 text), sequence lengths against the model, the tokenizer.
    `label(section, key)` names the flag or recipe key in errors."""
    from .model.config import read_config
    from .quant.calibrate import pick_device
    from .text import check_tokenizer

    cfg = read_config(src)
    texts = []
    if q is not None and device:
        pick_device(q.device, label("quantize", "device"))
        if q.method in CALIBRATED and cal is not None:
            texts.append(("calibration", cal))
    if ev is not None:
        texts.append(("eval", ev))
    if texts:
        check_tokenizer(src)
    for section, s in texts:
        check_seq_len(cfg, s.seq_len, label(section, "seq_len"))
        check_source(s.source, s.field)


def check_seq_len(cfg, seq_len: int, flag: str) -> None:
    limit = cfg.raw.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise UserError(f"{flag} {seq_len}: longer than the model's max_position_embeddings ({limit})")


def check_reference(ref: QuantizedFamily, fam: QuantizedFamily, ref_name: str, fam_name: str) -> None:
    """`fam` must be a quantization of `ref`: the same shapes, exits and vocabulary, and the same
    token embeddings (which no method changes)."""
    from . import names

    a, b = ref.config, fam.config
    for what in ("exits", "num_layers", "hidden_size", "vocab_size", "shared_heads", "tie_word_embeddings"):
        if getattr(a, what) != getattr(b, what):
            raise UserError(
                f"{fam_name} is not a quantization of {ref_name}: its {what} is "
                f"{getattr(b, what)}, the reference's {getattr(a, what)}"
            )
    key = f"{names.EMBED}.weight"
    ea, eb = ref.tensors[key].float(), fam.tensors[key].float()
    rel = ((ea - eb).norm() / ea.norm().clamp_min(1e-30)).item()
    if rel > 1e-2:  # bf16 storage of an fp32 source differs by ~4e-3
        raise UserError(
            f"{fam_name} is not a quantization of {ref_name}: their token embeddings "
            f"differ (relative difference {rel:.3g}); give the model it was made from"
        )


def _under(base: Path, source: str) -> str:
    """A recipe's relative text path is relative to the recipe file (each part of a mixed one)."""
    parts = source_parts(source)
    if len(parts) > 1:
        return MIX.join(_under(base, p) for p in parts)
    if source.startswith("builtin:") or Path(source).is_absolute():
        return source
    return os.path.normpath(Path(base) / source)


def check_job(
    job: Job, base: Path, index: int = 0, device: bool = True
) -> tuple[Path, Path, object, Eval | None]:
    """Everything about a job that can be checked before any job of the recipe runs: its output
    (writable, not an input, ours), model, device (unless `device` is False), texts, sequence
    lengths, export exits. Returns (output, model dir, calibration, eval) with paths resolved
    against the recipe's folder."""
    from .model.config import read_config

    out = Path(os.path.normpath(Path(base) / job.output))  # absolute output stays as is
    key = f"jobs[{index}]"
    model_path = None if job.model.startswith("builtin:") else Path(base) / job.model
    check_output_dir(out, inputs=[model_path], flag=f"{key}.output", kind="job")
    src = resolve_model(job.model, base)
    calib = job.calibration.model_copy(update={"source": _under(base, job.calibration.source)})
    ev = job.eval.model_copy(update={"source": _under(base, job.eval.source)}) if job.eval else None
    preflight(src, job.quantize, calib, ev, label=lambda sec, k: f"{key}.{sec}.{k}", device=device)
    cfg = read_config(src)
    for n, ex in enumerate(job.export):
        try:
            cfg.exit_list(ex.exits)
        except UserError as e:
            raise UserError(f"{key}.export[{n}].exits: {e}") from None
    check_exports(job, cfg, key)
    if ev is not None:
        try:
            cfg.exit_list(ev.exits)
        except UserError as e:
            raise UserError(f"{key}.eval.exits: {e}") from None
    return out, src, calib, ev


def check_exports(job: Job, cfg, key: str) -> None:
    """Whether every export of the job can hold the grids its quantize section will make, decided
    from the plan (on a meta model) before anything is computed: each format's own check, run on
    what the family will be."""
    from . import exporters
    from .model.familial import skeleton
    from .quant.plan import settings_plan

    q = job.quantize
    model = skeleton(cfg)
    plan = settings_plan(model, q)
    widths = {m: model.get_submodule(m).in_features for m in plan}
    for m, spec in plan.items():
        if spec.group_size > widths[m]:
            raise UserError(
                f"{key}.quantize.group_size: {spec.group_size} is larger than {m}'s {widths[m]} input columns"
            )
    act_order = q.method == "gptq" and gptq_act_order(q) and not q.gptq.static_groups
    target = exporters.Target.planned(cfg, plan, widths, act_order, q.gguf if plan else None)
    dumps = [ex.model_dump() for ex in job.export]
    for n, ex in enumerate(job.export):
        where = f"{key}.export[{n}]"
        same = next(
            (
                i
                for i in range(n)
                if dumps[i] == dumps[n] or (ex.folder and job.export[i].folder == ex.folder)
            ),
            None,
        )
        if same is not None:
            raise UserError(
                f"{where}: writes to the same folder as {key}.export[{same}]; give one a different 'folder'"
            )
        try:
            exporters.get(ex.format, f"{where}.format").check(target, ex)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

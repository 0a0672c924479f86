"""A family -> the ONNX folders of a job or of `ruyi-quant export --format onnx`: one folder per
exit (exit-E/) and/or the multi-exit folder (multi-exit/)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...log import bar, say
from ...model.layout import exit_folder
from ...store.files import disk_bytes
from .files import write_exit, write_multi
from .graph import check_onnx

MULTI_FOLDER = "multi-exit"


def label(fam, ex) -> str:
    """What an ONNX export mostly holds, for its folder name: int4, int8, float32, float16, and
    -float16 after intN when the float parts are half precision."""
    bits = Counter(s.bits for s in fam.modules.values())
    if ex.weights == "float" or not bits:
        return ex.dtype
    return f"int{bits.most_common(1)[0][0]}" + ("-float16" if ex.dtype == "float16" else "")


# --- the format's contract (exporters/__init__.py) ------------------------------------------
def check(target, ex) -> None:
    """What these graphs cannot hold (graph.check_onnx), from a family or a job's plan."""
    target.refuse_blocks("onnx")
    check_onnx(target.config, target.plan, ex)


def folder(fam, ex) -> str:
    return f"onnx-{label(fam, ex)}"


def written(info: dict, out: Path) -> list[str]:
    lines = [
        f"wrote {out / exit_folder(x['exit'])} ({disk_bytes(out / exit_folder(x['exit'])) / 1e6:.2f} MB)"
        for x in info["exits"]
    ]
    if info["multi"]:
        m = info["multi"]
        lines.append(
            f"wrote {out / MULTI_FOLDER} ({m['bytes'] / 1e6:.2f} MB for exits {m['exits']}: "
            f"{m['tensor_bytes'] / 1e6:.2f} MB of distinct tensors in one data file)"
        )
    return lines


def export(
    fam, out_root: Path, tokenizer_dir: Path | None, ex, progress: bool = True, calibration=None
) -> dict:
    """The folders the ONNXExport settings `ex` ask for, under out_root (created). Returns what
    was written: {"exits": [per-exit info], "multi": info or None}."""
    from .. import Target

    check(Target.of_family(fam), ex)  # before any folder or progress bar
    exits = fam.config.exit_list(ex.exits)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    written: dict = {"exits": [], "multi": None}
    if ex.per_exit:
        for e in bar(exits, desc="export onnx", unit="exit", enabled=progress):
            d = out_root / exit_folder(e)
            d.mkdir()
            written["exits"].append(write_exit(fam, e, d, tokenizer_dir, ex))
    if ex.multi:
        if progress:
            say(f"  writing the multi-exit folder {MULTI_FOLDER}/")
        d = out_root / MULTI_FOLDER
        d.mkdir()
        written["multi"] = write_multi(fam, d, tokenizer_dir, ex, exits)
    return written

"""The export formats, one contract each.

A format is a module with four functions, and an entry in FORMATS:

    check(target, ex)        everything that refuses the export before any work (one UserError
                             naming the setting); `target` is a finished family or a job's plan
    export(fam, out_root, tokenizer_dir, ex, progress, calibration) -> info
                             write the export into out_root (a fresh directory); `info` goes into
                             the export's manifest; it calls check first
    folder(fam, ex)          its folder inside a job's output (hf-gptq, gguf-q4_0, onnx-int4, ...)
    written(info, out)       the lines a command prints for what it wrote

`ex` is the format's settings (recipe.HFExport, GGUFExport, ONNXExport). Preflight and the CLI call
these and never branch on the format themselves. The contracts of the files each format writes are
in the top-level exporters/*.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, require
from ..quant.plan import QuantSpec
from ..recipe import GGUFExport, HFExport, ONNXExport


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # implements check, export, folder, written
    settings: type  # its recipe settings
    needs: tuple[str, ...] = ()  # optional packages (the `onnx` extra)

    def impl(self, what: str | None = None):
        """The format's module; a missing optional package is one line (`what` needs it)."""
        for package in self.needs:
            require(package, what or f"format {self.name}", f"pip install 'ruyi-quant[{self.name}]'")
        return importlib.import_module(self.module)

    def check(self, target: Target, ex) -> None:
        self.impl().check(target, ex)

    def export(
        self, fam, out_root: Path, tokenizer_dir: Path, ex, progress: bool = True, calibration=None
    ) -> dict:
        return self.impl().export(fam, Path(out_root), tokenizer_dir, ex, progress, calibration)

    def folder(self, fam, ex) -> str:
        return ex.folder or self.impl().folder(fam, ex)

    def written(self, info: dict, out: Path) -> list[str]:
        return self.impl().written(info, Path(out))


FORMATS = {
    "hf": Format("hf", "ruyi_quant.exporters.hf", HFExport),
    "gguf": Format("gguf", "ruyi_quant.exporters.gguf.export", GGUFExport),
    "onnx": Format("onnx", "ruyi_quant.exporters.onnx.export", ONNXExport, needs=("onnx", "onnxruntime")),
}


def export(fam, out_root: Path, tokenizer_dir: Path, ex, progress: bool = True, calibration=None) -> dict:
    """Write the export `ex` (any format's settings) of a family into out_root."""
    return get(ex.format).export(fam, out_root, tokenizer_dir, ex, progress, calibration)


def get(name: str, flag: str = "--format") -> Format:
    if name not in FORMATS:
        raise UserError(f"{flag} {name}: supported formats are {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class Target:
    """What an export is made from, as far as its checks need to know: the model's config and, per
    module to be quantized, its grid, its input width and the group of each input column."""

    config: object  # model.config.FamilialConfig
    plan: dict[str, QuantSpec]
    widths: dict[str, int]
    act_order_of: object  # () -> the modules whose groups do not ascend (called when needed)
    groups: object  # module -> g_idx [K] (called when a check needs it)
    gguf: str | None = None  # grids in llama.cpp's block types for this file type (q4_k_m, ...)

    @property
    def act_order(self) -> tuple[str, ...]:
        return self.act_order_of()

    @classmethod
    def of_family(cls, fam) -> Target:
        return cls(
            fam.config,
            fam.modules,
            {m: fam.linear_shape(m)[1] for m in fam.grids},
            lambda: tuple(m for m, g in fam.grids.items() if g.act_order),  # reads each g_idx
            lambda m: fam.grids[m].g_idx,
            fam.gguf,
        )

    @classmethod
    def planned(
        cls, config, plan: dict[str, QuantSpec], widths: dict[str, int], act_order: bool, gguf=None
    ) -> Target:
        """A job's plan before it runs: act-order groups are some permutation of the columns."""

        def groups(m: str) -> torch.Tensor:
            k = widths[m]
            gs = plan[m].group_size if plan[m].group_size > 0 else k
            return (torch.randperm(k) if act_order else torch.arange(k)) // gs

        return cls(config, plan, widths, lambda: tuple(plan) if act_order else (), groups, gguf)

    def refuse_blocks(self, fmt: str) -> None:
        """A format that holds GPTQ/AWQ grids refuses llama.cpp's blocks, in one line."""
        if self.gguf:
            raise UserError(
                f"format {fmt}: this family's grids are llama.cpp's {self.gguf} blocks (super-blocks "
                "with 6-bit sub-block scales), which the GPTQ, AWQ and MatMulNBits layouts cannot "
                "hold exactly; export format gguf, or quantize without gguf"
            )

"""A quantized family as one model in memory that runs any exit in int4: every quantized linear an
Int4Linear (int4.py), everything else in the compute dtype, one copy of the trunk; built linear by
linear from the (lazy) family, so the float model is never materialised."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..log import bar
from ..model.familial import FamilialModel, materialise, skeleton
from .int4 import Int4Linear


def int4_model(
    fam, device="cpu", dtype: torch.dtype = torch.bfloat16, progress: bool = True
) -> FamilialModel:
    """The family's FamilialModel with Int4Linear for its grids (one trunk, every exit: the exit
    stays an argument of each call)."""
    if fam.gguf:
        raise UserError(
            f"the int4 runtime holds GPTQ/AWQ grids, and this family's are llama.cpp's {fam.gguf} "
            "blocks; run its GGUF export in llama.cpp (export --format gguf)"
        )
    device = torch.device(device)
    model = skeleton(fam.config)
    for module in bar(list(fam.grids), desc="int4", unit="linear", enabled=progress):
        bias = f"{module}.bias"
        lin = Int4Linear(
            fam.grids[module].get(), fam.tensors[bias] if bias in fam.tensors else None, device, dtype
        )
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    state = {}
    for name, t in model.state_dict().items():
        if t.is_meta and fam.stored_name(name) == name:  # a tied head reads the embedding's
            src = fam.tensors[name]
            state[name] = src.to(device, dtype if src.is_floating_point() else src.dtype)
    return materialise(model, state)

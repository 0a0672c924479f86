"""A quantized family as one model in memory that runs any exit in int4: every quantized linear an
Int4Linear (int4.py), everything else in the compute dtype, one copy of the trunk; built linear by
linear from the (lazy) family, so the float model is never materialised."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import names
from ..model.familial import FamilialModel
from .int4 import Int4Linear


def int4_model(fam, device="cpu", dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> FamilialModel:
    """The family's FamilialModel with Int4Linear for its grids (one trunk, every exit: the exit
    stays an argument of each call)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = FamilialModel(fam.config)
    for module in tqdm(list(fam.grids), desc="int4", unit="linear", disable=not progress, leave=False):
        bias = f"{module}.bias"
        lin = Int4Linear(fam.grids[module].get(), fam.tensors[bias] if bias in fam.tensors else None,
                         device, dtype)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    state = {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            src = fam.tensors[fam.stored_name(name)]
            state[name] = src.to(device, dtype if src.is_floating_point() else src.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if fam.config.tie_word_embeddings and names.SHARED_HEAD not in fam.grids:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rotary()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AssertionError(f"not loaded: {left[:3]}")
    return model.eval()

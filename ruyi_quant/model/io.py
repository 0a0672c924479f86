"""Read and write unquantized familial checkpoints (config.json + safetensors, maybe sharded).

Every tensor is checked before use: present, right shape, finite. A problem is one UserError
that names the tensor.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import names
from ..errors import UserError, writing
from ..fsutil import read_json
from .config import read_config
from .familial import FamilialModel

PROGRESS_BYTES = 200_000_000       # show a progress bar when loading more than this
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors or a sharded index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        wmap = read_json(index, "safetensors index")
        wmap = wmap.get("weight_map") if isinstance(wmap, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        files = {name: model_dir / f for name, f in wmap.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise UserError(f"{index}: shard {f.name} is listed but missing")
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise UserError(f"{model_dir}: only pickle weights (.bin/.pt) found; ruyi-quant never loads "
                        "pickles: convert them to safetensors first")
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open, with a corrupt or unreadable file as one UserError naming it."""
    try:
        with safe_open(path, "pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None


def read_tensors(files: dict[str, Path], wanted: list[str] | None = None):
    """Yield (name, tensor) for the wanted names (all by default), one file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in (wanted if wanted is not None else files):
        by_file.setdefault(files[name], []).append(name)
    for path, tensor_names in by_file.items():
        with open_safetensors(path) as f:
            present = set(f.keys())
            for name in tensor_names:
                if name not in present:
                    raise UserError(f"{path}: the index lists {name} in this file, but it is not there")
                t = f.get_tensor(name)
                yield name, t


def check_finite(name: str, t: torch.Tensor, path: Path | None = None) -> None:
    """A float tensor must hold finite numbers (and be float: an integer weight is corrupt too);
    `path`: the file it was read from, named in the error."""
    where = f"{path}: " if path is not None else ""
    if not t.is_floating_point():
        raise UserError(f"{where}tensor {name} is {str(t.dtype).removeprefix('torch.')}, not a "
                        "floating-point weight; the checkpoint is corrupt")
    for block in t.reshape(-1).split(1 << 24):   # blocks: isfinite of a bf16 head makes float32
        if not torch.isfinite(block).all():      # and bool copies of it (3 GB for Ruyi's)
            bad = "NaN" if torch.isnan(block).any() else "Inf"
            raise UserError(f"{where}tensor {name} contains {bad} values; the checkpoint is corrupt")


def load_model(model_dir: str | Path, dtype: torch.dtype | None = torch.float32) -> FamilialModel:
    """Load a ruyi_qwen2, qwen2 or llama checkpoint as a FamilialModel on the CPU.

    dtype None keeps the checkpoint's floating dtype.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"{model_dir}: no such model directory")
    cfg = read_config(model_dir)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = FamilialModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop(names.SHARED_HEAD + ".weight", None)
    plain = cfg.source_type != "ruyi_qwen2"
    rename = names.plain_to_familial(cfg.num_layers) if plain else {names.SHARED_HEAD: names.SHARED_HEAD}
    src_of: dict[str, str] = {}
    for src in files:
        if src.endswith(names.IGNORED_SUFFIXES):
            continue
        dst = names.rename(src, rename) if plain else src
        if dst is None or dst not in expected:
            raise UserError(f"{model_dir}: unexpected tensor {src} for a {cfg.source_type} model "
                            f"with {cfg.num_layers} layers and exits {cfg.exits}")
        src_of[dst] = src
    state = {}
    for dst, shape in expected.items():
        src = src_of.get(dst)
        if src is None:
            linear = dst.rsplit(".", 2)[-2] if dst.endswith(".bias") else ""
            if plain and linear in ("q_proj", "k_proj", "v_proj"):
                state[dst] = torch.zeros(shape)  # a Llama layer is a Qwen2 layer with zero q/k/v bias
                continue
            raise UserError(f"{model_dir}: missing tensor {dst}")
    big = sum(f.stat().st_size for f in set(files.values())) > PROGRESS_BYTES
    tensors = read_tensors(files, list(src_of.values()))
    for src, t in tqdm(tensors, total=len(src_of), desc="load", unit="tensor", disable=not big,
                       leave=False):
        dst = names.rename(src, rename) if plain else src
        if tuple(t.shape) != tuple(expected[dst]):
            raise UserError(f"{model_dir}: tensor {src} has shape {list(t.shape)}, "
                            f"expected {list(expected[dst])}")
        check_finite(src, t, files[src])
        state[dst] = t
    if dtype is None:
        dtype = next((t.dtype for k, t in state.items() if k in src_of and t.is_floating_point()),
                     torch.float32)              # the file's, not the zero biases' made above
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rotary()
    return model.eval()


def familial_state(model: FamilialModel) -> dict[str, torch.Tensor]:
    """State dict with Ruyi's names, tied head left out."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop(names.SHARED_HEAD + ".weight", None)
    return {k: v.contiguous() for k, v in state.items()}


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copy2(Path(src) / f, Path(dst) / f)


def save_model(model: FamilialModel, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
               tokenizer_dir: Path | None = None) -> None:
    """Write a ruyi_qwen2 checkpoint (into an existing directory)."""
    out_dir = Path(out_dir)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in familial_state(model).items()}
    with writing(out_dir / "model.safetensors"):
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_json()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)

"""A synthetic AI-Flow-Ruyi-7B: its exact config (FACTS.md) with random bf16 weights of a realistic
scale, written shard by shard like the real checkpoint and never held in memory (one chunk of rows
at a time). For memory and speed measurements only: the weights are random, so are its outputs,
and every report made from it says so (`synthetic: true` in its ruyi_quant.json).

`depth` and `exits` make shallower families of the same widths (depth 3, exits 1,2: 2.56B
parameters with separate heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import names
from ..model import layout
from ..store.safetensors import SHARD_BYTES, Entry, write_sharded

RUYI_7B = {
    "model_type": "ruyi_qwen2",
    "architectures": ["RuyiQwen2ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "early_exit_points": [11, 15, 19, 23, 27],
    "default_early_exit_point": -1,
    "shared_heads": False,
    "torch_dtype": "bfloat16",
}
CHUNK_ELEMENTS = 1 << 25  # rows generated per chunk: about 32M values (128 MB in fp32)


def synthetic_config(depth: int = 28, exits: list[int] | None = None, **overrides) -> dict:
    """Ruyi-7B's config at `depth` (overrides: other widths, for tests)."""
    cfg = dict(RUYI_7B, num_hidden_layers=depth, **overrides)
    cfg["early_exit_points"] = (
        list(exits) if exits else [e for e in RUYI_7B["early_exit_points"] if e < depth - 1] + [depth - 1]
    )
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the family, in checkpoint order: embedding, trunk, branches, norms, heads."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    exits = cfg["early_exit_points"]
    out = {f"{names.EMBED}.weight": (v, h)}
    layer = layout.layer_shapes(cfg)
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"{names.TRUNK_LAYER.format(i=i)}.{k}": s for k, s in layer.items()})
    for j in range(len(exits) - 1):
        out.update({f"{names.BRANCH_LAYER.format(j=j)}.{k}": s for k, s in layer.items()})
    for j in range(len(exits)):
        out[f"{names.EXIT_NORM.format(j=j)}.weight"] = (h,)
    if cfg["shared_heads"]:
        out[f"{names.SHARED_HEAD}.weight"] = (v, h)
    else:
        out.update({f"{names.HEAD.format(j=j)}.weight": (v, h) for j in range(len(exits))})
    return out


def _random_rows(shape: tuple[int, ...], std: float, mean: float, gen: torch.Generator):
    """bf16 normal(mean, std) values of `shape`, a block of rows at a time."""
    rows = shape[0]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, CHUNK_ELEMENTS // per_row)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = torch.randn((n, *shape[1:]), generator=gen)
        yield x.mul_(std).add_(mean).to(torch.bfloat16)


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(std, mean) of a tensor: norms near 1, biases small, weights 1/sqrt(fan-in) like a trained
    Qwen2's, embeddings and heads 0.02."""
    if name.endswith("layernorm.weight") or ".norms." in name:
        return 0.05, 1.0
    if name.endswith(".bias"):
        return 0.02, 0.0
    if name.startswith(names.EMBED) or layout.is_head(name):
        return 0.02, 0.0
    return shape[-1] ** -0.5, 0.0


def write_synthetic(
    out_dir: Path,
    depth: int = 28,
    exits: list[int] | None = None,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    **overrides,
) -> dict:
    """Write the synthetic family (config, shards + index, a tiny tokenizer, the marker) into the
    existing directory out_dir. Returns its report."""
    from ..log import bar
    from ..store.files import write_marker
    from .tiny import build_tokenizer

    cfg = synthetic_config(depth, exits, **overrides)
    shapes = tensor_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    total = sum(numel(s) for s in shapes.values())
    pbar = bar(total=total * 2, desc="synthetic", unit="B", unit_scale=True, enabled=progress)

    def produce(name, shape):
        def rows():
            std, mean = _scale(name, shape)
            for chunk in _random_rows(shape, std, mean, gen):
                pbar.update(chunk.numel() * 2)
                yield chunk

        return rows

    entries = [Entry(n, s, torch.bfloat16, produce(n, s)) for n, s in shapes.items()]
    out_dir = Path(out_dir)
    write_sharded(out_dir, entries, shard_bytes, metadata={"format": "pt"})
    pbar.close()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    build_tokenizer(out_dir)
    report = {
        "kind": "source",
        "name": "synthetic-ruyi-7b",
        "synthetic": True,
        "note": "random weights: for memory and speed measurements only",
        "seed": seed,
        "depth": depth,
        "exits": cfg["early_exit_points"],
        "parameters": total,
    }
    write_marker(out_dir, report)
    return report


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

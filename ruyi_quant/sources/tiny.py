"""Tiny random familial checkpoints in Ruyi's real on-disk format, with a real tokenizer.

Used by the tests and as the built-in model `builtin:tiny`. Random weights give near-flat
next-token distributions in which any rounding flips the argmax, so the heads are built to be
peaked: each head is a scaled copy of the embedding matrix (plus noise), which makes the model
predict "a token like the current one" with confidence. Top-1 agreement then measures the
quantizer, not ties.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .. import text
from ..model.config import parse_config
from ..model.familial import FamilialModel
from ..model.layout import is_head
from ..store.checkpoint import save_model
from ..text import QWEN2_REGEX

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer (so transformers'
    Qwen2Tokenizer reproduces it), trained on pydoc text (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text.builtin_text("pydoc/train")[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def tiny_config(
    *,
    layers: int = 6,
    exits: tuple[int, ...] = (2, 3, 5),
    hidden: int = 128,
    intermediate: int = 320,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    shared_heads: bool = False,
    tie_word_embeddings: bool = False,
) -> dict:
    return {
        "model_type": "ruyi_qwen2",
        "architectures": ["RuyiQwen2ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "early_exit_points": list(exits),
        "default_early_exit_point": -1,
        "shared_heads": shared_heads,
    }


@torch.no_grad()
def random_model(
    raw_config: dict, seed: int = 0, head_scale: float = 1.5, gain: float = 1.0
) -> FamilialModel:
    """Random weights of the right scale, with peaked heads (see module docstring)."""
    cfg = parse_config(raw_config, "tiny config")
    g = torch.Generator().manual_seed(seed)
    model = FamilialModel(cfg)
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif is_head(name):
            continue
        else:  # linear in a decoder layer: outputs of the order of the residual stream / 4
            p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[1])))
    emb = model.model.embed_tokens.weight
    for j in range(len(cfg.exits) if not cfg.shared_heads else 1):
        head = model.head(j).weight
        w = emb + 0.5 * torch.randn(emb.shape, generator=g)
        head.copy_(w * (head_scale / math.sqrt(cfg.hidden_size)))
    return model.eval()


def build_tiny(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny Ruyi checkpoint (config, safetensors, tokenizer) into out_dir (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    raw = tiny_config(**config_overrides)
    save_model(random_model(raw, seed), out_dir, dtype=torch.float32, tokenizer_dir=None)
    (out_dir / "ruyi_tiny.json").write_text(json.dumps({"seed": seed, **config_overrides}) + "\n")
    return out_dir


def cached_tiny(name: str = "tiny") -> Path:
    """`builtin:tiny` (separate heads) or `builtin:tiny-shared`, built once into the cache dir."""
    from ..store.files import atomic_dir, cache_dir, check_cache

    variants = {"tiny": {}, "tiny-shared": {"shared_heads": True}}
    if name not in variants:
        from ..errors import UserError

        raise UserError(f"builtin:{name}: unknown built-in model (choose {', '.join(variants)})")
    path = cache_dir() / "models" / f"{name}-v2"  # v2: NFC normalizer
    if not (path / "config.json").is_file():
        check_cache(path)
        with atomic_dir(path, check=False) as tmp:
            build_tiny(tmp, **variants[name])
    return path


if __name__ == "__main__":  # pragma: no cover
    print(build_tiny(os.environ.get("OUT", "tiny-model")))

"""Generation with an exit chosen per call (greedy, KV cache): the smoke test of a family's chat."""

from __future__ import annotations

from .. import data
from .familial import FamilialModel


def greedy_chat(model: FamilialModel, tokenizer, prompt: str, exit: int | None = None,
                max_new_tokens: int = 40) -> str:
    """The exit's greedy answer to one user message (chat template, KV cache)."""
    from ..runtime.generate import generate
    out = generate(model, [data.chat_ids(tokenizer, prompt)], exit, max_new_tokens,
                   eos={tokenizer.eos_token_id})[0]
    return tokenizer.decode(out)

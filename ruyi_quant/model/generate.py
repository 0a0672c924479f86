"""Generation with an exit chosen per call (greedy, KV cache): the smoke test of a family's chat."""

from __future__ import annotations

import torch

from .. import data
from .familial import FamilialModel


@torch.no_grad()
def greedy_chat(model: FamilialModel, tokenizer, prompt: str, exit: int | None = None,
                max_new_tokens: int = 40) -> str:
    """The exit's greedy answer to one user message (chat template, KV cache)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = data.tokenize(tokenizer, text).unsqueeze(0)
    cache, out = model.new_cache(), []
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        nxt = model(ids, exit=exit, cache=cache).logits[0, -1].argmax().item()
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]])
    return tokenizer.decode(out)

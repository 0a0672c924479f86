"""Generation on a loaded family (int4 or float), the exit chosen per call: a batch of prompts,
left-padded, with a KV cache (or without, recomputing every step: the oracle the cache is tested
against), greedy or sampled, stopping at end-of-sequence tokens."""

from __future__ import annotations

import torch

from .. import text
from ..model.familial import FamilialModel
from ..recipe import Sampling

DEFAULT = Sampling()


def pick(
    logits: torch.Tensor,
    sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax, or a draw after temperature, top-k and top-p."""
    if not sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_, order = logits.sort(-1, descending=True)
        probs = sorted_.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


STATIC_BUCKET = 256  # static cache sizes: multiples of this


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    exit: int | None,
    max_new_tokens: int,
    eos=(),
    pad_id: int = 0,
    sample: bool = DEFAULT.sample,
    temperature: float = DEFAULT.temperature,
    top_k: int = DEFAULT.top_k,
    top_p: float = DEFAULT.top_p,
    seed: int = DEFAULT.seed,
    use_cache: bool = True,
    on_token=None,
    static: bool = False,
    compiled: bool = False,
) -> list[list[int]]:
    """New tokens of each prompt (token ids) at one exit, up to an end-of-sequence token (not
    included) or max_new_tokens. on_token(row, token) is called for each as it is made.
    static: a fixed-size KV cache (prompt + max_new_tokens) and a fixed-size mask, so every decode
    step has the same shapes and addresses (the size rounded up to STATIC_BUCKET, so requests of
    different lengths share one compiled step); compiled (implies static): decode steps run through
    torch.compile (CUDA graphs on CUDA: `mode="reduce-overhead"`), the prefill eagerly."""
    dev = model.model.embed_tokens.weight.device
    b, t = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(seed) if sample else None
    static = (static or compiled) and use_cache
    size = -(-(t + max_new_tokens) // STATIC_BUCKET) * STATIC_BUCKET
    cache = model.new_cache(size if static else None) if use_cache else None
    if static:  # slots not yet written come after every query: causality masks them
        mask = torch.cat([mask, torch.ones((b, size - t), dtype=mask.dtype, device=dev)], 1)
    decode = compiled_forward(model) if compiled and use_cache else model
    step, step_pos = ids, pos
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    stop = torch.tensor(sorted(eos), dtype=torch.long, device=dev)
    for i in range(max_new_tokens):
        if use_cache:
            f = model if i == 0 else decode
            logits = f(
                step, exit=exit, attention_mask=mask, position_ids=step_pos, cache=cache, logits_to_keep=1
            ).logits
        else:
            logits = model(ids, exit=exit, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        nxt = pick(logits[:, -1], sample, temperature, top_k, top_p, gen)
        done |= torch.isin(nxt, stop)
        for r in torch.nonzero(~done).flatten().tolist():
            out[r].append(int(nxt[r]))
            if on_token is not None:
                on_token(r, out[r][-1])
        if bool(done.all()):
            break
        nxt = nxt.masked_fill(done, pad_id)
        step, step_pos = nxt.unsqueeze(1), pos[:, -1:] + 1
        ids, pos = torch.cat([ids, step], 1), torch.cat([pos, step_pos], 1)
        if not static:
            mask = torch.cat([mask, torch.ones_like(step)], 1)
    return out


def compiled_forward(model):
    """The model's forward through torch.compile, made once per model: CUDA graphs on CUDA
    (`reduce-overhead`), inductor's default elsewhere; shapes fixed (static cache, one token)."""
    f = getattr(model, "_ruyi_compiled", None)
    if f is None:
        cuda = model.model.embed_tokens.weight.device.type == "cuda"
        f = torch.compile(model.forward, mode="reduce-overhead" if cuda else "default", dynamic=False)
        model._ruyi_compiled = f
    return f


def greedy_chat(
    model: FamilialModel, tokenizer, prompt: str, exit: int | None = None, max_new_tokens: int = 40
) -> str:
    """The exit's greedy answer to one user message (chat template, KV cache)."""
    out = generate(
        model, [text.chat_ids(tokenizer, prompt)], exit, max_new_tokens, eos={tokenizer.eos_token_id}
    )[0]
    return tokenizer.decode(out)

"""The familial transformer, composed from transformers' own Qwen2 modules (no remote code).

Exit e (position j in `config.exits`) runs trunk layers 0..e-1, then ONE branch layer
(`model.eelayers[j]`, or trunk layer N-1 for the last exit), then `model.norms[j]`, then its
head. It is therefore exactly a plain Qwen2 model of e+1 layers, and uses KV-cache slots 0..e.
The exit is an explicit argument of every call; there is no global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from ..errors import UserError
from . import layout
from .config import FamilialConfig


@dataclass
class ExitOutput:
    logits: torch.Tensor  # [B, T, V]
    cache: DynamicCache | None = None


class FamilialModel(nn.Module):
    """Module tree mirrors Ruyi's tensor names: `model.layers`, `model.eelayers`, `model.norms`,
    `lm_head` (one Linear when shared, else a ModuleList)."""

    def __init__(self, config: FamilialConfig):
        super().__init__()
        self.config = config
        hf = self.hf_config = config.qwen2()
        n, exits, h, v = config.num_layers, config.exits, config.hidden_size, config.vocab_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(v, h, hf.pad_token_id)
        self.model.layers = nn.ModuleList(Qwen2DecoderLayer(hf, i) for i in range(n))
        # The branch layer of exit e owns KV slot e (the trunk never reaches layer e at that exit).
        self.model.eelayers = nn.ModuleList(Qwen2DecoderLayer(hf, e) for e in exits[:-1])
        self.model.norms = nn.ModuleList(Qwen2RMSNorm(h, eps=hf.rms_norm_eps) for _ in exits)
        self.model.rotary_emb = Qwen2RotaryEmbedding(config=hf)
        if config.shared_heads:
            self.lm_head = nn.Linear(h, v, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = nn.ModuleList(nn.Linear(h, v, bias=False) for _ in exits)

    # --- parts of one exit ---------------------------------------------------------------
    def branch(self, j: int) -> Qwen2DecoderLayer:
        return self.get_submodule(layout.branch_prefix(self.config.exits, self.config.num_layers, j))

    def head(self, j: int) -> nn.Linear:
        return self.get_submodule(layout.head_prefix(self.config.shared_heads, j))

    def new_cache(self, max_len: int | None = None) -> DynamicCache | StaticCache:
        """A KV cache for one exit's requests: growing (DynamicCache), or of fixed size max_len
        (StaticCache: its tensors keep their addresses, what CUDA graphs and torch.compile need)."""
        if max_len is not None:
            return StaticCache(config=self.hf_config, max_cache_len=max_len)
        return DynamicCache(config=self.hf_config)

    def reset_rotary(self, device=None) -> None:
        """Recompute the rotary buffers (needed after building the model on the meta device), on
        `device` (default: the embedding's)."""
        device = device or self.model.embed_tokens.weight.device
        self.model.rotary_emb = Qwen2RotaryEmbedding(config=self.hf_config).to(device)

    # --- forward -------------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Embeddings [B, T, H] and what every layer takes besides them (mask, positions, rope)."""
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        return x, self.layer_kwargs(x, attention_mask, position_ids, cache)

    def layer_kwargs(self, x, attention_mask=None, position_ids=None, cache=None) -> dict:
        """What every layer takes besides its input x [B, T, H]: mask, positions, rope."""
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.hf_config,
            inputs_embeds=x,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        rope = self.model.rotary_emb(x, position_ids)
        return dict(attention_mask=mask, position_ids=position_ids, position_embeddings=rope)

    def forward(
        self,
        input_ids: torch.Tensor,
        exit: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> ExitOutput:
        """Logits of one exit (given by its layer index; None/-1 = the default exit); of the last
        `logits_to_keep` positions only when it is > 0 (generation: the head of a big vocabulary
        over a whole prompt is memory and time nothing reads)."""
        j = self.config.exit_index(exit)
        e = self.config.exits[j]
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            owner = getattr(cache, "ruyi_exit", e)
            if owner != e:
                raise UserError(f"this KV cache belongs to exit {owner}; start a new cache for exit {e}")
            cache.ruyi_exit = e
        x, kw = self.prepare(input_ids, attention_mask, position_ids, cache)
        for layer in self.model.layers[:e]:
            x = layer(x, cache=cache, use_cache=cache is not None, **kw)
        x = self.branch(j)(x, cache=cache, use_cache=cache is not None, **kw)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.head(j)(self.model.norms[j](x))
        return ExitOutput(logits=logits, cache=cache)

    @torch.no_grad()
    def forward_exits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        exits: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Logits of several exits from one pass of the shared trunk (no cache)."""
        want = set(self.config.exits if exits is None else exits)
        for e in want:
            self.config.exit_index(e)
        x, kw = self.prepare(input_ids, attention_mask)
        out = {}
        for step in self.config.walk(sorted(want)):
            if step.kind == "exit":
                h = self.get_submodule(step.prefix)(x, **kw)
                out[step.layer] = self.head(step.j)(self.model.norms[step.j](h))
            else:
                x = self.get_submodule(step.prefix)(x, **kw)
        return out


def familial_state(model: FamilialModel) -> dict[str, torch.Tensor]:
    """State dict with Ruyi's names, tied head left out."""
    tied = model.config.tie_word_embeddings
    return {k: v.contiguous() for k, v in model.state_dict().items() if layout.stored_name(tied, k) == k}


def skeleton(config: FamilialConfig) -> FamilialModel:
    """The model with every tensor on the meta device: modules to swap and load before use."""
    with torch.device("meta"):
        return FamilialModel(config)


def materialise(model: FamilialModel, state: dict[str, torch.Tensor]) -> FamilialModel:
    """A skeleton (skeleton(), its linears maybe swapped) made real: `state` assigned into it (a
    tied head's weight may be left out), the tied head tied, the rotary tables computed. Every
    tensor must then be real (an AssertionError names those that are not)."""
    model.load_state_dict(state, strict=False, assign=True)
    layout.tie_head(model)
    model.reset_rotary()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AssertionError(f"not loaded: {left[:3]}")
    return model.eval()

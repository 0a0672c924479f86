"""The one table of names: tensors and modules (Ruyi's, a plain model's, llama.cpp's), and the
files every directory of ours carries.

Our familial module tree mirrors Ruyi's checkpoint names, so `state_dict()` keys are Ruyi's keys.
Everything that renames a tensor (plain checkpoints in, per-exit checkpoints out) goes through
the templates and functions here; no other module spells a tensor name. What the names stand for
(the decoder layer's linears, the walk, each exit's parts) is model/layout.py.
"""

from __future__ import annotations

import re

# --- files -------------------------------------------------------------------------------
MARKER = "ruyi_quant.json"  # the manifest every directory we write carries

# --- familial (Ruyi) checkpoint -------------------------------------------------------------
EMBED = "model.embed_tokens"
TRUNK_LAYER = "model.layers.{i}"
BRANCH_LAYER = "model.eelayers.{j}"
EXIT_NORM = "model.norms.{j}"
HEAD = "lm_head.{j}"
SHARED_HEAD = "lm_head"

# --- plain Qwen2 / Llama checkpoint (and every per-exit export) -----------------------------
PLAIN_LAYER = "model.layers.{i}"
PLAIN_NORM = "model.norm"
PLAIN_HEAD = "lm_head"

# Tensors that some checkpoints carry and nobody needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rename(name: str, prefix_map: dict[str, str]) -> str | None:
    """Rename a tensor by the longest matching module prefix; None if no prefix matches."""
    best = None
    for src in prefix_map:
        if (name == src or name.startswith(src + ".")) and (best is None or len(src) > len(best)):
            best = src
    if best is None:
        return None
    return prefix_map[best] + name[len(best) :]


def plain_to_familial(num_layers: int) -> dict[str, str]:
    """Plain Qwen2/Llama prefix -> familial prefix: a plain model is a family of one exit."""
    out = {EMBED: EMBED, PLAIN_NORM: EXIT_NORM.format(j=0), PLAIN_HEAD: SHARED_HEAD}
    for i in range(num_layers):
        out[PLAIN_LAYER.format(i=i)] = TRUNK_LAYER.format(i=i)
    return out


def module_of(tensor_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.qweight` -> `model.layers.0.self_attn.q_proj`."""
    return tensor_name.rsplit(".", 1)[0]


# --- GGUF (llama.cpp) -----------------------------------------------------------------------
# Plain-model module -> GGUF tensor prefix (llama.cpp's names for qwen2 and llama).
GGUF_GLOBAL = {EMBED: "token_embd", PLAIN_NORM: "output_norm", PLAIN_HEAD: "output"}
GGUF_BLOCK = "blk.{i}"
GGUF_IN_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# The multi-exit file: trunk layers are blk.{i}, exit j's own parts live under exit.{j}.
GGUF_EXIT = "exit.{j}"


def gguf_name(plain_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (plain model names)."""
    mod, suffix = plain_name.rsplit(".", 1)
    if mod in GGUF_GLOBAL:
        return f"{GGUF_GLOBAL[mod]}.{suffix}"
    parts = mod.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in GGUF_IN_LAYER:
        return f"{GGUF_BLOCK.format(i=int(parts[2]))}.{GGUF_IN_LAYER['.'.join(parts[3:])]}.{suffix}"
    raise KeyError(f"no GGUF name for {plain_name}")


def gguf_multi_name(familial_name: str) -> str:
    """Familial (Ruyi) tensor name -> its name in the multi-exit GGUF file."""
    mod, suffix = familial_name.rsplit(".", 1)
    parts = mod.split(".")
    if mod == EMBED:
        return f"token_embd.{suffix}"
    if mod == SHARED_HEAD:
        return f"output.{suffix}"
    if parts[:2] == ["model", "layers"]:
        return gguf_name(familial_name)
    if parts[:2] == ["model", "eelayers"]:
        return f"{GGUF_EXIT.format(j=int(parts[2]))}.{GGUF_IN_LAYER['.'.join(parts[3:])]}.{suffix}"
    if parts[:2] == ["model", "norms"]:
        return f"{GGUF_EXIT.format(j=int(parts[2]))}.output_norm.{suffix}"
    if parts[0] == "lm_head" and len(parts) == 2:
        return f"{GGUF_EXIT.format(j=int(parts[1]))}.output.{suffix}"
    raise KeyError(f"no GGUF name for {familial_name}")


def gguf_multi_to_exit(name: str, exit_map) -> str | None:
    """A multi-exit GGUF tensor name -> its name in the exit's stock file (None: not in it);
    `exit_map`: the exit's model.layout.ExitMap."""
    shared_heads = exit_map.head == SHARED_HEAD
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m:
        return name if TRUNK_LAYER.format(i=int(m.group(1))) in exit_map.modules else None
    m = re.fullmatch(r"exit\.(\d+)\.(.+)", name)
    if m:
        if int(m.group(1)) != exit_map.j:
            return None
        rest = m.group(2)
        if rest.startswith(("output_norm.", "output.")):
            return rest if (rest.startswith("output_norm.") or not shared_heads) else None
        return f"{GGUF_BLOCK.format(i=exit_map.layer)}.{rest}"
    if name.startswith("output.") and not shared_heads:
        return None
    return name

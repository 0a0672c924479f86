"""The one table of tensor and module names.

Our familial module tree mirrors Ruyi's checkpoint names, so `state_dict()` keys are Ruyi's keys.
Everything that renames a tensor (plain checkpoints in, per-exit checkpoints out) goes through
the templates and functions here; no other module spells a tensor name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

# Linear modules inside one decoder layer, in execution order, and whether they carry a bias
# (Qwen2: q/k/v do; a Llama source gets zero biases on load, which is exact).
LAYER_LINEARS: dict[str, bool] = {
    "self_attn.q_proj": True,
    "self_attn.k_proj": True,
    "self_attn.v_proj": True,
    "self_attn.o_proj": False,
    "mlp.gate_proj": False,
    "mlp.up_proj": False,
    "mlp.down_proj": False,
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# Linears that read the same input, in the order a layer computes them: calibration quantizes
# one group, then re-captures the next group's inputs through the quantized ones.
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def branch_prefix(exits: list[int], num_layers: int, j: int) -> str:
    """Module prefix of exit j's branch layer: its own eelayer, or (the last exit) trunk layer N-1."""
    return TRUNK_LAYER.format(i=num_layers - 1) if exits[j] == num_layers - 1 else BRANCH_LAYER.format(j=j)


def head_prefix(shared_heads: bool, j: int) -> str:
    return SHARED_HEAD if shared_heads else HEAD.format(j=j)


# --- the family's structure: one walk, one map per exit ----------------------------------------
# Exits are addressed two ways, one per layer of the API: users and files name an exit by its
# trunk layer `e` (config `early_exit_points`, `--exits 12,29`, `exit-29/`); code that indexes
# the family's lists (branch layers, norms, heads) uses its position `j` (`exits[j] == e`).

@dataclass(frozen=True)
class Step:
    """One layer of the family's walk: a trunk layer, or an exit's branch layer."""
    kind: str                  # "trunk" | "exit"
    layer: int                 # trunk layer i; for an exit, its layer e (it reads layer e's input)
    prefix: str                # module prefix of the layer that runs
    j: int = -1                # exit position (exits only)


def walk(exits: list[int], num_layers: int):
    """The layers in the order one pass computes them. At exit e < N-1: the exit's branch layer
    (on the input trunk layer e gets), then trunk layer e. The last exit's branch is trunk layer
    N-1 itself, so that layer appears once, as the exit."""
    for i in range(num_layers):
        if i in exits:
            j = exits.index(i)
            yield Step("exit", i, branch_prefix(exits, num_layers, j), j)
        if i != exits[-1]:
            yield Step("trunk", i, TRUNK_LAYER.format(i=i))


@dataclass(frozen=True)
class ExitMap:
    """Exit j as a plain Qwen2 model of e+1 layers: trunk layers 0..e-1, then the branch layer as
    layer e, the exit's norm as the final norm, its head as lm_head."""
    j: int
    layer: int                 # e
    branch: str                # module prefixes in the family
    norm: str
    head: str
    modules: dict              # familial module prefix -> plain module prefix

    def rename(self, name: str) -> str | None:
        """A familial tensor name -> its name in this exit's plain model (None: not in it)."""
        return rename(name, self.modules)


def exit_map(exits: list[int], num_layers: int, shared_heads: bool, j: int) -> ExitMap:
    e = exits[j]
    branch, norm, head = branch_prefix(exits, num_layers, j), EXIT_NORM.format(j=j), head_prefix(shared_heads, j)
    modules = {EMBED: EMBED}
    for i in range(e):
        modules[TRUNK_LAYER.format(i=i)] = PLAIN_LAYER.format(i=i)
    modules.update({branch: PLAIN_LAYER.format(i=e), norm: PLAIN_NORM, head: PLAIN_HEAD})
    return ExitMap(j, e, branch, norm, head, modules)


def rename(name: str, prefix_map: dict[str, str]) -> str | None:
    """Rename a tensor by the longest matching module prefix; None if no prefix matches."""
    best = None
    for src in prefix_map:
        if (name == src or name.startswith(src + ".")) and (best is None or len(src) > len(best)):
            best = src
    if best is None:
        return None
    return prefix_map[best] + name[len(best):]


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


def gguf_multi_to_exit(name: str, exit_map: ExitMap) -> str | None:
    """A multi-exit GGUF tensor name -> its name in the exit's stock file (None: not in it)."""
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

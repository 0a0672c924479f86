"""The family's structure, declared once: the decoder layer every consumer reads, the walk one
pass takes through the family, each exit as a plain model, the role of a module, the tied head,
and the folder each exit's files go in.

Exits are addressed two ways, one per layer of the API: users and files name an exit by its trunk
layer `e` (config `early_exit_points`, `--exits 12,29`, `exit-29/`); code that indexes the
family's lists (branch layers, norms, heads) uses its position `j` (`exits[j] == e`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import names


# --- the Qwen2 / Llama decoder layer -------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    """One linear of a decoder layer. Sizes by name: `hidden`, `q` (heads x head_dim), `kv`
    (key/value heads x head_dim), `intermediate`."""

    name: str  # module path inside the layer
    bias: bool  # Qwen2's q/k/v carry one (a Llama layer: zeros, which is exact)
    rows: str  # output features
    cols: str  # input features
    clip: bool = True  # AWQ's clipping search (not q/k: it hurts attention, as AutoAWQ)
    rope: bool = False  # rotary rows (q/k): llama.cpp's llama layout interleaves them


@dataclass(frozen=True)
class Group:
    """Linears that read the same input, in the order a layer computes them: calibration quantizes
    one group, then captures the next group's inputs through the quantized ones; AWQ scales the
    group's input columns and folds the inverse into `reads`, the op that feeds them."""

    reads: str
    linears: tuple[Linear, ...]
    fused: str | None = None  # the group as one matmul (ONNX's qkv and gate-up projections)
    # the layer's sub-block whose last op is this group's one linear: the block's output is that
    # linear applied to its input (calibration replays it, walk.Replay), a pair with the
    # attention weights for attention, as transformers' attention modules return
    ends: str | None = None
    ends_pair: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)


DECODER_LAYER = (
    Group(
        "input_layernorm",
        (
            Linear("self_attn.q_proj", True, "q", "hidden", clip=False, rope=True),
            Linear("self_attn.k_proj", True, "kv", "hidden", clip=False, rope=True),
            Linear("self_attn.v_proj", True, "kv", "hidden"),
        ),
        fused="self_attn.qkv_proj",
    ),
    Group(
        "self_attn.v_proj",
        (Linear("self_attn.o_proj", False, "hidden", "q"),),
        ends="self_attn",
        ends_pair=True,
    ),
    Group(
        "post_attention_layernorm",
        (
            Linear("mlp.gate_proj", False, "intermediate", "hidden"),
            Linear("mlp.up_proj", False, "intermediate", "hidden"),
        ),
        fused="mlp.gate_up_proj",
    ),
    Group("mlp.up_proj", (Linear("mlp.down_proj", False, "hidden", "intermediate"),), ends="mlp"),
)
LAYER_LINEARS = {lin.name: lin for g in DECODER_LAYER for lin in g.linears}  # execution order
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
BIASES = tuple(f"{lin.name}.bias" for lin in LAYER_LINEARS.values() if lin.bias)


def layer_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer (names inside the layer) -> its shape, from config.json."""
    h = raw["hidden_size"]
    head_dim = raw.get("head_dim") or h // raw["num_attention_heads"]
    size = {
        "hidden": h,
        "intermediate": raw["intermediate_size"],
        "q": head_dim * raw["num_attention_heads"],
        "kv": head_dim * raw.get("num_key_value_heads", raw["num_attention_heads"]),
    }
    out = {}
    for lin in LAYER_LINEARS.values():
        out[f"{lin.name}.weight"] = (size[lin.rows], size[lin.cols])
        if lin.bias:
            out[f"{lin.name}.bias"] = (size[lin.rows],)
    out.update({f"{n}.weight": (h,) for n in LAYER_NORMS})
    return out


def is_layer_bias(name: str) -> bool:
    """A decoder layer's bias (q/k/v): a Llama layer lacks them, loading a Llama source makes them
    zero."""
    return name.endswith(tuple("." + b for b in BIASES))


# --- roles ---------------------------------------------------------------------------------
def is_head(module: str) -> bool:
    """An exit's head (`lm_head`, `lm_head.{j}`, or a plain model's `lm_head`)."""
    return module.split(".")[0] == names.SHARED_HEAD


def role(module: str) -> str:
    """embedding | linear (of a decoder layer) | head | norm | other, of a module in either naming."""
    if module == names.EMBED:
        return "embedding"
    if is_head(module):
        return "head"
    inner = module.split(".", 3)[-1] if module.startswith(("model.layers.", "model.eelayers.")) else ""
    if inner in LAYER_LINEARS:
        return "linear"
    if inner in LAYER_NORMS or module == names.PLAIN_NORM or module.startswith("model.norms."):
        return "norm"
    return "other"


# --- the tied head -------------------------------------------------------------------------
HEAD_WEIGHT = f"{names.SHARED_HEAD}.weight"
EMBED_WEIGHT = f"{names.EMBED}.weight"


def stored_name(tied: bool, name: str) -> str:
    """The tensor a weight is stored under: a shared head tied to the embedding (`tied`: config
    `tie_word_embeddings`) has no tensor of its own and reads the embedding's."""
    return EMBED_WEIGHT if tied and name == HEAD_WEIGHT else name


def tie_head(model) -> None:
    """After loading a state into a model built on the meta device: a tied shared head that got no
    weight of its own (a float head; a quantized one has its grid) is the embedding's very tensor."""
    head = model.lm_head
    weight = getattr(head, "weight", None)
    if model.config.tie_word_embeddings and weight is not None and weight.is_meta:
        head.weight = model.model.embed_tokens.weight


# --- the walk: the layers one pass computes, in order ------------------------------------------
def branch_prefix(exits: list[int], num_layers: int, j: int) -> str:
    """Module prefix of exit j's branch layer: its own eelayer, or (the last exit) trunk layer N-1."""
    if exits[j] == num_layers - 1:
        return names.TRUNK_LAYER.format(i=num_layers - 1)
    return names.BRANCH_LAYER.format(j=j)


def head_prefix(shared_heads: bool, j: int) -> str:
    return names.SHARED_HEAD if shared_heads else names.HEAD.format(j=j)


@dataclass(frozen=True)
class Step:
    """One layer of the family's walk: a trunk layer, or an exit's branch layer."""

    kind: str  # "trunk" | "exit"
    layer: int  # trunk layer i; for an exit, its layer e (it reads layer e's input)
    prefix: str  # module prefix of the layer that runs
    j: int = -1  # exit position (exits only)


def walk(exits: list[int], num_layers: int, want: list[int] | None = None):
    """The layers in the order one pass computes them. At exit e < N-1: the exit's branch layer
    (on the input trunk layer e gets), then trunk layer e. The last exit's branch is trunk layer
    N-1 itself, so that layer appears once, as the exit. `want` (exit layers): only the steps
    those exits need: their branches, and the trunk below the deepest of them."""
    last = max(want) if want is not None else exits[-1]
    for i in range(num_layers):
        if i in exits and (want is None or i in want):
            j = exits.index(i)
            yield Step("exit", i, branch_prefix(exits, num_layers, j), j)
        if i != exits[-1] and i < last:
            yield Step("trunk", i, names.TRUNK_LAYER.format(i=i))


# --- each exit as a plain model ------------------------------------------------------------
EXIT_FOLDER = "exit-{e}"  # an export's folder (or multi-exit graph stem) of exit e


def exit_folder(e: int) -> str:
    return EXIT_FOLDER.format(e=e)


def folder_exit(name: str) -> int | None:
    """The exit e of a name exit_folder(e) made, else None."""
    head, _, tail = EXIT_FOLDER.partition("{e}")
    middle = name.removeprefix(head).removesuffix(tail) if name.startswith(head) else ""
    return int(middle) if middle.isdigit() and name.endswith(tail) else None


@dataclass(frozen=True)
class ExitMap:
    """Exit j as a plain Qwen2 model of e+1 layers: trunk layers 0..e-1, then the branch layer as
    layer e, the exit's norm as the final norm, its head as lm_head."""

    j: int
    layer: int  # e
    branch: str  # module prefixes in the family
    norm: str
    head: str
    modules: dict  # familial module prefix -> plain module prefix

    def rename(self, name: str) -> str | None:
        """A familial tensor name -> its name in this exit's plain model (None: not in it)."""
        return names.rename(name, self.modules)


def exit_map(exits: list[int], num_layers: int, shared_heads: bool, j: int) -> ExitMap:
    e = exits[j]
    branch, norm = branch_prefix(exits, num_layers, j), names.EXIT_NORM.format(j=j)
    head = head_prefix(shared_heads, j)
    modules = {names.EMBED: names.EMBED}
    for i in range(e):
        modules[names.TRUNK_LAYER.format(i=i)] = names.PLAIN_LAYER.format(i=i)
    modules.update({branch: names.PLAIN_LAYER.format(i=e), norm: names.PLAIN_NORM, head: names.PLAIN_HEAD})
    return ExitMap(j, e, branch, norm, head, modules)

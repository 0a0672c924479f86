"""Familial model configuration: Ruyi's `ruyi_qwen2` config.json, or a plain qwen2/llama one.

A plain model is a family of one exit (its last layer) with a shared head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlamaConfig, Qwen2Config

from ..errors import UserError, read_json
from . import layout

FAMILIAL_TYPE = "ruyi_qwen2"
PLAIN_TYPES = ("qwen2", "llama")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Sizes past these are a corrupt config, not a model (Ruyi-7B: hidden 3584, intermediate 18944,
# vocab 151936, 28 layers, 28 heads); the default bound for the rest is 2^20.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
}
# Keys of config.json that we pass through to Qwen2Config unchanged when present.
QWEN2_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class FamilialConfig:
    """Everything the familial forward needs, plus where it came from."""

    raw: dict  # the source config.json, untouched
    source_type: str  # ruyi_qwen2 | qwen2 | llama
    exits: list[int]  # layer index of each exit, ascending, last = N-1
    shared_heads: bool
    tie_word_embeddings: bool  # shared head is the embedding matrix
    default_exit: int = -1
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.raw["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.raw["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def head_dim(self) -> int:
        return int(self.raw.get("head_dim") or self.hidden_size // int(self.raw["num_attention_heads"]))

    @property
    def rope_theta(self) -> float:
        """RoPE base, from `rope_parameters` (transformers 5) or `rope_theta` (older configs)."""
        params = self.raw.get("rope_parameters") or {}
        return float(params.get("rope_theta") or self.raw.get("rope_theta") or 10000.0)

    @property
    def rope_scaled(self) -> bool:
        """True when RoPE is scaled (yarn, linear, ...) rather than plain."""
        params = self.raw.get("rope_parameters") or self.raw.get("rope_scaling") or {}
        return params.get("rope_type", params.get("type", "default")) not in ("default", None)

    @property
    def source_arch(self) -> str:
        """The plain architecture the trunk came from when it was a plain checkpoint (qwen2 or
        llama, kept through our saved families), else ruyi_qwen2."""
        return self.raw.get("source_model_type") or self.source_type

    @property
    def source_dtype(self):
        """The floating dtype the checkpoint was stored in (float32 when it does not say)."""
        import torch

        name = self.raw.get("torch_dtype") or self.raw.get("dtype") or "float32"
        return getattr(torch, str(name).removeprefix("torch."), torch.float32)

    def exit_index(self, exit: int | None) -> int:
        """Position j of an exit given by layer index (or -1 / None for the default exit)."""
        if exit is None or exit == -1:
            exit = self.exits[-1] if self.default_exit == -1 else self.default_exit
        if exit not in self.exits:
            raise UserError(f"exit {exit}: the model has exits at layers {self.exits}; pick one of those")
        return self.exits.index(exit)

    def exit_list(self, exits=None) -> list[int]:
        """The exits a user named (layer indices; None or "all": every exit), each checked."""
        if exits in (None, "all"):
            return list(self.exits)
        for e in exits:
            self.exit_index(e)  # raises a UserError naming the exits it has
        return list(exits)

    def walk(self, exits: list[int] | None = None):
        """Trunk layers and exits in the order one pass computes them, only what `exits` need
        when given (layout.walk)."""
        return layout.walk(self.exits, self.num_layers, exits)

    def exit_map(self, j: int) -> layout.ExitMap:
        """Exit j (a position in `exits`) as a plain model: its layers, branch, norm and head."""
        return layout.exit_map(self.exits, self.num_layers, self.shared_heads, j)

    def qwen2(self, num_layers: int | None = None) -> Qwen2Config:
        """A transformers Qwen2Config for the trunk (or for a plain model of `num_layers`)."""
        kw = {k: self.raw[k] for k in QWEN2_KEYS if k in self.raw and self.raw[k] is not None}
        if "rope_scaling" in kw and "rope_parameters" not in kw:
            kw["rope_parameters"] = dict(kw.pop("rope_scaling"), rope_theta=kw.get("rope_theta", 10000.0))
        kw.pop("rope_scaling", None)
        if "head_dim" in self.raw:
            kw["head_dim"] = self.head_dim
        kw["num_hidden_layers"] = num_layers or self.num_layers
        kw["tie_word_embeddings"] = False
        kw["use_sliding_window"] = False
        cfg = Qwen2Config(**kw)
        cfg._attn_implementation = "sdpa"
        return cfg

    def llama(self, num_layers: int | None = None, attention_bias: bool = False) -> LlamaConfig:
        """The same plain model as a transformers LlamaConfig (attention_bias: q/k/v AND o_proj
        biases, the o_proj ones then zero), for exports whose tokenizer Qwen2's would override."""
        q = self.qwen2(num_layers).to_dict()
        kw = {k: q[k] for k in QWEN2_KEYS + ("head_dim", "tie_word_embeddings") if q.get(k) is not None}
        cfg = LlamaConfig(**kw, attention_bias=attention_bias, mlp_bias=False)
        cfg._attn_implementation = "sdpa"
        return cfg

    def to_json(self) -> dict:
        """The `ruyi_qwen2` config.json that describes this family."""
        # a quantized family's quantization_config describes its tensors, not the model: whoever
        # writes tensors writes their own (save_family)
        out = {
            k: v for k, v in self.raw.items() if k not in ("architectures", "auto_map", "quantization_config")
        }
        out.update(
            model_type=FAMILIAL_TYPE,
            architectures=["RuyiQwen2ForCausalLM"],
            early_exit_points=list(self.exits),
            default_early_exit_point=self.default_exit,
            shared_heads=self.shared_heads,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        out.update(self.extra)
        if self.source_type in PLAIN_TYPES:  # a plain checkpoint as a family of one exit
            out["source_model_type"] = self.source_type
        for k in ("attention_bias", "mlp_bias"):  # llama flags; we always have q/k/v biases now
            out.pop(k, None)
        return out


def parse_config(raw: dict, where: str = "config.json") -> FamilialConfig:
    """Validate a config.json dict; every problem is a one-line UserError naming the key."""
    mtype = raw.get("model_type")
    if mtype is None:
        raise UserError(
            f"{where}: missing required key 'model_type' (expected one of "
            f"{FAMILIAL_TYPE}, {', '.join(PLAIN_TYPES)})"
        )
    if mtype != FAMILIAL_TYPE and mtype not in PLAIN_TYPES:
        raise UserError(
            f"{where}: unsupported model_type '{mtype}' (supported: "
            f"{FAMILIAL_TYPE}, {', '.join(PLAIN_TYPES)})"
        )
    for k in REQUIRED_KEYS:
        if k not in raw:
            raise UserError(f"{where}: missing required key '{k}'")
        if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] <= 0:
            raise UserError(f"{where}: '{k}' must be a positive integer, got {raw[k]!r}")
        if raw[k] > LIMITS.get(k, 1 << 20):
            raise UserError(
                f"{where}: '{k}' is {raw[k]}, implausibly large (at most "
                f"{LIMITS.get(k, 1 << 20)}); the config is corrupt"
            )
    if raw["hidden_size"] % raw["num_attention_heads"] and "head_dim" not in raw:
        raise UserError(
            f"{where}: hidden_size {raw['hidden_size']} is not divisible by "
            f"num_attention_heads {raw['num_attention_heads']} and no head_dim is given"
        )
    if mtype == "llama" and (raw.get("mlp_bias") or raw.get("attention_bias")):
        raise UserError(
            f"{where}: llama with mlp_bias/attention_bias is not supported "
            "(only q/k/v biases fit the Qwen2 layout)"
        )
    n = raw["num_hidden_layers"]
    tie = bool(raw.get("tie_word_embeddings", False))
    if mtype == FAMILIAL_TYPE:
        exits = raw.get("early_exit_points")
        if not isinstance(exits, list) or not exits or not all(isinstance(e, int) for e in exits):
            raise UserError(f"{where}: 'early_exit_points' must be a non-empty list of layer indices")
        if sorted(set(exits)) != exits or exits[0] < 0 or exits[-1] != n - 1:
            raise UserError(
                f"{where}: 'early_exit_points' {exits} must be ascending, unique, within "
                f"0..{n - 1}, and end with num_hidden_layers - 1 = {n - 1}"
            )
        default = raw.get("default_early_exit_point", -1)
        if default != -1 and default not in exits:
            raise UserError(f"{where}: 'default_early_exit_point' {default} is not one of {exits}")
        shared = bool(raw.get("shared_heads", False))
        return FamilialConfig(
            raw=dict(raw),
            source_type=mtype,
            exits=list(exits),
            shared_heads=shared,
            tie_word_embeddings=tie and shared,
            default_exit=default,
        )
    return FamilialConfig(
        raw=dict(raw), source_type=mtype, exits=[n - 1], shared_heads=True, tie_word_embeddings=tie
    )


def read_config(model_dir: Path) -> FamilialConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json here; point at a model directory")
    raw = read_json(path, "config")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return parse_config(raw, str(path))

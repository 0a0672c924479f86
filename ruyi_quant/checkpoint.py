"""A (possibly quantized) family on disk and in memory.

Directory layout:
    config.json          ruyi_qwen2 config with `quantization_config` when quantized
    model.safetensors    Ruyi's tensor names; a quantized linear has qweight/qzeros/scales/g_idx
                         (GPTQ v1 layout) or qweight/qzeros/scales (AWQ gemm layout, for AWQ
                         results; quant/pack.py) instead of weight
    ruyi_quant.json      method, layout, per-module grids, exits, the recipe that made it
    tokenizer files
An unquantized model is the same object with no quantized modules, so every exporter takes one
kind of input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__, names
from .errors import UserError
from .fsutil import MARKER
from .model.config import FamilialConfig, read_config
from .model.familial import FamilialModel
from .model.io import (check_finite, copy_tokenizer, familial_state, load_model, read_tensors,
                       weight_files)
from .quant.pack import LAYOUTS, dequantize, from_awq, from_gptq, to_awq, to_gptq
from .quant.plan import QuantSpec


def pack_layout(layout: str, q, scales, zeros, g_idx, bits: int) -> dict[str, torch.Tensor]:
    """A grid in the tensors of a checkpoint layout (gptq v1 or awq gemm)."""
    try:
        return (to_awq if layout == "awq" else to_gptq)(q, scales, zeros, g_idx, bits)
    except ValueError as e:
        raise UserError(f"{layout} layout: {e}; choose another export format") from None


@dataclass
class QuantizedFamily:
    config: FamilialConfig
    tensors: dict[str, torch.Tensor]               # Ruyi names; quantized linears in GPTQ layout
    modules: dict[str, QuantSpec] = field(default_factory=dict)
    method: str = "none"
    layout: str = "gptq"                           # how quantized linears are stored: gptq | awq
    recipe: dict | None = None
    stats: dict = field(default_factory=dict)     # e.g. seconds per stage

    @classmethod
    def from_model(cls, model: FamilialModel, dtype: torch.dtype | None = None) -> QuantizedFamily:
        state = familial_state(model)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        return cls(config=model.config, tensors=state)

    def set_quantized(self, module: str, spec: QuantSpec, q, scales, zeros, g_idx, bias=None) -> None:
        """Replace a linear's float weight by its grid (q [K, N], scales/zeros [G, N])."""
        self.tensors.pop(f"{module}.weight", None)
        for k, v in pack_layout(self.layout, q, scales, zeros, g_idx, spec.bits).items():
            self.tensors[f"{module}.{k}"] = v
        self.modules[module] = spec

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(N, K) of a linear, quantized or not."""
        if module not in self.modules:
            return tuple(self.tensors[f"{module}.weight"].shape)
        n = self.tensors[f"{module}.scales"].shape[1]
        if self.layout == "awq":
            return n, self.tensors[f"{module}.qweight"].shape[0]
        return n, self.tensors[f"{module}.g_idx"].numel()

    def grid(self, module: str):
        """(q [K, N], scales [G, N], zeros [G, N], g_idx [K]) of a quantized linear."""
        spec = self.modules[module]
        t = {s: self.tensors[f"{module}.{s}"] for s in LAYOUTS[self.layout]}
        if self.layout == "awq":
            return from_awq(t, spec.group_size)
        n, k = self.linear_shape(module)
        return from_gptq(t, spec.bits, k, n)

    def weight(self, module: str) -> torch.Tensor:
        """Float32 weight [N, K] of any linear: dequantized if quantized."""
        if module in self.modules:
            return dequantize(*self.grid(module))
        return self.tensors[f"{module}.weight"].float()

    def dequantized_model(self, dtype: torch.dtype = torch.float32) -> FamilialModel:
        """The float model these tensors stand for (quantized linears dequantized)."""
        with torch.device("meta"):
            model = FamilialModel(self.config)
        state = {}
        for name in model.state_dict():
            mod = names.module_of(name)
            if name.endswith(".weight") and mod in self.modules:
                state[name] = self.weight(mod).to(dtype)
            elif name == names.SHARED_HEAD + ".weight" and self.config.tie_word_embeddings:
                state[name] = self.tensors[names.EMBED + ".weight"].to(dtype)
            else:
                state[name] = self.tensors[name].to(dtype)
        model.load_state_dict(state, strict=True, assign=True)
        if self.config.tie_word_embeddings and names.SHARED_HEAD not in self.modules:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.reset_rotary()
        return model.eval()

    def exit_tensor_names(self, j: int) -> list[str]:
        """The tensors that exit j runs on (the embedding too when a tied head reuses it)."""
        cfg = self.config
        pmap = names.exit_module_map(cfg.exits, cfg.num_layers, cfg.shared_heads, j)
        return [n for n in self.tensors if names.rename(n, pmap) is not None]

    def size(self, tensor_names: list[str] | None = None) -> tuple[int, int]:
        """(parameters, stored bytes) of some tensors (all by default); a quantized linear
        counts its K*N weights as parameters, and its packed tensors as bytes."""
        params = nbytes = 0
        for n in (self.tensors if tensor_names is None else tensor_names):
            t = self.tensors[n]
            nbytes += t.numel() * t.element_size()
            mod, suffix = names.module_of(n), n.rsplit(".", 1)[1]
            if mod not in self.modules or suffix == "bias":
                params += t.numel()
            elif suffix == "scales":
                nk = self.linear_shape(mod)
                params += nk[0] * nk[1]
        return params, nbytes

    def quantization_json(self) -> dict:
        specs = {json.dumps(s.to_json(), sort_keys=True) for s in self.modules.values()}
        common = json.loads(specs.pop()) if len(specs) == 1 else None
        return {"method": self.method, "layout": self.layout, "modules": {m: s.to_json() for m, s in
                                                                      self.modules.items()},
                "common": common}


def save_family(fam: QuantizedFamily, out_dir: Path, tokenizer_dir: Path | None,
                float_dtype: torch.dtype | None = None) -> None:
    """Write into an existing (temporary) directory; float tensors in the source's dtype."""
    out_dir = Path(out_dir)
    float_dtype = float_dtype or fam.config.source_dtype
    state = {k: (v.to(float_dtype) if v.is_floating_point() and not k.endswith(".scales") else v)
             for k, v in fam.tensors.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    cfg = fam.config.to_json()
    cfg["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    if fam.modules:
        cfg["quantization_config"] = {"quant_method": "ruyi_quant", **fam.quantization_json()}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {"ruyi_quant_version": __version__, "kind": "family", "exits": fam.config.exits,
            "quantization": fam.quantization_json(), "recipe": fam.recipe, "stats": fam.stats}
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)


def load_family(path: Path) -> QuantizedFamily:
    """Load a directory written by save_family, or any source checkpoint load_model reads."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    meta_path = path / MARKER
    if not meta_path.is_file():   # a source checkpoint: Ruyi's own, or a plain qwen2/llama one
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "source":   # a float checkpoint we built (ruyi-mini, make-familial)
        return QuantizedFamily.from_model(load_model(path, dtype=None))
    if meta.get("kind") != "family":
        raise UserError(f"{path}: a ruyi-quant '{meta.get('kind')}' directory, not a family "
                        "checkpoint; point at the quantized family (the job's 'family' folder)")
    q = meta.get("quantization") or {}
    modules = {m: QuantSpec(**s) for m, s in q.get("modules", {}).items()}
    method, recipe, stats = q.get("method", "none"), meta.get("recipe"), meta.get("stats", {})
    layout = q.get("layout", "gptq")
    files = weight_files(path)
    tensors = {}
    for name, t in read_tensors(files):
        check_finite(name, t)
        tensors[name] = t
    for m in modules:
        for s in LAYOUTS[layout]:
            if f"{m}.{s}" not in tensors:
                raise UserError(f"{path}: quantized module {m} lacks tensor {m}.{s}")
    return QuantizedFamily(config=read_config(path), tensors=tensors, modules=modules, method=method,
                           layout=layout, recipe=recipe, stats=stats)

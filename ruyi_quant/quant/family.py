"""A (possibly quantized) family in memory: float tensors by Ruyi's names, and a Grid for each
quantized linear. What quantizers produce and every exporter reads; store/checkpoint.py writes and
reads it. An unquantized model is the same object with no grids.

Weight names (`weight_names`) list each quantized linear once, as `MODULE.weight`, after the
float tensors, in the order the linears were quantized: the order GGUF files list them in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .. import names
from ..model import layout
from ..model.config import FamilialConfig
from ..model.familial import FamilialModel, familial_state, materialise, skeleton
from .grid import Grid
from .plan import QuantSpec


@dataclass
class QuantizedFamily:
    config: FamilialConfig
    tensors: dict[str, torch.Tensor]  # float tensors (Ruyi names); biases included
    grids: dict[str, Grid] = field(default_factory=dict)  # module -> grid, in quantization order
    method: str = "none"
    layout: str = "gptq"  # how a checkpoint stores the grids: gptq | awq | ggml
    gguf: str | None = None  # ggml layout: the llama.cpp file type its blocks follow (q4_k_m, ...)
    provenance: object = None  # recipe.Provenance: what made it
    stats: dict = field(default_factory=dict)  # e.g. seconds per stage
    files: object = None  # store.files.ListedFiles of the directory it was read from
    directory: object = None  # the directory it was read from (a Path), if any

    def verify(self) -> None:
        """The files it was read from are the ones their manifest lists (a UserError if not)."""
        if self.files is not None:
            self.files.verify()

    @classmethod
    def from_model(cls, model: FamilialModel) -> QuantizedFamily:
        return cls(config=model.config, tensors=familial_state(model))

    @property
    def modules(self) -> dict[str, QuantSpec]:
        """Quantized module -> its spec."""
        return {m: g.spec for m, g in self.grids.items()}

    def set_quantized(self, module: str, grid: Grid) -> None:
        """Replace a linear's float weight by its grid (a LazyGrid too)."""
        if hasattr(self.tensors, "discard"):
            self.tensors.discard(f"{module}.weight")  # lazy tensors: without reading it
        else:
            self.tensors.pop(f"{module}.weight", None)
        self.grids[module] = grid

    def stored_name(self, name: str) -> str:
        """The float tensor a weight is read from: a head tied to the embedding has no tensor of
        its own and reads the embedding's."""
        if name in self.tensors:
            return name
        return layout.stored_name(self.config.tie_word_embeddings, name)

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a float tensor, without reading a lazy one."""
        if hasattr(self.tensors, "info"):
            return self.tensors.info(name)
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(N, K) of a linear, quantized or not."""
        if module in self.grids:
            return self.grids[module].shape
        return self.tensor_info(self.stored_name(f"{module}.weight"))[0]

    def grid(self, module: str):
        """(q [K, N], scales [G, N], zeros [G, N], g_idx [K]) of a quantized linear."""
        return self.grids[module].ints()

    def weight(self, module: str) -> torch.Tensor:
        """Float32 weight [N, K] of any linear: dequantized if quantized."""
        if module in self.grids:
            return self.grids[module].dequantize()
        return self.tensors[f"{module}.weight"].float()

    def dequantized_model(self, dtype: torch.dtype = torch.float32) -> FamilialModel:
        """The float model these tensors stand for (quantized linears dequantized)."""
        model = skeleton(self.config)
        state = {}
        for name in model.state_dict():
            mod = names.module_of(name)
            if name.endswith(".weight") and mod in self.grids:
                state[name] = self.weight(mod).to(dtype)
            elif self.stored_name(name) == name:  # a tied head reads the embedding's
                state[name] = self.tensors[name].to(dtype)
        return materialise(model, state)

    def stock_arch(self) -> str:
        """The stock architecture every export of an exit declares: `llama` for a Llama source
        whose q/k/v biases are all zero (as loading made them), else `qwen2` (Qwen2 sources, Ruyi
        families, branches trained from a Llama source: they have biases)."""
        if self.config.source_arch != "llama":
            return "qwen2"
        biases = [n for n in self.tensors if layout.is_layer_bias(n)]
        return "llama" if all(not self.tensors[n].any() for n in biases) else "qwen2"

    def weight_names(self) -> list[str]:
        """Float tensor names, then `MODULE.weight` of each quantized linear."""
        return list(self.tensors) + [f"{m}.weight" for m in self.grids]

    def exit_tensor_names(self, j: int) -> list[str]:
        """The weight names exit j runs on (the embedding too when a tied head reuses it)."""
        exit_map = self.config.exit_map(j)
        return [n for n in self.weight_names() if exit_map.rename(n) is not None]

    def size(
        self, weight_names: list[str] | None = None, float_dtype: torch.dtype | None = None
    ) -> tuple[int, int]:
        """(parameters, bytes) of some weights (all by default); a quantized linear counts its
        K*N weights as parameters, and its packed tensors as bytes; a float tensor its numel, and
        bytes at float_dtype (its own dtype when None). `stored_size` is what a checkpoint holds."""
        params = nbytes = 0
        for n in self.weight_names() if weight_names is None else weight_names:
            mod = names.module_of(n)
            if n.endswith(".weight") and mod in self.grids:
                nk = self.grids[mod].shape
                params += nk[0] * nk[1]
                nbytes += self.grids[mod].nbytes(self.layout)
            else:
                shape, dtype = self.tensor_info(n)
                numel = 1
                for d in shape:
                    numel *= d
                params += numel
                floats_at = float_dtype if float_dtype is not None and dtype.is_floating_point else dtype
                nbytes += numel * floats_at.itemsize
        return params, nbytes

    def stored_size(self, weight_names: list[str] | None = None) -> tuple[int, int]:
        """(parameters, bytes) as save_family stores them and an exit runs on them: floats in
        the checkpoint's dtype (config.source_dtype), quantized linears packed."""
        return self.size(weight_names, self.config.source_dtype)

    def quantization_json(self) -> dict:
        specs = {json.dumps(s.to_json(), sort_keys=True) for s in self.modules.values()}
        common = json.loads(specs.pop()) if len(specs) == 1 else None
        out = {
            "method": self.method,
            "layout": self.layout,
            "modules": {m: s.to_json() for m, s in self.modules.items()},
            "common": common,
        }
        if self.gguf:
            out["gguf"] = self.gguf
        return out

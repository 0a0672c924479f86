"""Per-exit Hugging Face checkpoints: a plain `Qwen2ForCausalLM` of e+1 layers per exit.

Weights are either floating point (bf16 by default; quantized linears dequantized) or the GPTQ
v1 layout with a `quantization_config` that transformers (through GPTQModel) and vLLM read.
The contract is exporters/hf.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__, names
from ..checkpoint import QuantizedFamily
from ..fsutil import MARKER
from ..model.io import copy_tokenizer
from ..quant.plan import QuantSpec

WEIGHTS = ("auto", "float", "gptq")


def exit_tensors(fam: QuantizedFamily, j: int, quantized: bool,
                 float_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, QuantSpec]]:
    """Plain-Qwen2 tensors of exit j and the grids of its quantized linears (plain names)."""
    cfg = fam.config
    pmap = names.exit_module_map(cfg.exits, cfg.num_layers, cfg.shared_heads, j)
    out, specs = {}, {}
    for name, t in fam.tensors.items():
        new = names.rename(name, pmap)
        if new is None:
            continue
        mod = names.module_of(name)
        if mod in fam.modules and not quantized:
            if name.endswith(".qweight"):
                out[names.module_of(new) + ".weight"] = fam.weight(mod).to(float_dtype)
            continue
        if mod in fam.modules:
            specs[names.module_of(new)] = fam.modules[mod]
            out[new] = t
        else:
            out[new] = t.to(float_dtype) if t.is_floating_point() else t
    return out, specs


def gptq_config(specs: dict[str, QuantSpec], all_linears: list[str], desc_act: bool = False) -> dict:
    """quantization_config for GPTQModel/transformers/vLLM; mixed grids go in `dynamic`."""
    common, _ = Counter(specs.values()).most_common(1)[0]
    dynamic = {}
    for m in all_linears:
        s = specs.get(m)
        if s is None:
            dynamic[f"-:^{m.replace('.', '[.]')}$"] = {}
        elif s != common:
            dynamic[f"+:^{m.replace('.', '[.]')}$"] = s.to_json()
    cfg = {"quant_method": "gptq", "bits": common.bits, "group_size": common.group_size,
           "desc_act": desc_act, "sym": common.sym, "checkpoint_format": "gptq", "pack_dtype": "int32",
           "static_groups": False, "true_sequential": True, "lm_head": names.PLAIN_HEAD in specs,
           "meta": {"quantizer": [f"ruyi-quant:{__version__}"]}}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def export_exit(fam: QuantizedFamily, exit: int, out_dir: Path, tokenizer_dir: Path | None,
                weights: str = "auto", float_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write exit `exit` (a layer index) into the existing directory out_dir; return its metadata."""
    cfg = fam.config
    j = cfg.exit_index(exit)
    e = cfg.exits[j]
    quantized = bool(fam.modules) if weights == "auto" else weights == "gptq"
    if quantized and not fam.modules:
        from ..errors import UserError
        raise UserError("weights: gptq needs a quantized family; add a quantize section or use "
                        "weights: float")
    tensors, specs = exit_tensors(fam, j, quantized, float_dtype)
    tie = cfg.tie_word_embeddings and names.PLAIN_HEAD + ".weight" not in tensors \
        and names.PLAIN_HEAD not in specs
    out_dir = Path(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    hf = cfg.qwen2(num_layers=e + 1)
    hf.architectures = ["Qwen2ForCausalLM"]
    hf.tie_word_embeddings = tie
    hf.dtype = float_dtype
    if quantized:
        linears = [f"{names.PLAIN_LAYER.format(i=i)}.{lin}" for i in range(e + 1)
                   for lin in names.LAYER_LINEARS]
        # act-order shows in g_idx: groups no longer ascend with the column index
        desc_act = any(bool((tensors[f"{m}.g_idx"].diff() < 0).any()) for m in specs)
        qcfg = gptq_config(specs, linears + ([names.PLAIN_HEAD] if names.PLAIN_HEAD in specs else []),
                           desc_act)
        hf.quantization_config = qcfg
        (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    hf.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    meta = {"ruyi_quant_version": __version__, "kind": "hf-exit", "exit": e, "exit_index": j,
            "exits": cfg.exits, "weights": "gptq" if quantized else str(float_dtype),
            "method": fam.method, "num_hidden_layers": e + 1}
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return meta

"""Quantized family on disk, and per-exit GPTQ checkpoints read back independently."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from ruyi_quant.checkpoint import load_family, save_family
from ruyi_quant.exporters.hf import export_exit
from ruyi_quant.model.io import load_model
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.recipe import Override
from ruyi_quant.quant.rtn import rtn_family


def gptq4_dequant(t: dict, prefix: str) -> torch.Tensor:
    """Independent reading of a 4-bit GPTQ v1 linear: 8 nibbles per int32, zero stored -1."""
    qw = t[f"{prefix}.qweight"].numpy().view(np.uint32)             # [K/8, N]
    qz = t[f"{prefix}.qzeros"].numpy().view(np.uint32)              # [G, N/8]
    scales = t[f"{prefix}.scales"].float().numpy()                  # [G, N]
    g_idx = t[f"{prefix}.g_idx"].numpy()
    q = np.stack([(qw >> (4 * j)) & 15 for j in range(8)], 1).reshape(-1, qw.shape[1])
    z = np.stack([(qz >> (4 * j)) & 15 for j in range(8)], 2).reshape(qz.shape[0], -1) + 1
    w = scales[g_idx] * (q.astype(np.float32) - z[g_idx].astype(np.float32))
    return torch.from_numpy(w.T.copy())


def test_family_roundtrip(tiny_dir, tmp_path, eval_ids):
    model = load_model(tiny_dir)
    fam = rtn_family(model, make_plan(model, QuantSpec(4, 64, False), heads=True), progress=False)
    save_family(fam, tmp_path, tiny_dir)
    back = load_family(tmp_path)
    assert back.modules == fam.modules and back.method == "rtn"
    a, b = fam.dequantized_model(), back.dequantized_model()
    with torch.no_grad():
        assert torch.equal(a(eval_ids[:1, :32], exit=3).logits, b(eval_ids[:1, :32], exit=3).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ruyi_qwen2" and cfg["early_exit_points"] == [2, 3, 5]
    assert (tmp_path / "tokenizer.json").is_file()


def test_gptq_export_reads_back_independently(tiny_dir, tmp_path, eval_ids):
    """Each exit's GPTQ checkpoint, dequantized by an independent reader into a stock
    Qwen2ForCausalLM, gives the logits of our dequantized family at that exit."""
    model = load_model(tiny_dir)
    fam = rtn_family(model, make_plan(model, QuantSpec(4, 32, True), heads=True), progress=False)
    qmodel = fam.dequantized_model()
    for e in fam.config.exits:
        out = tmp_path / f"exit-{e}"
        out.mkdir()
        export_exit(fam, e, out, tiny_dir, weights="gptq", float_dtype=torch.float32)
        cfg = json.loads((out / "config.json").read_text())
        qc = cfg.pop("quantization_config")
        assert qc == json.loads((out / "quantize_config.json").read_text())
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"],
                qc["checkpoint_format"], qc["lm_head"]) == ("gptq", 4, 32, True, False, "gptq", True)
        assert "dynamic" not in qc
        t = load_file(out / "model.safetensors")
        assert "model.layers.0.self_attn.q_proj.weight" not in t
        assert t[f"model.layers.{e}.mlp.down_proj.qweight"].shape == (320 // 8, 128)
        state = {k: v for k, v in t.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
        for k in t:
            if k.endswith(".qweight"):
                prefix = k.removesuffix(".qweight")
                state[prefix + ".weight"] = gptq4_dequant(t, prefix)
        hf = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items()
                                           if k not in ("architectures",)})).eval()
        hf.load_state_dict(state, strict=True)
        with torch.no_grad():
            ours = qmodel(eval_ids[:2, :48], exit=e).logits
            theirs = hf(eval_ids[:2, :48]).logits
        assert (ours - theirs).abs().max() < 1e-4


def test_mixed_grids_go_in_dynamic(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    plan = make_plan(model, QuantSpec(4, 32, True), overrides=[
        Override(pattern="lm_head.*", bits=8), Override(pattern="model.layers.0.mlp.*", skip=True)])
    fam = rtn_family(model, plan, progress=False)
    export_exit(fam, 2, tmp_path, tiny_dir)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["lm_head"] is True
    assert qc["dynamic"]["+:^lm_head$"]["bits"] == 8
    assert qc["dynamic"]["-:^model[.]layers[.]0[.]mlp[.]gate_proj$"] == {}
    t = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.gate_proj.weight" in t and t["lm_head.qweight"].shape == (128 // 4, 512)


def test_linear_shapes_of_float_and_quantized_linears(tiny_dir):
    from ruyi_quant.quant.rtn import rtn_family
    model = load_model(tiny_dir)
    plan = {"model.layers.0.mlp.down_proj": QuantSpec(4, 32, True)}
    fam = rtn_family(model, plan, progress=False)
    for m in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "lm_head.1"):
        assert fam.linear_shape(m) == tuple(model.get_submodule(m).weight.shape), m

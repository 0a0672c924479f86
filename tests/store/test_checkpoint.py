"""Quantized family on disk, and per-exit GPTQ checkpoints read back independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from ruyi_quant.exporters.hf import export_exit
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.quant.rtn import rtn_family
from ruyi_quant.recipe import Override
from ruyi_quant.store.checkpoint import load_family, load_model, save_family


def gptq4_dequant(t: dict, prefix: str) -> torch.Tensor:
    """Independent reading of a 4-bit GPTQ v1 linear: 8 nibbles per int32, zero stored -1."""
    qw = t[f"{prefix}.qweight"].numpy().view(np.uint32)  # [K/8, N]
    qz = t[f"{prefix}.qzeros"].numpy().view(np.uint32)  # [G, N/8]
    scales = t[f"{prefix}.scales"].float().numpy()  # [G, N]
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
        assert (
            qc["quant_method"],
            qc["bits"],
            qc["group_size"],
            qc["sym"],
            qc["desc_act"],
            qc["checkpoint_format"],
            qc["lm_head"],
        ) == ("gptq", 4, 32, True, False, "gptq", True)
        assert "dynamic" not in qc
        t = load_file(out / "model.safetensors")
        assert "model.layers.0.self_attn.q_proj.weight" not in t
        assert t[f"model.layers.{e}.mlp.down_proj.qweight"].shape == (320 // 8, 128)
        state = {k: v for k, v in t.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
        for k in t:
            if k.endswith(".qweight"):
                prefix = k.removesuffix(".qweight")
                state[prefix + ".weight"] = gptq4_dequant(t, prefix)
        hf = Qwen2ForCausalLM(
            Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
        ).eval()
        hf.load_state_dict(state, strict=True)
        with torch.no_grad():
            ours = qmodel(eval_ids[:2, :48], exit=e).logits
            theirs = hf(eval_ids[:2, :48]).logits
        assert (ours - theirs).abs().max() < 1e-4


def test_mixed_grids_go_in_dynamic(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    plan = make_plan(
        model,
        QuantSpec(4, 32, True),
        overrides=[
            Override(pattern="lm_head.*", bits=8),
            Override(pattern="model.layers.0.mlp.*", skip=True),
        ],
    )
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


def tied_model(seed: int = 3):
    """A tiny family with one head tied to the embedding (as SmolLM2 and ruyi-mini have)."""
    from ruyi_quant.sources.tiny import random_model, tiny_config

    raw = {**tiny_config(shared_heads=True), "tie_word_embeddings": True}
    model = random_model(raw, seed=seed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("heads", [False, True])
def test_a_tied_family_dequantizes_with_its_head_where_it_belongs(heads, eval_ids):
    """Float head: the dequantized model's head IS its embedding (one tensor, as in the source).
    Quantized head: the head is the grid's weight and the embedding stays the float one."""
    model = tied_model()
    emb = model.model.embed_tokens.weight.detach().clone()
    plan = make_plan(model, QuantSpec(4, 32, True), heads=heads)
    assert ("lm_head" in plan) == heads
    fam = rtn_family(model, plan, progress=False)
    deq = fam.dequantized_model()
    assert torch.equal(deq.model.embed_tokens.weight, emb)
    if heads:
        assert deq.lm_head.weight is not deq.model.embed_tokens.weight
        assert torch.equal(deq.lm_head.weight, fam.weight("lm_head"))
        assert not torch.equal(deq.lm_head.weight, emb)
    else:
        assert deq.lm_head.weight is deq.model.embed_tokens.weight
    # every planned linear carries its grid, everything else the source's tensor
    for name, p in deq.named_parameters():
        mod = name.rsplit(".", 1)[0]
        want = (
            fam.weight(mod)
            if (name.endswith(".weight") and mod in plan)
            else model.get_parameter(name).detach()
        )
        assert torch.equal(p, want), name
    with torch.no_grad():
        out = deq.forward_exits(eval_ids[:1, :32])
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_family_size_is_parameters_and_stored_bytes(tiny_dir, layout):
    """size() counts K*N parameters per quantized linear and the bytes its packed tensors take,
    and numel / numel*element_size for float tensors: checked against the packed tensors and the
    model's own parameters, for the whole family and for one exit's weights."""
    from ruyi_quant.store.checkpoint import pack_grid

    model = load_model(tiny_dir)
    plan = make_plan(model, QuantSpec(4, 32, False), heads=True)
    plan.pop("lm_head.2")  # one head stays float
    fam = rtn_family(model, plan, progress=False)
    fam.layout = layout
    fam.tensors["model.norms.1.weight"] = fam.tensors["model.norms.1.weight"].half()  # a 2-byte tensor

    def by_hand(weights):
        params = nbytes = 0
        for n in weights:
            mod = n.rsplit(".", 1)[0]
            if n.endswith(".weight") and mod in plan:
                params += model.get_submodule(mod).weight.numel()
                nbytes += sum(
                    t.numel() * t.element_size() for t in pack_grid(layout, fam.grids[mod]).values()
                )
            else:
                t = fam.tensors[n]
                params += t.numel()
                nbytes += t.numel() * (2 if n == "model.norms.1.weight" else 4)
        return params, nbytes

    total = fam.size()
    assert total[0] == sum(p.numel() for p in model.parameters())
    assert total == by_hand(fam.weight_names())
    assert total[1] < 4 * total[0]  # int4 linears
    exit0 = fam.exit_tensor_names(0)
    assert fam.size(exit0) == by_hand(exit0) and fam.size(exit0)[1] < total[1]


def test_stored_size_is_the_bytes_of_the_saved_tensors(tiny_dir, tmp_path):
    """stored_size counts floats in the checkpoint's dtype (bf16 here, fp32 in memory) and grids
    packed: the family file's size less its 8-byte length and JSON header, for the whole family;
    and an exit's share is that of its own tensors."""
    import os

    model = load_model(tiny_dir)
    fam = rtn_family(model, make_plan(model, QuantSpec(4, 32, True)), progress=False)
    fam.config.raw["torch_dtype"] = "bfloat16"
    save_family(fam, tmp_path, None)
    st = tmp_path / "model.safetensors"
    header = int.from_bytes(st.read_bytes()[:8], "little")
    assert fam.stored_size()[1] == os.path.getsize(st) - 8 - header
    assert fam.stored_size()[0] == fam.size()[0] and fam.stored_size()[1] < fam.size()[1]
    back = load_family(tmp_path)  # floats as the file holds them: bf16
    for j in range(len(fam.config.exits)):
        names_j = fam.exit_tensor_names(j)
        assert fam.stored_size(names_j) == back.size(names_j) == back.stored_size(names_j)


def test_a_tied_family_with_its_head_quantized_opens_again(tied_dir, tmp_path):
    """Found exporting ruyi-mini quantized with --heads: a family whose head, tied to the
    embedding, has a grid could be written but not opened again (ValueError in load_family)."""
    from ruyi_quant.pipeline import quantize
    from ruyi_quant.recipe import Quantize

    fam = quantize(
        load_family(tied_dir), Quantize(method="rtn", bits=4, group_size=32, heads=True), progress=False
    )
    (tmp_path / "f").mkdir()
    save_family(fam, tmp_path / "f", tied_dir)
    back = load_family(tmp_path / "f")
    assert "lm_head" in back.grids and "lm_head.weight" not in back.tensors
    assert torch.equal(back.weight("lm_head"), fam.weight("lm_head"))
    assert torch.equal(back.tensors["model.embed_tokens.weight"], fam.tensors["model.embed_tokens.weight"])

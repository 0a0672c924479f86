"""GPTQ: pure functions on synthetic activations, and branch-aware calibration of the family."""

from __future__ import annotations

import pytest
import torch

from conftest import kl_top1
from ruyi_quant.errors import UserError
from ruyi_quant.model.io import load_model
from ruyi_quant.quant.calibrate import calibrate
from ruyi_quant.quant.gptq import GPTQ, Hessian, accumulate_hessian, gptq_quantize
from ruyi_quant.quant.pack import dequantize, from_gptq, to_gptq
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.quant.rtn import rtn_family, rtn_quantize


def synthetic(k=192, n=64, m=1024, seed=0):
    """Correlated inputs with uneven channel scales, as real activations have. X [m, K]"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5)
    x = x * torch.linspace(0.2, 3.0, k)
    return x, torch.randn(n, k, generator=g) * 0.05


def hessian_of(x, chunks=3):
    hs = Hessian.zeros(x.shape[1])
    for c in x.chunk(chunks):
        accumulate_hessian(hs, c)
    return hs


def test_hessian_running_average():
    x, _ = synthetic()
    hs = hessian_of(x, chunks=7)
    assert hs.n == x.shape[0]
    assert torch.allclose(hs.h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 128, False),
                                  QuantSpec(3, 64, True), QuantSpec(2, 32, False),
                                  QuantSpec(8, -1, True)])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_output_error_below_rtn(spec, act_order, static):
    x, w = synthetic()
    q, s, z, g, _ = gptq_quantize(w, hessian_of(x), spec, act_order=act_order, static_groups=static,
                                  block=64)
    ours = dequantize(q, s, z, g)
    rtn = dequantize(*rtn_quantize(w, spec))
    e_gptq = ((w - ours) @ x.t()).norm()
    e_rtn = ((w - rtn) @ x.t()).norm()
    assert e_gptq < e_rtn, (e_gptq, e_rtn)
    # the stored format gives back exactly the weights GPTQ simulated
    q2, s2, z2, g2 = from_gptq(to_gptq(q, s, z, g, spec.bits), spec.bits, w.shape[1], w.shape[0])
    assert torch.equal(dequantize(q2, s2, z2, g2), ours)
    if act_order and not static and spec.group_size != -1:
        assert (g.diff() < 0).any()                      # groups follow the permutation
    if not act_order or static:
        gs = w.shape[1] if spec.group_size == -1 else spec.group_size
        assert torch.equal(g.long(), torch.arange(w.shape[1]) // gs)


def test_gptq_dead_columns_and_damping():
    x, w = synthetic(m=64)                          # 64 rows < 192 columns: singular Hessian
    x[:, 5] = 0                                     # a dead input column
    q, s, z, g, damp = gptq_quantize(w, hessian_of(x), QuantSpec(4, 32, True))
    assert torch.isfinite(dequantize(q, s, z, g)).all()


def test_gptq_not_positive_definite_names_layer():
    hs = Hessian(h=-torch.eye(8) - 1, n=10)         # negative definite: no damping rescues it
    with pytest.raises(UserError, match="model.layers.3.mlp.up_proj: Hessian not positive definite"):
        gptq_quantize(torch.randn(4, 8), hs, QuantSpec(4, -1, True), what="model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("heads", [False, True])
def test_gptq_beats_rtn_at_every_exit(tiny_dir, eval_ids, heads):
    from ruyi_quant.data import load_text, random_windows, tokenize
    from ruyi_quant.pipeline import load_tokenizer
    calib = random_windows(tokenize(load_tokenizer(tiny_dir), load_text("builtin:pydoc/calib")),
                           16, 128, 0, "calib")
    model = load_model(tiny_dir)
    spec = QuantSpec(4, 32, True)
    plan = make_plan(model, spec, heads=heads)
    with torch.no_grad():
        ref = model.forward_exits(eval_ids)
        rtn = rtn_family(model, plan, progress=False).dequantized_model().forward_exits(eval_ids)
        fam = calibrate(model, plan, calib, GPTQ(), progress=False)
        gptq = fam.dequantized_model().forward_exits(eval_ids)
        live = model.forward_exits(eval_ids)           # the model now computes with its grids
    assert set(fam.modules) == set(plan)
    for e in ref:
        kl_rtn, kl_gptq = kl_top1(ref[e], rtn[e])[0], kl_top1(ref[e], gptq[e])[0]
        print(f"exit {e} heads={heads}: KL rtn {kl_rtn:.3e} gptq {kl_gptq:.3e}")
        assert kl_gptq < kl_rtn
        assert torch.equal(live[e], gptq[e])


def test_branch_sees_quantized_trunk(tiny_dir, eval_ids):
    """The branch at exit 2 is calibrated on the quantized trunk's activations: quantizing
    only that branch gives a different grid when the trunk before it is quantized too."""
    model_a, model_b = load_model(tiny_dir), load_model(tiny_dir)
    calib = eval_ids[:, :64]
    spec = QuantSpec(4, 32, True)
    only_branch = {"model.eelayers.0.mlp.down_proj": spec}
    with_trunk = dict(make_plan(model_b, spec), **only_branch)
    fa = calibrate(model_a, only_branch, calib, GPTQ(), progress=False)
    fb = calibrate(model_b, with_trunk, calib, GPTQ(), progress=False)
    qa = fa.tensors["model.eelayers.0.mlp.down_proj.qweight"]
    qb = fb.tensors["model.eelayers.0.mlp.down_proj.qweight"]
    assert not torch.equal(qa, qb)


def test_offloaded_activations_give_the_same_family(tiny_dir, eval_ids):
    """Activations kept in CPU memory between uses (what a GPU too small for them gets) change
    nothing: the same grids, bit for bit."""
    plan_spec = QuantSpec(4, 32, True)
    fams = []
    for offload in (False, True):
        model = load_model(tiny_dir)
        fams.append(calibrate(model, make_plan(model, plan_spec, heads=True), eval_ids[:, :64], GPTQ(),
                              batch=2, progress=False, offload=offload))
    assert fams[0].tensors.keys() == fams[1].tensors.keys()
    for k, v in fams[0].tensors.items():
        assert torch.equal(v, fams[1].tensors[k]), k

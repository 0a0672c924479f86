"""Branch-aware calibration against an oracle written here.

What each quantized linear must be calibrated on is fixed by the mission: the inputs it gets
in the *finished* quantized family, i.e. the dequantized trunk up to its exit, then the
branch's own earlier (already quantized) linears. Those are captured here from the finished
family's public per-exit forward (`model(ids, exit=e)`), which shares no code with the
calibration walk, and compared with the statistics each method actually accumulated:
GPTQ's Hessian 2/n X^T X and the activation rows AWQ rounds and clips against. The trunk
layer after an exit, every branch layer and every head (a shared head gathers every exit,
in exit order) are covered.

A calibration that feeds a branch the float trunk's activations, or trunk layer e's output
instead of its input, or a head the un-normed branch output, fails here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, recording
from torch import nn

from ruyi_quant.model import layout
from ruyi_quant.quant.awq import AWQ
from ruyi_quant.quant.calibrate import calibrate
from ruyi_quant.quant.gptq import GPTQ, gptq_quantize
from ruyi_quant.quant.pack import dequantize
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.store.checkpoint import load_model

RecordingGPTQ, RecordingAWQ = recording(GPTQ), recording(AWQ)


def oracle_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear's inputs [rows, K] in `model`, by the definition of a familial exit.

    Exit e's forward runs trunk layers 0..e-1, its branch, its norm and its head; the trunk
    linears are read from the deepest exit's forward (which runs every trunk layer once, the
    last one as its branch), each branch and head from its own exit's forward. A shared head's
    rows are the exits' rows in exit order."""
    cfg = model.config
    per_exit: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(
            lambda m, inp, name=name: current.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1]))
        )
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    ]
    try:
        with torch.no_grad():
            for e in cfg.exits:
                current = {}
                model(ids, exit=e)
                per_exit.append(current)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, torch.Tensor] = {}
    last = len(cfg.exits) - 1
    for name, x in per_exit[last].items():
        if name.startswith("model.layers."):
            out[name] = x
    for j in range(len(cfg.exits)):
        branch = layout.branch_prefix(cfg.exits, cfg.num_layers, j)
        for name, x in per_exit[j].items():
            if name.startswith(branch + "."):
                assert name not in out or torch.equal(out[name], x)
                out[name] = x
    for j in range(len(cfg.exits)):
        head = layout.head_prefix(cfg.shared_heads, j)
        x = per_exit[j][head]
        out[head] = torch.cat([out[head], x]) if head in out else x
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=["tiny_dir", "tiny_shared_dir"])
def gptq_run(request):
    """GPTQ 4-bit g32 over trunk, branches and heads, recorded; its dequantized family."""
    model_dir = request.getfixturevalue(request.param)
    model = load_model(model_dir)
    float_weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    plan = make_plan(model, QuantSpec(4, 32, True), heads=True)
    ids = calib_ids(model_dir, 8, 64)
    method = RecordingGPTQ()
    fam = calibrate(model, plan, ids, method, batch=3, progress=False)
    return plan, ids, method, fam.dequantized_model(), float_weights, fam


def test_gptq_hessians_are_the_quantized_familys_inputs(gptq_run):
    """Each linear's Hessian is 2/n X^T X of its inputs in the finished quantized family.
    Measured: largest relative difference 4.7e-7 (float summation order, batches of 3).
    scripts/hand_mutations.py M1/M2 (a branch fed the float trunk, or trunk layer e's output)
    fail here."""
    plan, ids, method, deq, _, _ = gptq_run
    oracle = oracle_inputs(deq, ids)
    assert set(method.seen) == set(plan)
    for name in plan:
        x = oracle[name].double()
        h = 2 * x.t() @ x / x.shape[0]
        assert rel_diff(method.seen[name], h) < 5e-6, name


def test_gptq_grids_are_gptq_on_the_oracle_inputs(gptq_run):
    """gptq_quantize run directly on the oracle's Hessian and the float weight gives the stored
    grid. Measured: 26 of 36 linears (both tiny families) equal weight for weight; in the
    others at most 0.53% of the weights differ (a rounding tie flipped by float summation
    order, then carried along by GPTQ's error feedback) and output errors agree within 0.15%."""
    from ruyi_quant.quant.gptq import Hessian

    plan, ids, method, deq, float_weights, fam = gptq_run
    oracle = oracle_inputs(deq, ids)
    for name in [n for n in plan if n.endswith(("down_proj", "o_proj")) or "head" in n]:
        x = oracle[name].float()
        w = float_weights[name]
        hs = Hessian(h=2 * x.t() @ x / x.shape[0], n=x.shape[0])
        direct = dequantize(*gptq_quantize(w, hs, plan[name], what=name)[:4])
        stored = fam.weight(name)
        assert (direct != stored).float().mean() <= 0.02, name
        e_direct, e_stored = ((w - direct) @ x.t()).norm(), ((w - stored) @ x.t()).norm()
        assert abs(e_stored / e_direct - 1) < 0.01, (name, e_stored, e_direct)


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_awq_rounds_against_the_quantized_familys_inputs(which, request):
    """Each linear is clipped and rounded against its inputs in the finished family (folded
    norms and scaled columns included). Measured: largest relative difference 1.1e-7."""
    model_dir = request.getfixturevalue(which)
    model = load_model(model_dir)
    plan = make_plan(model, QuantSpec(4, 32, False), heads=True)
    ids = calib_ids(model_dir, 8, 64)
    method = RecordingAWQ(max_tokens=10**9)  # no row sampling: rows compare one to one
    fam = calibrate(model, plan, ids, method, batch=3, progress=False, layout="gptq")
    oracle = oracle_inputs(fam.dequantized_model(), ids)
    assert set(method.seen) == set(plan)
    for name in plan:
        assert method.seen[name].shape == oracle[name].shape, name
        assert rel_diff(method.seen[name], oracle[name]) < 2e-6, name


@pytest.fixture(scope="module", params=["tiny_dir", "wide"])
def block_run(request, tmp_path_factory):
    """GPTQ into llama.cpp's q4_k_m blocks, recorded: the tiny family (rows of 128: the 32-blocks
    llama.cpp falls back to) and a wider one (rows of 256 and 512: Q4_K and Q6_K)."""
    pytest.importorskip("llama_cpp", reason="ggml's quantizer is llama-cpp-python's")
    from ruyi_quant.quant.kgptq import BlockGPTQ
    from ruyi_quant.quant.plan import block_plan
    from ruyi_quant.sources.tiny import build_tiny

    if request.param == "wide":
        model_dir = build_tiny(
            tmp_path_factory.mktemp("wide") / "m", hidden=256, intermediate=512, layers=6, exits=(2, 3, 5)
        )
    else:
        model_dir = request.getfixturevalue(request.param)
    model = load_model(model_dir)
    float_weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    plan = block_plan(model, "q4_k_m")
    ids = calib_ids(model_dir, 8, 64)
    method = recording(BlockGPTQ)()
    fam = calibrate(model, plan, ids, method, batch=3, progress=False, layout="ggml")
    return plan, ids, method, fam, float_weights


def test_block_grids_are_calibrated_on_the_quantized_familys_inputs(block_run):
    """Each block grid's Hessian is 2/n X^T X of its inputs in the finished family (each module
    computing in its first block type), heads included; GPTQ into the blocks run directly on the
    oracle's Hessian and the float weight gives (nearly) the stored bytes of every type."""
    from ruyi_quant.quant import kquant as K
    from ruyi_quant.quant.gptq import Hessian, factor_hessian
    from ruyi_quant.quant.kgptq import gptq_blocks, importance

    plan, ids, method, fam, float_weights = block_run
    oracle = oracle_inputs(fam.dequantized_model(), ids)
    assert set(method.seen) == set(plan) and any(layout.is_head(m) for m in plan)
    types = {t for s in plan.values() for t in s.ggml}
    assert types & {"q4_k", "q6_k"} or types == {"q5_0", "q8_0"}, types
    for name in plan:
        x = oracle[name].double()
        assert rel_diff(method.seen[name], 2 * x.t() @ x / x.shape[0]) < 5e-6, name
    for name in [n for n in plan if n.endswith(("down_proj", "v_proj")) or "head" in n]:
        x = oracle[name].float()
        h = 2 * x.t() @ x / x.shape[0]
        f = factor_hessian(Hessian(h=h.clone(), n=x.shape[0]), 0.01)
        for t in plan[name].ggml:
            direct = gptq_blocks(float_weights[name], f, t, importance(h))
            stored = fam.grids[name].data[t].numpy()
            k = x.shape[1]
            c_d, c_s = K.decode(direct, t, k)[0], K.decode(stored, t, k)[0]
            assert (c_d != c_s).mean() <= 0.02, (name, t)  # ties flipped by summation order


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_awq_then_gptq_hessians_are_the_smoothed_familys_inputs(which, request):
    """AWQ's scales folded in, then GPTQ: each linear's Hessian is 2/n X^T X of its inputs in
    the finished (smoothed and quantized) family; a head's Hessian, gathered before its scales
    were found, is rescaled to its scaled inputs. A GPTQ fed the unsmoothed inputs fails here."""
    from ruyi_quant.quant.smooth import Smoothed

    model_dir = request.getfixturevalue(which)
    model = load_model(model_dir)
    plan = make_plan(model, QuantSpec(4, 32, True), heads=True)
    ids = calib_ids(model_dir, 8, 64)
    method = Smoothed(AWQ(max_tokens=10**9), RecordingGPTQ())
    fam = calibrate(model, plan, ids, method, batch=3, progress=False)
    oracle = oracle_inputs(fam.dequantized_model(), ids)
    heads = [m for m in plan if layout.is_head(m)]
    assert heads and all(method.ratios.get(h) is not None for h in heads)  # the heads were scaled
    assert set(method.inner.seen) == set(plan)
    for name in plan:
        x = oracle[name].double()
        assert rel_diff(method.inner.seen[name], 2 * x.t() @ x / x.shape[0]) < 5e-6, name


def test_awq_in_blocks_rounds_the_smoothed_weights_on_the_smoothed_inputs(tmp_path):
    """AWQ into llama.cpp's q4_k_m blocks: each module is ggml's own weighted rounding of its
    smoothed weight, the importance matrix from its inputs in the finished family."""
    pytest.importorskip("llama_cpp", reason="ggml's quantizer is llama-cpp-python's")
    from ruyi_quant.quant import kquant as K
    from ruyi_quant.quant.kgptq import BlockRounding, ggml_blocks
    from ruyi_quant.quant.plan import block_plan
    from ruyi_quant.quant.smooth import Smoothed
    from ruyi_quant.sources.tiny import build_tiny

    model_dir = build_tiny(tmp_path / "m", hidden=256, intermediate=512, layers=6, exits=(2, 3, 5))
    model = load_model(model_dir)
    plan = block_plan(model, "q4_k_m")

    class Kept(recording(BlockRounding)):
        def quantize_group(self, linears, hs, plan, fam, inplace=False):
            for name, lin in linears.items():
                self.before[name] = lin.weight.detach().float().clone()
            super().quantize_group(linears, hs, plan, fam, inplace)

    ids = calib_ids(model_dir, 8, 64)
    method = Smoothed(AWQ(max_tokens=10**9), Kept())
    fam = calibrate(model, plan, ids, method, batch=3, progress=False, layout="ggml")
    oracle = oracle_inputs(fam.dequantized_model(), ids)
    assert set(method.inner.seen) == set(plan)
    scaled = [m for m in plan if not torch.equal(method.inner.before[m], model.get_submodule(m).weight)]
    assert any(layout.is_head(m) for m in scaled) and len(scaled) > len(plan) // 2
    for name in plan:
        x = oracle[name].float()
        h = 2 * x.t() @ x / x.shape[0]
        assert rel_diff(method.inner.seen[name], h) < 5e-6, name
        for t in plan[name].ggml:
            direct = ggml_blocks(method.inner.before[name], K.block_type(t), torch.diag(h) / 2)
            stored = fam.grids[name].data[t].numpy()
            c_d, c_s = K.decode(direct, t, x.shape[1])[0], K.decode(stored, t, x.shape[1])[0]
            assert (c_d != c_s).mean() <= 0.02, (name, t)

"""Calibration's shortcuts give what the plain computation gives, bit for bit: a layer's finished
blocks replayed instead of run again, linears of one spec quantized as one matrix, AWQ's loss
through the Gram matrix, evaluation's log-probabilities made a few positions at a time, and the
reference's side of evaluation read back from the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids

from ruyi_quant.evaluate import ReferenceCache, compare_families, kl_rows, nll_sum, token_stats
from ruyi_quant.model import layout
from ruyi_quant.quant.awq import search_scales
from ruyi_quant.quant.gptq import GPTQ, Hessian, accumulate_hessian
from ruyi_quant.quant.plan import QuantSpec
from ruyi_quant.quant.rtn import fake_quantize
from ruyi_quant.quant.walk import Replay, Walk, capture_inputs
from ruyi_quant.recipe import Quantize
from ruyi_quant.store.checkpoint import load_family, load_model


@pytest.fixture
def walked(tiny_dir):
    """A decoder layer of builtin:tiny with its inputs (two batches) and layer kwargs."""
    model = load_model(tiny_dir)
    walk = Walk(model, calib_ids(tiny_dir, 4, 64), batch=2)
    return model.model.layers[1], walk.xs, walk.kw


def perturb(layer, names: tuple[str, ...], seed: int) -> None:
    """Stand-in for quantizing a group: new weights, so every later pass must see them."""
    g = torch.Generator().manual_seed(seed)
    for n in names:
        w = layer.get_submodule(n).weight
        w.data = w.data + 0.05 * torch.randn(w.shape, generator=g)


def test_replayed_passes_are_a_whole_forwards_bit_for_bit(walked):
    """Group by group, each group's captured inputs and then the layer's outputs equal what a
    plain forward of the layer as it then is gives, exactly; and the attention's q/k/v run once a
    batch in all, where the plain passes run them three more times."""
    layer, xs, kw = walked
    replay = Replay(layer, xs, kw)
    calls = []
    hook = layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    for seed, group in enumerate(layout.DECODER_LAYER):
        got, plain = [], []
        replay.capture(group, list(group.names), got.append)
        hook.remove()
        capture_inputs(layer, layer.get_submodule(group.names[0]), xs, kw, plain.append)
        hook = layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        assert len(got) == len(plain) == len(xs) and all(torch.equal(a, b) for a, b in zip(got, plain))
        perturb(layer, group.names, seed)
        replay.quantized(group)
    outputs = replay.outputs()
    hook.remove()
    whole = [layer(x, **kw) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(outputs, whole))
    assert len(calls) == len(xs)  # q/k/v: the o_proj capture's pass only


def test_linears_of_one_spec_quantized_as_one_matrix_get_their_own_grids(walked):
    """q, k and v quantized together (one column loop over their stacked rows) give each the
    grid GPTQ gives it alone, bit for bit; a v with its own spec is quantized apart."""
    layer, xs, kw = walked
    hs = Hessian.zeros(layer.self_attn.q_proj.in_features)
    capture_inputs(layer, layer.self_attn.q_proj, xs, kw, lambda x: accumulate_hessian(hs, x))
    names = [f"model.layers.1.{n}" for n in layout.DECODER_LAYER[0].names]
    lins = {n: layer.get_submodule(n.removeprefix("model.layers.1.")) for n in names}
    for v_spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, group_size=32)):
        plan = {names[0]: QuantSpec(bits=4, group_size=32), names[1]: QuantSpec(bits=4, group_size=32)}
        plan[names[2]] = v_spec
        results = []
        for together in (True, False):
            fam = Recorder()
            gptq = GPTQ(act_order=True)
            h = Hessian(hs.h.clone(), hs.n)
            saved = {n: lin.weight.data.clone() for n, lin in lins.items()}
            if together:
                gptq.quantize_group(dict(lins), h, plan, fam)
            else:
                for n, lin in lins.items():
                    gptq.quantize_group({n: lin}, Hessian(hs.h.clone(), hs.n), plan, fam)
            results.append({n: g.ints() for n, g in fam.grids.items()})
            for n, lin in lins.items():
                lin.weight.data = saved[n]
        for n in names:
            assert all(torch.equal(a, b) for a, b in zip(results[0][n], results[1][n])), n


class Recorder:
    """The part of a QuantizedFamily that calibrate.store writes to."""

    def __init__(self):
        self.grids = {}

    def set_quantized(self, name, grid):
        self.grids[name] = grid


def test_awq_loss_through_the_gram_matrix_is_the_output_error():
    """search_scales' loss per candidate is ||x W^T - x Q^T||^2 / numel, computed directly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    ws = [torch.randn(48, 64, generator=g) * 0.1, torch.randn(16, 64, generator=g) * 0.1]
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    _, _, losses = search_scales(x, ws, spec, n_grid=5)
    w = torch.cat(ws).double()
    x_mean, w_mean = x.abs().mean(0), None
    wg = w.float().abs().reshape(64, -1, 32)
    w_mean = (wg / wg.amax(-1, keepdim=True)).reshape(64, -1).mean(0)
    for i, got in enumerate(losses):
        r = i / 5
        s = (x_mean.pow(r) / w_mean.pow(1 - r).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        q = (fake_quantize(w.float() * s, spec) / s).double()
        want = ((x.double() @ w.t() - x.double() @ q.t()) ** 2).mean().item()
        assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("T", [1, 31, 33, 100])
def test_log_probabilities_a_few_positions_at_a_time_sum_as_the_whole_batch(T):
    g = torch.Generator().manual_seed(T)
    r = torch.randn(3, T, 500, generator=g) * 3
    q = r + 0.3 * torch.randn(3, T, 500, generator=g)
    ids = torch.randint(0, 500, (3, T), generator=g)
    lp, lq = torch.log_softmax(r, -1), torch.log_softmax(q, -1)
    want = {
        "nll_ref": nll_sum(lp, ids),
        "nll_quant": nll_sum(lq, ids),
        "kl": kl_rows(lp, lq).sum().item(),
        "top1": (lp.argmax(-1) == lq.argmax(-1)).sum().item(),
        "positions": ids.numel(),
        "targets": ids[:, 1:].numel(),
    }
    assert token_stats(r, q, ids) == want


def test_the_reference_cache_serves_a_second_evaluation_bit_for_bit(tiny_dir, monkeypatch):
    """Two quantized families against one reference: with the cache, the second evaluation runs
    no reference walk and gives the figures an uncached one gives, exactly; a reference over the
    budget is not kept."""
    from ruyi_quant.pipeline import quantize

    ref = load_family(tiny_dir)
    calib, windows = calib_ids(tiny_dir, 4, 32), calib_ids(tiny_dir, 3, 48)
    fams = [
        quantize(ref, Quantize(method=m, bits=4, group_size=32), calib, progress=False)
        for m in ("rtn", "gptq")
    ]
    exits = ref.config.exits
    plain = [compare_families(ref, f, windows, exits, 2, False) for f in fams]
    cache = ReferenceCache()
    walked = []  # per walk iterated: is it the reference's
    real = Walk.steps

    def steps(self, *a, **k):
        walked.append(self.src is ref)
        return real(self, *a, **k)

    monkeypatch.setattr(Walk, "steps", steps)
    cached = [compare_families(ref, f, windows, exits, 2, False, cache) for f in fams]
    assert cached == plain
    assert walked == [False, True, False]  # the reference's trunk walked for the first only
    assert cache.holds(ReferenceCache.key_of(ref, windows, exits, 2))
    small = ReferenceCache(budget=1000)
    assert compare_families(ref, fams[0], windows, exits, 2, False, small) == plain[0]
    assert not small.holds(ReferenceCache.key_of(ref, windows, exits, 2)) and not small.outputs

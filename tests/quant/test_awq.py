"""AWQ: scale search and clipping on synthetic activations, exact folding, formats, the family."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids, kl_top1, recording

from ruyi_quant.quant.awq import AWQ, apply_clip, clipped_rtn, search_clip, search_scales
from ruyi_quant.quant.calibrate import calibrate
from ruyi_quant.quant.pack import dequantize, from_awq, to_awq
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.quant.rtn import fake_quantize, rtn_family, rtn_quantize
from ruyi_quant.store.checkpoint import load_family, load_model, save_family


def salient(k=256, n=96, m=2048, seed=0, with_index=False):
    """Activations with a few large channels (as LLM activations have), weights without: which
    input channels matter is set by the activations alone. X [m, K], W [N, K] (, salient [K/32])"""
    g = torch.Generator().manual_seed(seed)
    mag = torch.ones(k)
    idx = torch.randperm(k, generator=g)[: k // 32]
    mag[idx] = 20.0
    x = torch.randn(m, k, generator=g) * mag
    w = torch.randn(n, k, generator=g) * 0.05
    return (x, w, idx) if with_index else (x, w)


def calib_windows(model_dir, n=16, t=128):
    return calib_ids(model_dir, n, t)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(4, 32, True), QuantSpec(4, 64, False), QuantSpec(3, 128, False), QuantSpec(4, -1, True)],
)
def test_awq_activation_weighted_error_below_rtn(spec):
    x, w = salient()
    ref = x @ w.t()
    e_rtn = (x @ fake_quantize(w, spec).t() - ref).norm()
    s, r, losses = search_scales(x, [w], spec)
    assert r is not None and len(losses) == 20  # scaling helps on salient channels
    ws, xs = w * s, x / s
    e_scaled = (xs @ fake_quantize(ws, spec).t() - ref).norm()
    clipped = apply_clip(ws, search_clip(xs, ws, spec), spec)
    e_awq = (xs @ fake_quantize(clipped, spec).t() - ref).norm()
    print(f"{spec}: rtn {e_rtn:.4f} scaled {e_scaled:.4f} +clip {e_awq:.4f} (r={r})")
    assert e_scaled < e_rtn
    assert e_awq <= e_scaled
    assert e_awq < 0.9 * e_rtn


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 64, False)])
def test_awq_scales_follow_the_activations(spec):
    """The channels that get the largest scales are the ones with large activations, and when
    the salient activation channels move, the scales move with them (the weights are the same).
    Measured (g32 sym / g64 asym): mean scale on the 8 salient channels 2.43x / 2.44x the mean
    elsewhere; scaled output error 0.775x / 0.571x RTN's (0.997x when the
    scales ignore the activations)."""
    x, w, idx = salient(with_index=True)
    ref = x @ w.t()
    e_rtn = (x @ fake_quantize(w, spec).t() - ref).norm()
    s, r, _ = search_scales(x, [w], spec)
    assert r is not None and 0 < r < 1
    others = torch.ones_like(s, dtype=torch.bool)
    others[idx] = False
    assert set(torch.topk(s, len(idx)).indices.tolist()) == set(idx.tolist())
    assert s[idx].mean() > 2.0 * s[others].mean()
    e_scaled = ((x / s) @ fake_quantize(w * s, spec).t() - ref).norm()
    assert e_scaled < 0.85 * e_rtn, (e_scaled, e_rtn)
    # the same weights with other channels salient: the scales follow the activations
    x2, _, idx2 = salient(seed=1, with_index=True)
    s2, _, _ = search_scales(x2, [w], spec)
    assert set(torch.topk(s2, len(idx2)).indices.tolist()) == set(idx2.tolist())


def test_scale_search_keeps_identity_when_nothing_helps():
    """Weights already on the 4-bit grid (as SmolLM2's, re-read from its Q4_1 GGUF, are): plain
    rounding is exact, every non-trivial scaling moves them off the grid, so the search must
    return the identity, even with salient activations that pull every candidate away from it."""
    spec = QuantSpec(4, 32, False)
    g = torch.Generator().manual_seed(2)
    n, k = 48, 128
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, 0::32], q[:, 1::32] = 0, 15  # each group spans the whole grid
    zero = torch.randint(1, 15, (n, k // 32), generator=g).repeat_interleave(32, 1)
    step = 2.0 ** -torch.randint(4, 8, (n, k // 32), generator=g).float().repeat_interleave(32, 1)
    w = step * (q - zero)
    assert torch.equal(fake_quantize(w, spec), w)  # the grid RTN finds is exact
    x, _ = salient(k=k, n=n)
    s, r, losses = search_scales(x, [w], spec)
    assert r is None and torch.equal(s, torch.ones(k))
    assert min(losses) > 0  # every candidate did lose


class FoldOnly(AWQ):
    """AWQ's smoothing, then nothing: the float model must compute exactly what it did."""

    def quantize_linear(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_folding_leaves_float_logits_unchanged(request, eval_ids, which):
    """The family AWQ's smoothing alone returns computes what the float model does, and the
    model calibrate() read from is left as it was."""
    model_dir = request.getfixturevalue(which)
    model = load_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, QuantSpec(4, 32, True), heads=True)
    with torch.no_grad():
        ref = model.forward_exits(eval_ids)
        method = FoldOnly()
        fam = calibrate(model, plan, calib_windows(model_dir, 8), method, progress=False)
        out = fam.dequantized_model().forward_exits(eval_ids)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    changed = [k for k, v in fam.tensors.items() if not torch.equal(v, before[k])]
    # scales were folded: exit norms and input norms changed (so the check is not vacuous)
    assert any(".norms." in k for k in changed) and any("input_layernorm" in k for k in changed)
    assert any(r is not None for r in method.ratios.values())
    for e in ref:
        diff = (ref[e] - out[e]).abs().max().item()
        assert diff < 1e-4, (e, diff)


def test_awq_gemm_layout_round_trip():
    x, w = salient(k=128, n=64)
    spec = QuantSpec(4, 32, False)
    q, s, z, g = rtn_quantize(w, spec)
    t = to_awq(q, s, z, g, 4)
    assert t["qweight"].shape == (128, 8) and t["qzeros"].shape == (4, 8)
    q2, s2, z2, g2 = from_awq(t, 32)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    assert torch.equal(dequantize(q2, s2, z2, g2), fake_quantize(w, spec))
    with pytest.raises(ValueError, match="divisible by the group size"):
        to_awq(*rtn_quantize(torch.randn(16, 96), QuantSpec(4, 64, False)), 4)  # K=96, g64


@pytest.fixture(scope="module")
def awq_run(tiny_dir, eval_ids, tmp_path_factory):
    """The tiny family, AWQ 4-bit g32 asymmetric on trunk and branches, and RTN at that grid;
    `live`: the logits of the family as written in AWQ's layout and read back."""
    from ruyi_quant.store.checkpoint import load_family, save_family

    model = load_model(tiny_dir)
    spec = QuantSpec(4, 32, False)
    plan = make_plan(model, spec)
    with torch.no_grad():
        ref = model.forward_exits(eval_ids)
        rtn = rtn_family(model, plan, progress=False).dequantized_model().forward_exits(eval_ids)
        fam = calibrate(model, plan, calib_windows(tiny_dir), AWQ(), progress=False, layout="awq")
        out = tmp_path_factory.mktemp("awq") / "fam"
        out.mkdir()
        save_family(fam, out, tiny_dir)
        live = load_family(out).dequantized_model().forward_exits(eval_ids)
    return model, plan, fam, ref, rtn, live


def test_awq_beats_rtn_at_every_exit(awq_run, eval_ids):
    model, plan, fam, ref, rtn, live = awq_run
    with torch.no_grad():
        awq = fam.dequantized_model().forward_exits(eval_ids)
    for e in ref:
        kl_rtn, kl_awq = kl_top1(ref[e], rtn[e])[0], kl_top1(ref[e], awq[e])[0]
        print(f"exit {e}: KL rtn {kl_rtn:.3e} awq {kl_awq:.3e}")
        # measured KL ratio AWQ/RTN: 0.92, 0.83, 0.93 (a random model has few salient channels)
        assert kl_awq < 0.97 * kl_rtn
        # the family as stored (AWQ layout, folded norms) computes exactly what calibration made
        assert torch.equal(live[e], awq[e])


def test_awq_family_stores_simulated_weights(awq_run, tmp_path):
    model, plan, fam, *_ = awq_run
    assert fam.layout == "awq" and fam.modules == plan  # each grid records its plan's spec
    (tmp_path / "fam").mkdir()
    save_family(fam, tmp_path / "fam", None)
    back = load_family(tmp_path / "fam")
    assert back.layout == "awq" and back.modules == plan
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fam" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for m in plan:
        n, k = model.get_submodule(m).weight.shape
        assert stored[f"{m}.qweight"] == [k, n // 8] and f"{m}.g_idx" not in stored
        assert torch.equal(back.weight(m), fam.weight(m)), m


def outlier_channels(model, factor: float = 8.0, n: int = 4, seed: int = 0):
    """Give the heads' inputs a few large channels, as real exit norms do: multiply n channels of
    every exit norm by `factor` and divide the heads' columns by it (a power of two: the float
    model is unchanged bit for bit). Which channels matter is then set by the activations."""
    cfg = model.config
    idx = torch.randperm(cfg.hidden_size, generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        for j in range(len(cfg.exits)):
            model.model.norms[j].weight[idx] *= factor
        for j in range(1 if cfg.shared_heads else len(cfg.exits)):
            model.head(j).weight[:, idx] /= factor
    return model


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_awq_heads_beat_rtn(which, request, eval_ids):
    """Only the heads quantized (4-bit g32 asym), by AWQ (smoothing folded into the exit norms,
    then clipping) and by RTN, on a tiny family whose exit norms have outlier channels.
    Measured KL ratio AWQ/RTN per exit: separate heads 0.31-0.33, shared head 0.29-0.32."""
    model_dir = request.getfixturevalue(which)
    model = outlier_channels(load_model(model_dir))
    spec = QuantSpec(4, 32, False)
    plan = {m: s for m, s in make_plan(model, spec, heads=True).items() if m.startswith("lm_head")}
    with torch.no_grad():
        ref = model.forward_exits(eval_ids)
        rtn = rtn_family(model, plan, progress=False).dequantized_model().forward_exits(eval_ids)
        method = AWQ()
        fam = calibrate(model, plan, calib_windows(model_dir, 8), method, progress=False)
        awq = fam.dequantized_model().forward_exits(eval_ids)
    assert set(fam.modules) == set(plan)
    assert all(method.ratios[h] is not None for h in plan)  # the heads were smoothed
    for e in ref:
        kl_rtn, kl_awq = kl_top1(ref[e], rtn[e])[0], kl_top1(ref[e], awq[e])[0]
        print(f"{which} exit {e}: KL rtn {kl_rtn:.3e} awq {kl_awq:.3e} ratio {kl_awq / kl_rtn:.2f}")
        assert kl_awq < 0.5 * kl_rtn, (e, kl_awq, kl_rtn)


@pytest.mark.parametrize("k,gs", [(256, 32), (96, 64)])
def test_clip_search_stays_within_each_groups_own_range(k, gs):
    """Clipping bounds are per (row, group): between half and all of that group's own max |w|
    (AutoAWQ's max_shrink 0.5), found on a partial last group too; some groups get clipped."""
    x, w = salient(k=k, n=16)
    w[3, 5] = 0.5  # row 3, group 0: ten times the rest
    spec = QuantSpec(4, gs, True)
    best = search_clip(x, w, spec)  # [N, G]
    groups = -(-k // gs)
    assert best.shape == (16, groups)
    pad = -k % gs
    own = torch.nn.functional.pad(w.abs(), (0, pad)).reshape(16, groups, gs).amax(-1)
    assert (best <= own * (1 + 1e-6)).all() and (best >= 0.5 * own * (1 - 1e-6)).all()
    assert (best < own * (1 - 1e-6)).any()


RecordingAWQ = recording(AWQ)


@pytest.mark.parametrize("clip", [True, False])
def test_clipping_applies_where_awq_clips(clip, tiny_dir):
    """With clipping off, every linear is plain RTN of its scaled weight; with it on, q/k stay
    plain RTN (clipping them hurts attention, as AutoAWQ) and the other linears and the heads
    are clipped (their grids differ from RTN's)."""
    model = load_model(tiny_dir)
    spec = QuantSpec(4, 32, False)
    plan = make_plan(model, spec, heads=True)
    method = RecordingAWQ(clip=clip)
    fam = calibrate(model, plan, calib_windows(tiny_dir, 4, 64), method, progress=False)
    plain = {m: torch.equal(fam.weight(m), fake_quantize(method.before[m], spec)) for m in plan}
    assert any(r is not None for k, r in method.ratios.items() if k.startswith("model."))
    if not clip:
        assert all(plain.values())
        return
    assert all(plain[m] for m in plan if m.endswith(("q_proj", "k_proj")))
    assert not any(plain[m] for m in plan if not m.endswith(("q_proj", "k_proj")))


def test_skipped_linears_leave_the_rest_of_the_layer_to_awq(tiny_dir):
    """Layer 1's attention skipped (kept float): its pairs are not smoothed, but the MLP pairs
    after them are, and every planned linear is still quantized."""
    from ruyi_quant.recipe import Override

    model = load_model(tiny_dir)
    plan = make_plan(
        model, QuantSpec(4, 32, False), overrides=[Override(pattern="model.layers.1.self_attn.*", skip=True)]
    )
    method = AWQ()
    fam = calibrate(model, plan, calib_windows(tiny_dir, 4, 64), method, progress=False)
    assert set(fam.modules) == set(plan)
    assert "model.layers.1.input_layernorm" not in method.ratios
    assert {"model.layers.1.post_attention_layernorm", "model.layers.1.mlp.up_proj"} <= set(method.ratios)


def test_sample_rows_is_deterministic_and_keeps_small_inputs_whole():
    from ruyi_quant.quant.awq import sample_rows

    x = torch.randn(4, 50, 3)  # 200 rows of K = 3
    assert torch.equal(sample_rows(x, 200), x.reshape(200, 3))  # at the limit: all, in order
    a, b = sample_rows(x, 64), sample_rows(x, 64)
    assert a.shape == (64, 3) and torch.equal(a, b)  # the same rows every time
    rows = {tuple(r.tolist()) for r in x.reshape(200, 3)}
    assert len({tuple(r.tolist()) for r in a}) == 64 and all(tuple(r.tolist()) in rows for r in a)
    assert not torch.equal(sample_rows(x, 64, seed=1), a)


def test_fold_divides_the_feeding_ops_outputs():
    """Folding s into the op that feeds a pair divides that op's outputs by s: an RMSNorm's
    weight, or a linear's rows and bias (v_proj -> o_proj when the shapes fit)."""
    from ruyi_quant.quant.awq import fold

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(6, 4, bias=True)
    x, s = torch.randn(3, 6, generator=g), torch.rand(4, generator=g) + 0.5
    with torch.no_grad():
        y = lin(x)
        fold(lin, s)
        assert torch.allclose(lin(x), y / s, atol=1e-6)


def awq_scales_by_hand(x, w, spec, r):
    """AWQ's scales for one ratio r, written out group by group from the paper's formula:
    s = mean|x|^r / mean|w~|^(1-r), w~ = |w| divided by its own (row, group) max, normalised
    so that max(s) * min(s) = 1 (as AutoAWQ)."""
    n, k = w.shape
    gs = k if spec.group_size == -1 else spec.group_size
    rel = torch.empty(n, k)
    for j in range(0, k, gs):  # the last group may be partial
        block = w[:, j : j + gs].abs()
        rel[:, j : j + gs] = block / block.amax(1, keepdim=True).clamp(min=1e-8)
    s = (x.abs().mean(0) ** r / (rel.mean(0) ** (1 - r)).clamp(min=1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@pytest.mark.parametrize(
    "k,spec,x_scale",
    [
        (80, QuantSpec(4, 64, False), 1.0),
        (96, QuantSpec(4, 32, True), 0.01),
        (128, QuantSpec(4, -1, True), 1.0),
    ],
)
def test_scale_search_matches_the_formula_per_group(k, spec, x_scale):
    """Every candidate's loss and the chosen scales equal the formula computed by hand with the
    weight statistic taken per (row, group) (a partial last group at K = 80 / group 64; groups
    of very different size, so a per-row statistic would differ), small activations (the
    1e-4 floor on s matters) and large ones."""
    x, w = salient(k=k, n=24)
    x = x * x_scale
    w[:, : k // 2] *= 8  # groups of different magnitude
    ref = x @ w.t()
    s, r, losses = search_scales(x, [w], spec, n_grid=10)
    assert len(losses) == 10
    for i, loss in enumerate(losses):
        sh = awq_scales_by_hand(x, w, spec, i / 10)
        by_hand = (x @ (fake_quantize(w * sh, spec) / sh).t() - ref).pow(2).mean().item()
        assert loss == pytest.approx(by_hand, rel=1e-5)
    assert r is not None and losses[round(r * 10)] == min(losses)
    torch.testing.assert_close(s, awq_scales_by_hand(x, w, spec, r), rtol=1e-6, atol=0)


def test_scale_search_reports_no_scaling_when_every_candidate_is_the_identity():
    """Activations and weights of one magnitude on every channel: every candidate s is all
    ones, its loss ties the identity's exactly, and the search says "no scaling" (r None),
    not a ratio."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (256, 64), generator=g).float() * 2 - 1
    w = (torch.randint(0, 2, (16, 64), generator=g).float() * 2 - 1) * 0.1
    s, r, losses = search_scales(x, [w], QuantSpec(4, 32, False), n_grid=5)
    assert r is None and torch.equal(s, torch.ones(64))
    identity = (x @ fake_quantize(w, QuantSpec(4, 32, False)).t() - x @ w.t()).pow(2).mean().item()
    assert len(set(losses)) == 1 and losses[0] == pytest.approx(identity, rel=1e-5)  # exact ties


@pytest.mark.parametrize(
    "k,spec,dead", [(80, QuantSpec(4, 64, False), True), (96, QuantSpec(4, 32, True), False)]
)
def test_clip_search_equals_a_group_by_group_search(k, spec, dead):
    """search_clip against the search written out for one (row, group) at a time: shrink
    factors 1, 0.95, ... 0.55, the first (least) shrink with the smallest output error wins, so
    a group whose inputs are all zero keeps its whole range."""
    x, w = salient(k=k, n=6, m=256)
    if dead:
        x[:, 64:] = 0  # the partial last group sees nothing
    gs = spec.group_size
    best = search_clip(x, w, spec, n_grid=20, max_shrink=0.5)
    for row in range(w.shape[0]):
        for gi, j in enumerate(range(0, k, gs)):
            wg, xg = w[row, j : j + gs], x[:, j : j + gs]
            org = wg.abs().max()
            errs = []
            for i in range(10):
                mx = org * (1 - i / 20)
                qg = fake_quantize(wg.clamp(-mx, mx).unsqueeze(0), spec)[0]
                errs.append((xg @ (qg - wg)).pow(2).mean().item())
            i_best = min(range(10), key=lambda i: (errs[i], i))
            assert best[row, gi].item() == pytest.approx((org * (1 - i_best / 20)).item(), rel=1e-6)
    if dead:
        assert torch.equal(best[:, 1], w[:, 64:].abs().amax(1))


@pytest.mark.parametrize("m,rows", [(100, "all"), (700, "first 512"), (2048, "every 4th")])
def test_clipping_searches_at_most_512_evenly_strided_rows(monkeypatch, m, rows):
    """The clipping search sees at most CLIP_TOKENS (512) activation rows: all of them when there
    are fewer, otherwise every (m // 512)-th row, the first 512 of those (as AutoAWQ)."""
    import ruyi_quant.quant.awq as awq_mod

    seen = []
    monkeypatch.setattr(
        awq_mod, "search_clip", lambda xc, w, *a: seen.append(xc) or w.abs().amax(1, keepdim=True)
    )

    class Fam:
        def set_quantized(self, *a):
            pass

    x = torch.randn(m, 32)
    AWQ().quantize_linear(torch.nn.Linear(32, 8, bias=False), "l", x, QuantSpec(4, -1, True), Fam())
    want = {"all": x, "first 512": x[:512], "every 4th": x[0::4]}[rows]
    assert torch.equal(seen[0], want)


def test_awq_options_reach_every_search(monkeypatch, tiny_dir):
    """AWQ(n_grid, max_shrink) are the grids every scale and clip search runs on, layers and
    heads alike (not the functions' defaults)."""
    import inspect

    import ruyi_quant.quant.awq as awq_mod

    calls = []

    def spy(fn):
        sig = inspect.signature(fn)

        def wrapped(*a, **kw):
            bound = sig.bind(*a, **kw)
            bound.apply_defaults()
            calls.append((fn.__name__, dict(bound.arguments)))
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(awq_mod, "search_scales", spy(awq_mod.search_scales))
    monkeypatch.setattr(awq_mod, "search_clip", spy(awq_mod.search_clip))
    model = load_model(tiny_dir)
    plan = make_plan(model, QuantSpec(4, 32, True), heads=True)
    calibrate(model, plan, calib_windows(tiny_dir, n=4, t=64), AWQ(n_grid=4, max_shrink=0.25), progress=False)
    scale_calls = [a for f, a in calls if f == "search_scales"]
    clip_calls = [a for f, a in calls if f == "search_clip"]
    assert any(a["ws"][0].shape[0] == model.config.vocab_size for a in scale_calls)  # heads too
    assert scale_calls and all(a["n_grid"] == 4 for a in scale_calls)
    assert clip_calls and all(a["n_grid"] == 4 and a["max_shrink"] == 0.25 for a in clip_calls)


def test_quantize_linear_records_the_spec_it_quantized_with():
    """The grid AWQ stores for a linear carries the spec it was quantized with (exports and
    checkpoints read bits, group size and symmetry from it), and the linear computes with it."""
    from ruyi_quant.quant.family import QuantizedFamily

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 64, generator=g) * 0.1)
    fam = QuantizedFamily(config=None, tensors={"l.weight": lin.weight.detach().clone()})
    spec = QuantSpec(4, 32, False)
    AWQ().quantize_linear(lin, "l", torch.randn(100, 64, generator=g), spec, fam)
    assert fam.modules == {"l": spec} and "l.weight" not in fam.tensors
    assert torch.equal(lin.weight, fam.weight("l"))


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, True), (4, 128, False), (8, 32, False), (3, -1, True)])
def test_fake_quantize_is_the_rtn_grid_bit_for_bit(bits, gs, sym):
    """The searches' float-only fake_quantize against the grid RTN stores, dequantized: K = 576
    (a partial last group at 128), an all-positive row, a zero row."""
    from ruyi_quant.quant.plan import QuantSpec

    g = torch.Generator().manual_seed(bits + gs)
    w = torch.randn(24, 576, generator=g) * 0.05
    w[3] = w[3].abs()
    w[5] = 0
    spec = QuantSpec(bits, gs, sym)
    q, s, z, g_idx = rtn_quantize(w, spec)
    assert torch.equal(fake_quantize(w, spec), dequantize(q, s, z, g_idx))


@pytest.mark.parametrize("sym,gs", [(True, 32), (False, 32), (False, -1), (True, 64)])
def test_clipped_rtn_by_row_blocks_is_the_whole_grid_bit_for_bit(sym, gs):
    """Clipping and rounding a block of rows at a time (a Ruyi head whole made four float32
    copies of itself) gives exactly the grid of clipping and rounding it whole."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(70, 96, generator=g) * torch.rand(70, 1, generator=g)
    spec = QuantSpec(4, gs, sym)
    x = torch.randn(40, 96, generator=g)
    max_val = search_clip(x, w, spec)
    whole = rtn_quantize(apply_clip(w, max_val, spec), spec)
    for rows in (1, 16, 33, 70, 4096):
        blocks = clipped_rtn(w, max_val, spec, rows=rows)
        assert all(torch.equal(a, b) for a, b in zip(whole, blocks))
    assert not torch.equal(whole[0], rtn_quantize(w, spec)[0])  # the clipping did something

"""RTN on the tiny family: quality per exit, plans and overrides."""

from __future__ import annotations

import pytest
import torch
from conftest import kl_top1

from ruyi_quant.errors import UserError
from ruyi_quant.quant.plan import QuantSpec, make_plan
from ruyi_quant.quant.rtn import rtn_family
from ruyi_quant.recipe import Override
from ruyi_quant.store.checkpoint import load_model


def run_rtn(model, ids, spec, heads):
    fam = rtn_family(model, make_plan(model, spec, heads=heads), progress=False)
    q = fam.dequantized_model()
    with torch.no_grad():
        ref, out = model.forward_exits(ids), q.forward_exits(ids)
    return {e: kl_top1(ref[e], out[e]) for e in ref}


@pytest.mark.parametrize("group_size", [128, 32])
def test_rtn8_close_at_every_exit(tiny_dir, eval_ids, group_size):
    model = load_model(tiny_dir)
    scores = run_rtn(model, eval_ids, QuantSpec(8, group_size, True), heads=True)
    for e, (kl, top1) in scores.items():
        assert kl < 1e-3, (e, kl)
        assert top1 >= 0.99, (e, top1)


def test_rtn4_reported_and_worse_than_rtn8(tiny_dir, eval_ids):
    model = load_model(tiny_dir)
    s8 = run_rtn(model, eval_ids, QuantSpec(8, 32, True), heads=False)
    s4 = run_rtn(model, eval_ids, QuantSpec(4, 32, True), heads=False)
    for e in s4:
        print(f"RTN 4-bit g32 exit {e}: KL {s4[e][0]:.3e} top-1 {s4[e][1]:.4f}")
        assert s4[e][0] > 10 * s8[e][0]


def test_rtn_only_touches_planned_modules(tiny_dir):
    model = load_model(tiny_dir)
    plan = make_plan(
        model,
        QuantSpec(4, 32, True),
        heads=False,
        overrides=[
            Override(pattern="model.layers.1.*", skip=True),
            Override(pattern="*.mlp.down_proj", bits=8),
        ],
    )
    fam = rtn_family(model, plan, progress=False)
    assert "model.layers.1.self_attn.q_proj" not in fam.modules
    assert "model.layers.1.self_attn.q_proj.weight" in fam.tensors
    assert fam.modules["model.eelayers.0.mlp.down_proj"].bits == 8
    assert fam.modules["model.eelayers.1.mlp.up_proj"].bits == 4
    assert not any(m.startswith("lm_head") for m in fam.modules)
    # 6 trunk + 2 branch layers of 7 linears, minus the skipped layer
    assert len(fam.modules) == 7 * 8 - 7
    # unquantized tensors are untouched
    assert torch.equal(fam.tensors["model.norms.1.weight"], model.model.norms[1].weight)


def test_plan_heads(tiny_dir, tiny_shared_dir):
    sep, shared = load_model(tiny_dir), load_model(tiny_shared_dir)
    assert [m for m in make_plan(sep, QuantSpec(), heads=True) if "head" in m] == [
        "lm_head.0",
        "lm_head.1",
        "lm_head.2",
    ]
    assert [m for m in make_plan(shared, QuantSpec(), heads=True) if "head" in m] == ["lm_head"]
    with pytest.raises(UserError, match="matches no module"):
        make_plan(sep, QuantSpec(), overrides=[Override(pattern="model.layer.*", bits=8)])


@pytest.mark.parametrize(
    "bits,group,msg",
    [
        (5, 128, r"bits must be one of \[2, 3, 4, 8\]"),
        (4, 100, r"group_size must be one of \[-1, 16, 32"),
        (4, 0, r"group_size must be one of \[-1, 16, 32"),
    ],
)
def test_bad_grid_refused(bits, group, msg):
    with pytest.raises(UserError, match=msg):
        QuantSpec(bits, group, True)


def test_asymmetric_grids_of_special_groups():
    """group_qparams' special cases (its docstring; the all-zero group's [-1, 1] is its `flat`
    branch, which keeps the scale an ordinary fp16 number rather than the FP16_TINY floor), at 8 bits (no Q4_1 rounding of the scale): a mixed-sign
    group spreads [min, max] over maxq steps (a range of exactly 1 included); an all-positive
    group gets max/(maxq-1) and zero 1, so its maximum is on the grid; an all-zero group the grid
    of [-1, 1]. Every group dequantizes within half a step, and exactly for the all-zero one."""
    from ruyi_quant.quant.rtn import grid_value, group_qparams, quantize_to_grid

    spec = QuantSpec(8, 32, False)
    rows = torch.stack(
        [
            torch.linspace(-0.25, 0.75, 32),
            torch.linspace(-0.3, 0.4, 32),
            torch.linspace(0.2, 0.9, 32),
            torch.zeros(32),
        ]
    )
    scale, zero = group_qparams(rows, spec)
    assert scale[0] == torch.tensor(1.0 / 255).half() and scale[1] == torch.tensor(0.7 / 255).half()
    assert zero[0] == round(0.25 / scale[0].item()) and zero[1] == round(0.3 / scale[1].item())
    assert scale[2] == torch.tensor(0.9 / 254).half() and zero[2] == 1
    assert scale[3] == torch.tensor(2.0 / 255).half() and zero[3] == 128
    deq = grid_value(quantize_to_grid(rows, scale, zero, spec.maxq), scale, zero)
    assert ((deq - rows).abs() <= scale.float().unsqueeze(1) / 2 + 1e-7).all()
    assert not deq[3].any()


def test_a_constant_positive_group_is_on_the_4_bit_grid():
    """All-positive groups keep their maximum on the grid: a constant group comes back within fp16
    rounding of the scale (at 4 bits, with the Q4_1-exact scale)."""
    from ruyi_quant.quant.pack import dequantize
    from ruyi_quant.quant.rtn import rtn_quantize

    w = torch.full((2, 32), 0.3)
    w[1] = 0.01
    deq = dequantize(*rtn_quantize(w, QuantSpec(4, 32, False)))
    assert ((deq - w).abs() <= 2**-9 * w).all(), deq[:, 0]


@pytest.mark.parametrize("k,gs", [(80, 64), (96, 64), (64, -1)])
def test_fake_quantize_is_rtn_dequantized(k, gs):
    """The all-groups-at-once RTN used by AWQ's searches equals quantize-then-dequantize,
    including a partial last group (K = 80, group 64: padding 48, not the 16 a sign slip gives)."""
    from ruyi_quant.quant.pack import dequantize
    from ruyi_quant.quant.rtn import fake_quantize, rtn_quantize

    for sym in (True, False):
        spec = QuantSpec(4, gs, sym)
        w = torch.randn(24, k, generator=torch.Generator().manual_seed(k)) * 0.05
        assert torch.equal(fake_quantize(w, spec), dequantize(*rtn_quantize(w, spec)))


def test_plan_override_reaches_a_head_when_heads_are_off(tiny_dir):
    """An override that names a head quantizes it even with heads off ("heads at 8 bits, the
    rest at 4" is one override); the other heads stay float."""
    plan = make_plan(
        load_model(tiny_dir),
        QuantSpec(4, 32, True),
        heads=False,
        overrides=[Override(pattern="lm_head.1", bits=8)],
    )
    assert [m for m in plan if "head" in m] == ["lm_head.1"] and plan["lm_head.1"].bits == 8


def test_later_overrides_change_only_what_they_name(tiny_dir):
    """Two overrides on one module compose: the second starts from the first's grid, not from
    the default (bits 8 from the first, group 64 from the second, sym from the default)."""
    plan = make_plan(
        load_model(tiny_dir),
        QuantSpec(4, 32, True),
        overrides=[
            Override(pattern="*.mlp.down_proj", bits=8),
            Override(pattern="model.layers.0.*", group_size=64),
        ],
    )
    assert plan["model.layers.0.mlp.down_proj"] == QuantSpec(8, 64, True)
    assert plan["model.layers.1.mlp.down_proj"] == QuantSpec(8, 32, True)
    assert plan["model.layers.0.mlp.up_proj"] == QuantSpec(4, 64, True)
    assert plan["model.layers.1.mlp.up_proj"] == QuantSpec(4, 32, True)


def fp16_exact(v: float) -> bool:
    return torch.tensor(v, dtype=torch.float64).half().double().item() == v


def test_exact_min_scale_keeps_as_many_bits_as_the_min_allows():
    """Q4_1 stores w = d*q + m with fp16 d and m, so a scale must make -scale*zero an fp16
    number. Each scale becomes the nearest number with the most significant bits (11, fp16's,
    down to 1) for which scale*zero is an fp16 number; a 4-bit zero costs at most 4 bits."""
    import math

    from ruyi_quant.quant.rtn import exact_min_scale

    g = torch.Generator().manual_seed(15)
    scale = (torch.rand(4000, generator=g) * 0.02 + 1e-4).half()
    zero = torch.randint(0, 16, (4000,), generator=g)
    out = exact_min_scale(scale, zero)
    assert out.dtype == torch.float16
    lost = []
    for s, z, o in zip(scale.double().tolist(), zero.tolist(), out.double().tolist()):
        e = math.floor(math.log2(s))
        for keep in range(11, 0, -1):
            step = 2.0 ** (e - keep + 1)
            want = round(s / step) * step
            if fp16_exact(want * z):
                break
        assert o == want and fp16_exact(o * z)
        lost.append(11 - keep)
    assert max(lost) == 4 and min(lost) == 0 and sum(x > 0 for x in lost) > 1000

"""GPTQ layout: bit-exact round trips, and the layout AutoGPTQ writes (checked against a
straightforward re-implementation of its packing loops, written here independently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ruyi_quant.quant.pack import (
    dequantize,
    from_awq,
    from_gptq,
    pack_cols,
    pack_rows,
    to_gptq,
    unpack_cols,
    unpack_rows,
)
from ruyi_quant.quant.plan import QuantSpec
from ruyi_quant.quant.rtn import rtn_quantize


def autogptq_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's loops: 2/4/8 bits put value j of a word at bit bits*j; 3 bits straddle."""
    k, n = q.shape
    q = q.astype(np.uint32)
    out = np.zeros((k * bits // 32, n), dtype=np.uint32)
    i = row = 0
    if bits in (2, 4, 8):
        per = 32 // bits
        while row < out.shape[0]:
            for j in range(per):
                out[row] |= q[i + j] << (bits * j)
            i += per
            row += 1
    else:
        while row < out.shape[0]:
            for j in range(10):
                out[row] |= q[i + j] << (3 * j)
            i += 10
            out[row] |= q[i] << 30
            row += 1
            out[row] |= (q[i] >> 2) & 1
            i += 1
            for j in range(10):
                out[row] |= q[i + j] << (3 * j + 1)
            i += 10
            out[row] |= q[i] << 31
            row += 1
            out[row] |= (q[i] >> 1) & 3
            i += 1
            for j in range(10):
                out[row] |= q[i + j] << (3 * j + 2)
            i += 10
            row += 1
    return out.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_layout(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 5), generator=g)
    ours = pack_rows(q, bits)
    assert ours.dtype == torch.int32 and ours.shape == (96 * bits // 32, 5)
    assert np.array_equal(ours.numpy(), autogptq_pack(q.numpy(), bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n", [(64, 24), (72, 10), (576, 3), (50, 7)])
def test_pack_roundtrip_bit_exact(bits, k, n):
    g = torch.Generator().manual_seed(k * n + bits)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    packed = pack_rows(q, bits)
    assert packed.shape == (-(-k * bits // 32), n)
    assert torch.equal(unpack_rows(packed, bits, k), q.to(torch.int32))
    z = torch.randint(0, 2**bits, (3, n), generator=g)
    zp = pack_cols(z, bits)
    assert zp.shape == (3, -(-n * bits // 32))
    assert torch.equal(unpack_cols(zp, bits, n), z.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_grid_stored_and_dequantized_exactly(bits, group_size, sym):
    """K=320 is not a multiple of 128 or 64*... : the last group is partial, as in GPTQ."""
    spec = QuantSpec(bits, group_size, sym)
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(48, 320, generator=g) * 0.05
    w[:, :16] = w[:, :16].abs()  # an all-positive group region exercises zero >= 1
    q, scales, zeros, g_idx = rtn_quantize(w, spec)
    groups = spec.groups(320)
    assert q.shape == (320, 48) and scales.shape == (groups, 48) and zeros.shape == (groups, 48)
    assert scales.dtype == torch.float16 and int(q.min()) >= 0 and int(q.max()) <= spec.maxq
    assert int(zeros.min()) >= 1
    if sym:
        assert torch.all(zeros == 2 ** (bits - 1))
    # the simulated weight, computed here from the grid by the definition
    gi = g_idx.long()
    simulated = (scales.float()[gi] * (q.float() - zeros.float()[gi])).t()
    stored = to_gptq(q, scales, zeros, g_idx, bits)
    assert stored["qweight"].dtype == torch.int32 and stored["g_idx"].shape == (320,)
    q2, s2, z2, g2 = from_gptq(stored, bits, 320, 48)
    assert torch.equal(q2.long(), q) and torch.equal(z2.long(), zeros) and torch.equal(s2, scales)
    assert torch.equal(dequantize(q2, s2, z2, g2), simulated)
    # RTN is round to nearest on the grid's range [scale*(0-zero), scale*(maxq-zero)]: every
    # weight is within half a step of its value clamped to that range (measured: 0.4999996
    # steps at most), and the clamp moves none by more than 0.6 of a step (measured 0.57: the
    # range is [min, max] with the zero point rounded and the scale rounded to fp16)
    step, zero = scales.float()[gi].t(), zeros.float()[gi].t()
    clamped = torch.minimum(torch.maximum(w, -step * zero), step * (spec.maxq - zero))
    assert ((simulated - clamped).abs() <= step * (0.5 + 1e-5)).all()
    assert ((w - clamped).abs() <= step * 0.6).all()


def test_zero_stored_minus_one():
    """v1 checkpoints store zero-1: a symmetric 4-bit zero of 8 is packed as nibbles of 7."""
    spec = QuantSpec(4, 32, True)
    q, s, z, g = rtn_quantize(torch.randn(8, 64), spec)
    qzeros = to_gptq(q, s, z, g, 4)["qzeros"]
    assert qzeros.shape == (2, 1) and torch.all(qzeros == 0x77777777)


def autoawq_pack(q: np.ndarray) -> np.ndarray:
    """AutoAWQ's gemm loop: word c holds columns 8c..8c+7, nibble i = column 8c + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    r, n = q.shape
    out = np.zeros((r, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= q[:, c * 8 + order[i]].astype(np.uint32) << (4 * i)
    return out


def test_awq_pack_matches_autoawq_layout():
    from ruyi_quant.quant.pack import awq_pack, awq_unpack

    q = torch.randint(0, 16, (48, 64), generator=torch.Generator().manual_seed(3))
    ours = awq_pack(q).numpy().view(np.uint32)
    assert np.array_equal(ours, autoawq_pack(q.numpy()))
    assert torch.equal(awq_unpack(awq_pack(q)), q.to(torch.int32))


@pytest.mark.parametrize(
    "bits,n,k,gs,fits",
    [
        (4, 16, 64, 32, True),
        (4, 16, 64, -1, True),
        (3, 16, 64, 32, False),
        (4, 12, 64, 32, False),
        (4, 16, 96, 64, False),
        (8, 16, 64, 32, False),
    ],
)
def test_awq_layout_takes_exactly_what_fits(bits, n, k, gs, fits):
    """AWQ's gemm layout: 4 bits, out_features a multiple of 8, K a multiple of the group size
    (or one group); awq_fits says so and to_awq refuses the rest with the reason."""
    from ruyi_quant.quant.pack import awq_fits, to_awq

    assert awq_fits(k, n, bits, gs) is fits
    spec = QuantSpec(bits, gs, False)
    grid = rtn_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), spec)
    if fits:
        t = to_awq(*grid, bits)
        q, s, z, g = from_awq(t, gs)
        assert torch.equal(q.long(), grid[0]) and torch.equal(z.long(), grid[2])
        assert torch.equal(g.long(), grid[3].long()) and torch.equal(s, grid[1])
    else:
        why = "4-bit weights with out_features % 8" if bits != 4 or n % 8 else "divisible by the group"
        with pytest.raises(ValueError, match=why):
            to_awq(*grid, bits)


def test_awq_refuses_act_order_groups():
    from ruyi_quant.quant.pack import to_awq

    q, s, z, g = rtn_quantize(torch.randn(16, 64), QuantSpec(4, 32, False))
    with pytest.raises(ValueError, match="no act-order"):
        to_awq(q, s, z, g.flip(0), 4)


def test_gptq_v1_refuses_zero_below_one():
    q, s, z, g = rtn_quantize(torch.randn(8, 64), QuantSpec(4, 32, False))
    with pytest.raises(ValueError, match="zeros must be >= 1"):
        to_gptq(q, s, z * 0, g, 4)


GRID_CASES = [
    (2, 32, True, 16, 96, False),
    (3, 64, False, 24, 128, False),
    (4, -1, True, 8, 80, True),
    (4, 32, False, 16, 128, True),
    (4, 64, True, 16, 80, False),
    (8, 16, False, 40, 64, False),
    # K*bits and N*bits past 32*33, so that a ceiling over a wrong word size differs
    (4, 128, False, 320, 576, False),
    (3, 32, True, 360, 352, False),
]


@pytest.mark.parametrize("bits,gs,sym,n,k,awq", GRID_CASES)
def test_grid_nbytes_are_the_packed_sizes_and_unpack_inverts_pack(bits, gs, sym, n, k, awq):
    """Grid.nbytes (sizes without packing) equals the packed tensors' bytes in each layout that
    holds the grid, and unpacking gives the same grid and spec back."""
    from ruyi_quant.quant.grid import Grid

    spec = QuantSpec(bits, gs, sym)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits * k + n)) * 0.05
    grid = Grid.make(*rtn_quantize(w, spec), spec)
    layouts = ["gptq"] + (["awq"] if grid.fits_awq else [])
    assert grid.fits_awq == awq  # 4 bits, N % 8 == 0, whole groups (K = 80 at g64 is not)
    for layout in layouts:
        packed = grid.pack(layout)
        nbytes = grid.nbytes(layout)
        assert type(nbytes) is int
        assert nbytes == sum(t.numel() * t.element_size() for t in packed.values())
        back = Grid.unpack(layout, packed, spec)
        assert back.spec == spec and back.shape == (n, k)
        assert all(torch.equal(a, b) for a, b in zip(back.ints(), grid.ints()))

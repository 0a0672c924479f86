"""The int4 runtime's linear (ruyi_quant/runtime/int4.py) on PyTorch's tinygemm kernels: our grids
convert exactly (float32 activations), every layout (act-order, K = 576 at group 128, one group per
channel, group 512), within bf16's rounding in bf16; what the kernels cannot hold is refused. The
CUDA twin runs the same conversion where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from ruyi_quant.errors import UserError
from ruyi_quant.quant.grid import Grid
from ruyi_quant.quant.plan import QuantSpec
from ruyi_quant.runtime.int4 import Int4Linear, kernel_for, tinygemm_tensors

LAYOUTS = [
    (32, 128, True, False),
    (128, 576, False, False),
    (128, 576, False, True),
    (-1, 576, False, False),
    (512, 1024, True, False),
    (64, 96, True, True),
    (256, 512, False, False),
]


def random_grid(gs: int, k: int, sym: bool, act_order: bool, n: int = 40, bits: int = 4) -> Grid:
    g = torch.Generator().manual_seed(k * 7 + gs + sym + 3 * act_order)
    spec = QuantSpec(bits, gs, sym)
    groups = spec.groups(k)
    g_idx = torch.arange(k) // spec.width(k)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    zeros = (
        torch.full((groups, n), 1 << (bits - 1))
        if sym
        else torch.randint(0, 2**bits, (groups, n), generator=g)
    )
    return Grid.make(
        torch.randint(0, 2**bits, (k, n), generator=g),
        (torch.rand(groups, n, generator=g) * 0.05 + 1e-3).half(),
        zeros,
        g_idx.int(),
        spec,
    )


@pytest.mark.parametrize("gs,k,sym,act_order", LAYOUTS)
def test_float32_int4_linear_is_our_grid_exactly(gs, k, sym, act_order):
    grid = random_grid(gs, k, sym, act_order)
    lin = Int4Linear(grid, dtype=torch.float32)
    w = grid.dequantize()
    assert torch.equal(lin(torch.eye(k)).t(), w)  # every weight, bit for bit
    x = torch.randn(2, 5, k)
    assert torch.allclose(lin(x), x @ w.t(), rtol=0, atol=1e-4)  # measured <= 1.6e-5


@pytest.mark.parametrize("gs,k,sym,act_order", LAYOUTS)
def test_bfloat16_int4_linear_is_within_bf16_rounding(gs, k, sym, act_order):
    """bf16 scales and zeros round our fp16 scales to 8 bits: each weight within 2^-8 of its size
    (measured at most 0.0031 on weights up to 0.8, about 2^-8)."""
    grid = random_grid(gs, k, sym, act_order)
    w = grid.dequantize()
    got = Int4Linear(grid, dtype=torch.bfloat16)(torch.eye(k)).float().t()
    assert (got - w).abs().max() <= 2**-7 * w.abs().max()
    assert not torch.equal(got, w)  # bf16 really rounds (the bound above is not vacuous)


def test_padding_rows_and_columns_carry_no_weight():
    """K = 576 at group 128: on the CPU as groups of 64 (no padding of x on every call); CUDA's
    layout (K a multiple of 128) pads K to 640 with code 8 and zero scales. N = 40 pads to 48
    (CPU) with zero scales."""
    grid = random_grid(128, 576, False, False, n=40)
    codes, sz, perm, group, kp = tinygemm_tensors(grid, kernel_for("cpu"), torch.float32)
    assert (kp, group, perm) == (576, 64, None) and codes.shape == (48, 576) and sz.shape == (9, 48, 2)
    assert (sz[:, 40:] == 0).all()
    assert torch.equal(sz[0:8:2, :40], sz[1:8:2, :40])  # each grid group split in two, same scale and zero
    from ruyi_quant.runtime.int4 import Kernel

    codes, sz, perm, group, kp = tinygemm_tensors(grid, Kernel("cuda", 128, 8), torch.float32)
    assert (kp, group) == (640, 128) and codes.shape == (40, 640) and sz.shape == (5, 40, 2)
    assert (codes[:, 576:] == 8).all()


def test_grids_the_kernels_cannot_hold_are_refused():
    with pytest.raises(UserError, match="^bits 3: the int4 runtime holds 4-bit grids"):
        Int4Linear(random_grid(32, 128, True, False, bits=3), dtype=torch.float32)
    with pytest.raises(UserError, match="^group_size 16: the int4 kernels take groups of 32, 64, 128, 256"):
        Int4Linear(random_grid(16, 128, True, False), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU twin above runs everywhere)")
@pytest.mark.parametrize("gs,k,sym,act_order", LAYOUTS)
def test_cuda_int4_linear_gives_the_cpu_twins_result(gs, k, sym, act_order):
    grid = random_grid(gs, k, sym, act_order)
    x = torch.randn(3, k)
    cpu = Int4Linear(grid, dtype=torch.bfloat16)(x.bfloat16()).float()
    gpu = Int4Linear(grid, device="cuda", dtype=torch.bfloat16)(x.cuda().bfloat16()).float().cpu()
    assert (gpu - cpu).abs().max() <= 1e-2 * cpu.abs().max()


def test_packing_rows_at_a_time_is_packing_at_once():
    """Int4Linear packs a weight a block of rows at a time (no whole int32 copy on the device):
    the packed tensor is the one-shot packing's, byte for byte, for any requested rows (rounded up
    to the row block the op interleaves, probed on this machine: 32 with AVX2, 64 with AVX-512),
    also with a partial last block of 16 rows."""
    from ruyi_quant.runtime.int4 import kernel_for

    kernel = kernel_for("cpu")
    block = kernel.row_block()
    assert block % kernel.n_multiple == 0 and block <= 256
    for n in (2 * block + 32, 2 * block + 16):
        codes = torch.randint(0, 16, (n, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
        whole = kernel._pack(codes)
        for rows in (16, block // 2, block, 2 * block, 4096):
            assert torch.equal(kernel.pack(codes, "cpu", rows=rows), whole), (n, rows)


def test_the_probed_row_block_is_the_smallest_that_packs_alike():
    """Pieces of half the probed block pack differently from the whole (so rounding up is needed,
    and the probe did not settle on a block larger than the op's)."""
    from ruyi_quant.runtime.int4 import kernel_for

    kernel = kernel_for("cpu")
    block = kernel.row_block()
    half = block // 2
    if half % kernel.n_multiple:
        pytest.skip(
            reason=f"the row block {block} is the op's smallest packable piece: no smaller piece to compare"
        )
    codes = torch.randint(
        0, 16, (2 * block, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(1)
    )
    pieces = torch.cat([kernel._pack(codes[r : r + half]) for r in range(0, 2 * block, half)])
    assert not torch.equal(pieces, kernel._pack(codes))

"""llama.cpp's block types: our encoders against the gguf package's decoders and ggml's own bytes;
the type map against llama.cpp's quantizer; GPTQ on fixed K-quant blocks against their rounding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import needs_llama

from ruyi_quant.quant import kquant as K
from ruyi_quant.quant import ktypes

ROWS, COLS = 6, 512


def random_blocks(t: K.BlockType, rng: np.random.Generator, n: int = ROWS, k: int = COLS):
    """Random codes and block parameters of type t, over the whole range of each field."""
    nb, ns = k // t.block, k // t.sub
    codes = rng.integers(0, t.qmax + 1, size=(n, k), dtype=np.uint8)
    d = rng.normal(0, 0.05, size=(n, nb)).astype(np.float16)
    p = {"d": d}
    if t.name in ("q4_k", "q5_k"):
        p["dmin"] = np.abs(rng.normal(0, 0.05, size=(n, nb))).astype(np.float16)
        p["sc"] = rng.integers(0, 64, size=(n, ns), dtype=np.uint8)
        p["m"] = rng.integers(0, 64, size=(n, ns), dtype=np.uint8)
    elif t.name == "q6_k":
        p["sc"] = rng.integers(-128, 128, size=(n, ns)).astype(np.int8)
    elif t.offset:
        p["m"] = rng.normal(0, 0.1, size=(n, nb)).astype(np.float16)
    if t.name == "q8_0":
        codes[codes == 0] = 1  # ggml's Q8_0 codes are -127..127
    return codes, p


@pytest.mark.parametrize("name", list(K.TYPES))
def test_blocks_round_trip_through_the_gguf_decoder(name):
    """Encoded codes and parameters decode, in the gguf package, to our dequantization bit for
    bit, and our decoder gives back the codes and parameters we encoded."""
    t = K.TYPES[name]
    codes, p = random_blocks(t, np.random.default_rng(len(name)))
    data = K.encode(codes, p, t)
    assert data.shape == (ROWS, t.row_bytes(COLS)) and data.dtype == np.uint8
    theirs = gguf.quants.dequantize(data, t.qtype)
    ours = K.dequantize(codes, p, t)
    assert theirs.dtype == np.float32 and theirs.shape == (ROWS, COLS)
    np.testing.assert_array_equal(theirs.view(np.uint32), ours.view(np.uint32))  # bit for bit
    back, q = K.decode(data, t, COLS)
    np.testing.assert_array_equal(back, codes)
    assert q.keys() == p.keys()
    for key in p:
        np.testing.assert_array_equal(q[key].view(np.uint8), p[key].view(np.uint8))


def test_a_changed_code_changes_one_weight():
    """The layout is position-exact: bumping one code moves exactly that weight in gguf's decode."""
    rng = np.random.default_rng(3)
    for t in K.TYPES.values():
        codes, p = random_blocks(t, rng)
        base = gguf.quants.dequantize(K.encode(codes, p, t), t.qtype)
        for pos in (0, 17, 40, 100, 200, 255, 300):
            c = codes.copy()
            c[2, pos] = (int(c[2, pos]) + 1) % (t.qmax + 1) or 1
            moved = gguf.quants.dequantize(K.encode(c, p, t), t.qtype) != base
            assert set(zip(*np.nonzero(moved))) <= {(2, pos)}, (t.name, pos)


@needs_llama
@pytest.mark.parametrize("name", list(K.TYPES))
@pytest.mark.parametrize("weighted", [False, True])
def test_ggml_bytes_decode_and_encode_back_exactly(name, weighted):
    """Fed the codes and parameters ggml's quantizer chose (with and without an importance
    matrix), our encoder writes ggml's bytes exactly."""
    from ruyi_quant.quant.ggml_quantizer import quantize_rows

    t = K.TYPES[name]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((ROWS, COLS)) * rng.uniform(0.01, 1, (ROWS, 1))).astype(np.float32)
    x[0, :40] = 0  # an all-zero sub-block
    imat = rng.uniform(0.1, 4, COLS).astype(np.float32) if weighted else None
    data = quantize_rows(t.qtype, x, imat)
    codes, p = K.decode(data, t, COLS)
    np.testing.assert_array_equal(K.encode(codes, p, t), data)
    np.testing.assert_array_equal(K.dequantize(codes, p, t), gguf.quants.dequantize(data, t.qtype))


def test_nearest_code_is_the_round_to_nearest_of_a_fixed_grid():
    t = K.TYPES["q4_k"]
    codes, p = random_blocks(t, np.random.default_rng(5))
    w = torch.from_numpy(K.dequantize(codes, p, t))
    s, o = K.columns(p, t, COLS)
    got = K.nearest(w + 0.3 * s * (torch.rand_like(w) - 0.5), s, o, t)  # within half a step
    ok = s != 0
    assert torch.equal(got[ok], torch.from_numpy(codes)[ok])
    assert torch.equal(K.value(got, s, o, t)[ok], w[ok])


@pytest.mark.parametrize(
    ("ftype", "kind", "block", "n", "k", "want"),
    [
        ("q4_k_m", "attn_v", 0, 12, 3584, "q6_k"),  # first eighth
        ("q4_k_m", "attn_v", 2, 12, 3584, "q4_k"),
        ("q4_k_m", "attn_v", 3, 12, 3584, "q6_k"),  # (3 - 1) % 3 == 2
        ("q4_k_m", "ffn_down", 11, 12, 18944, "q6_k"),  # last eighth
        ("q4_k_m", "ffn_down", 4, 28, 18944, "q4_k"),  # 28 // 8 = 3; (4 - 3) % 3 == 1
        ("q4_k_m", "attn_q", 0, 28, 3584, "q4_k"),
        ("q4_k_m", "attn_q", 0, 30, 576, "q5_0"),  # fallback: 576 is not a multiple of 256
        ("q5_k_m", "attn_k", 0, 30, 576, "q5_1"),
        ("q6_k", "ffn_up", 4, 30, 576, "q8_0"),
        ("q4_k_m", "output", -1, 30, 576, "q8_0"),
        ("q4_k_m", "output", -1, 28, 3584, "q6_k"),
        ("q6_k", "token_embd", -1, 28, 3584, "q6_k"),
        ("q4_k_m", "token_embd", -1, 28, 3584, "q4_k"),
        ("q4_k_m", "token_embd", -1, 30, 576, "q5_0"),
    ],
)
def test_tensor_type_rule(ftype, kind, block, n, k, want):
    assert ktypes.tensor_type(ftype, kind, block, n, k) == want


@needs_llama
@pytest.mark.parametrize("ftype", list(ktypes.FTYPES))
def test_type_map_is_llama_cpps(tmp_path, ftype):
    """Every exit's file, quantized by llama.cpp itself, has the types exit_types names, at depths
    where use_more_bits picks different layers, with K-native and fallback widths."""
    from ruyi_quant.exporters import gguf as G
    from ruyi_quant.exporters.gguf.llamacpp import llama_quantize
    from ruyi_quant.quant.family import QuantizedFamily
    from ruyi_quant.sources.tiny import build_tiny
    from ruyi_quant.store.checkpoint import load_model

    src = build_tiny(tmp_path / "m", hidden=256, intermediate=320, layers=10, exits=(2, 5, 9))
    fam = QuantizedFamily.from_model(load_model(src))
    modules = [n.removesuffix(".weight") for n in fam.weight_names() if n.endswith(".weight")]
    for j, e in enumerate(fam.config.exits):
        G.write_exit(fam, e, tmp_path / "f16.gguf", src, G.GGUFOptions(type="f16"))
        llama_quantize(tmp_path / "f16.gguf", tmp_path / "q.gguf", ftype)
        got = {
            t.name: t.tensor_type.name.lower()
            for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32,)
        }
        want = ktypes.exit_types(fam.config, ftype, j, modules, fam.linear_shape)
        exit_map = fam.config.exit_map(j)
        from ruyi_quant import names

        named = {names.gguf_name(exit_map.rename(f"{m}.weight")): t for m, t in want.items()}
        assert named == got, (e, {n: (named.get(n), got.get(n)) for n in got if named.get(n) != got[n]})
        assert len(set(got.values())) >= 2


@needs_llama
@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q8_0"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_fixed_blocks_beats_their_rounding(name, act_order):
    """On the block parameters ggml's weighted search chose, GPTQ's codes have a lower output
    error ||(W - Q) X^T|| than ggml's own round-to-nearest codes, and keep those parameters."""
    from ruyi_quant.quant.gptq import Hessian, accumulate_hessian, factor_hessian
    from ruyi_quant.quant.kgptq import ggml_blocks, gptq_blocks, importance

    t = K.TYPES[name]
    g = torch.Generator().manual_seed(0)  # correlated inputs with uneven channel scales
    x = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 512**0.5)
    x = x * torch.linspace(0.2, 3.0, 512)
    w = torch.randn(64, 512, generator=g) * 0.05
    hs = Hessian.zeros(512)
    for c in x.chunk(3):
        accumulate_hessian(hs, c)
    imat = importance(hs.h)
    assert torch.allclose(imat, (x * x).mean(0), rtol=1e-4)  # llama.cpp's statistic
    f = factor_hessian(hs, 0.01, act_order)
    theirs, ours = ggml_blocks(w, t, imat), gptq_blocks(w, f, name, imat, block=64)
    (c_t, p_t), (c_o, p_o) = K.decode(theirs, t, 512), K.decode(ours, t, 512)
    for key in p_t:
        np.testing.assert_array_equal(p_t[key], p_o[key])
    assert (c_t != c_o).mean() > 0.05  # GPTQ chose other codes
    err = [((w - torch.from_numpy(K.dequantize(c, p_t, t))) @ x.t()).norm().item() for c in (c_t, c_o)]
    # measured GPTQ / ggml output error (AMD EPYC, AVX2): 0.84-0.91 in original order, 0.53-0.62
    # with act-order
    assert err[1] < (0.7 if act_order else 0.93) * err[0], err

"""ONNX export: MatMulNBits initializers decode to our grids bit for bit, every exit's graph gives
our reference logits in onnxruntime (float and int4, separate and shared heads), the KV cache,
onnxruntime-genai's greedy generation, the multi-exit folder, metadata and refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import calib_ids, kl_top1
from onnx import helper, numpy_helper

from ruyi_quant.errors import UserError
from ruyi_quant.exporters import onnx as X
from ruyi_quant.exporters.onnx.weights import _pack, int8_grid, layout_of, nbits_arrays
from ruyi_quant.exporters.provenance import provenance
from ruyi_quant.pipeline import quantize
from ruyi_quant.quant.grid import Grid
from ruyi_quant.quant.plan import QuantSpec
from ruyi_quant.recipe import GPTQOptions, ONNXExport, Provenance, Quantize
from ruyi_quant.sources.tiny import build_tiny
from ruyi_quant.store.checkpoint import load_family, load_model

try:
    import onnxruntime_genai as og
except ImportError:  # pragma: no cover - CI installs it
    og = None
needs_genai = pytest.mark.skipif(
    og is None, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)"
)


def family(src, method="rtn", bits=4, gs=32, sym=True, heads=False, act_order=False):
    q = Quantize(
        method=method,
        bits=bits,
        group_size=gs,
        sym=sym,
        heads=heads,
        gptq=GPTQOptions(act_order=act_order, static_groups=False),
    )
    calib = calib_ids(src, 8, 64) if method == "gptq" else None
    fam = quantize(load_family(src), q, calib, progress=False)
    fam.provenance = Provenance(model=str(src), quantize=q)
    return fam


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, ids: np.ndarray, cfg, past: dict | None = None, start: int = 0):
    """All outputs of one call: ids [b, n] after `start` cached positions (past: a previous
    call's outputs)."""
    b, n = ids.shape
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    dt = np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, start + n), np.int64),
        "position_ids": np.tile(np.arange(start, start + n), (b, 1)),
    }
    kvh = cfg.raw["num_key_value_heads"]
    for i in range(layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = (
                past[f"present.{i}.{kv}"] if past else np.zeros((b, kvh, 0, cfg.head_dim), dt)
            )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def identity_decode(model_path, node) -> np.ndarray:
    """A MatMulNBits node of an exported graph run alone on the identity, without its bias:
    W^T [K, N] as onnxruntime itself dequantizes it (initializers from the graph's external data)."""
    m = onnx.load(str(model_path))  # external data loaded
    inits = {t.name: t for t in m.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weights = list(node.input[1:5])  # B, scales, zero_points, g_idx
    while weights and not weights[-1]:
        weights.pop()
    used = [i for i in weights if i]
    g = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", *weights], ["Y"], domain="com.microsoft", **attrs)],
        "one",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, attrs["K"]])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, attrs["N"]])],
        [inits[i] for i in used],
    )
    one = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    )
    s = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": np.eye(attrs["K"], dtype=np.float32)})[0]


def nbits_nodes(model_path):
    m = onnx.load(str(model_path), load_external_data=False)
    return [n for n in m.graph.node if n.op_type == "MatMulNBits"]


def export_exit(fam, e, out, src, **kw):
    out.mkdir(parents=True, exist_ok=True)
    X.write_exit(fam, e, out, src, ONNXExport(**kw))
    return out / "model.onnx"


# --- the weights: exact ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,gs,k,sym,act_order",
    [
        (4, 32, 128, True, False),
        (4, 32, 128, False, False),
        (4, 128, 576, True, False),
        (4, 128, 576, False, False),
        (4, 128, 576, False, True),
        (4, 32, 96, True, True),
        (4, -1, 576, False, False),
        (8, 128, 576, True, False),
        (8, 32, 128, False, False),
    ],
)
def test_matmulnbits_decodes_to_our_grid_bit_for_bit(bits, gs, k, sym, act_order):
    """Random codes, zeros and fp16 scales (any value our quantizers could make) through
    nbits_arrays, then onnxruntime's own kernel on the identity: exactly our dequantized weight."""
    g = torch.Generator().manual_seed(bits * 1000 + k + gs + sym + 2 * act_order)
    n, spec = 40, QuantSpec(bits, gs, sym)
    groups = spec.groups(k)
    g_idx = torch.arange(k) // spec.width(k)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    zeros = (
        torch.full((groups, n), 1 << (bits - 1))
        if sym
        else torch.randint(0, 2**bits, (groups, n), generator=g)
    )
    grid = Grid.make(
        torch.randint(0, 2**bits, (k, n), generator=g),
        (torch.rand(groups, n, generator=g) * 0.05 + 1e-3).half(),
        zeros,
        g_idx.int(),
        spec,
    )
    lay = layout_of(grid)
    arrays = nbits_arrays(grid, lay, np.float32)
    assert ("zero_points" in arrays) == (act_order or not sym) and ("g_idx" in arrays) == act_order
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales", "zero_points" if "zero_points" in arrays else "", "g_idx" if act_order else ""],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=lay.block,
        accuracy_level=0,
    )
    m = helper.make_model(
        helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, n])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
    )
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"A": np.eye(k, dtype=np.float32)}
    )[0]
    np.testing.assert_array_equal(y.T, grid.dequantize().numpy())


def test_packed_codes_are_low_nibble_first():
    codes = np.array([[1, 2, 3, 4, 5]], np.uint8)
    assert _pack(codes, 4).tolist() == [[0x21, 0x43, 0x05]] and _pack(codes, 8).tolist() == codes.tolist()


@pytest.fixture(scope="module")
def k576_dir(tmp_path_factory):
    """A tiny family whose down_proj reads 576 columns (ruyi-mini's hidden size: not a multiple
    of 128)."""
    return build_tiny(
        tmp_path_factory.mktemp("k576") / "model",
        layers=3,
        exits=(1, 2),
        hidden=128,
        intermediate=576,
        heads=4,
        kv_heads=2,
    )


FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (True, True), (False, True)])
def test_exported_matmulnbits_weights_are_our_grids(k576_dir, tmp_path, sym, act_order):
    """Every MatMulNBits node of an exported GPTQ graph (group 128 over K = 576, sym/asym,
    act-order) decodes in onnxruntime to the family's dequantized weights, bit for bit; q/k/v and
    gate/up run as one node over their stacked rows."""
    fam = family(k576_dir, "gptq", 4, 128, sym, heads=True, act_order=act_order)
    assert any(g.act_order for g in fam.grids.values()) == act_order
    path = export_exit(fam, 2, tmp_path / "e", k576_dir, accuracy_level=0)
    nodes = nbits_nodes(path)
    assert len(nodes) == 3 * 4 + 1  # q/k/v and gate/up read 128 columns: one group, in order
    assert any(len(n.input) > 4 and n.input[4] for n in nodes) == act_order  # g_idx: down_proj
    assert_nodes_decode_to_grids(fam, path, exit_index=1)
    assert any(helper.get_attribute_value(a) == 576 for n in nodes for a in n.attribute if a.name == "K")


def test_act_order_grids_keep_their_own_nodes(tiny_dir, tmp_path):
    """q/k/v with act-order groups (each its own g_idx) are not stacked: one node each, exact."""
    fam = family(tiny_dir, "gptq", 4, 32, True, act_order=True)
    assert fam.grids["model.layers.0.self_attn.q_proj"].act_order
    path = export_exit(fam, 3, tmp_path / "e", tiny_dir, accuracy_level=0)
    assert len(nbits_nodes(path)) == 4 * 7
    assert_nodes_decode_to_grids(fam, path, exit_index=1)


def assert_nodes_decode_to_grids(fam, path, exit_index: int) -> None:
    seen = []
    for node in nbits_nodes(path):
        prefix = node.input[1].removesuffix(".nbits.B")
        layer, _, tail = (
            prefix.rpartition(".self_attn.") if ".self_attn." in prefix else prefix.rpartition(".mlp.")
        )
        kind = prefix[len(layer) + 1 :]
        modules = [f"{layer}.{m}" for m in FUSED[kind]] if kind in FUSED else [prefix]
        w = identity_decode(path, node).T
        want = np.concatenate([fam.weight(m).numpy() for m in modules])
        np.testing.assert_array_equal(w, want, err_msg=prefix)
        seen += modules
    assert sorted(seen) == sorted(m for m in fam.grids if fam.config.exit_map(exit_index).rename(m))


# --- graphs against our reference ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny_dir", "tiny_shared_dir", "tied_dir"])
def src(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_every_exit_gives_our_logits(src, weights, tmp_path, eval_ids):
    """float32 graph of the float family against our model: max abs diff < 1e-4. GPTQ 4-bit (heads
    too) at full-precision compute (accuracy level 0) against our dequantized model: < 1e-3."""
    if weights == "float32":
        fam, ref, tol, kw = load_family(src), load_model(src), 1e-4, {}
    else:
        fam = family(src, "gptq", 4, 32, False, heads=True)
        ref, tol, kw = fam.dequantized_model(), 1e-3, {"accuracy_level": 0}
    ids = eval_ids[:2, :48]
    for e in fam.config.exits:
        path = export_exit(fam, e, tmp_path / f"e{e}", src, **kw)
        onnx.checker.check_model(str(path), full_check=True)
        got = run(session(path), ids.numpy(), fam.config)["logits"]
        want = ref(ids, exit=e).logits.detach()
        assert np.abs(got - want.numpy()).max() < tol, e
        assert kl_top1(want, torch.from_numpy(got))[1] == 1.0


def test_decode_with_the_cache_equals_a_fresh_prefill(tiny_dir, tmp_path, eval_ids):
    fam = family(tiny_dir, "rtn", 4, 32, True)
    ids = eval_ids[:2, :40].numpy()
    for dtype in ("float32", "float16"):
        s = session(export_exit(fam, 5, tmp_path / dtype, tiny_dir, dtype=dtype, accuracy_level=0))
        full = run(s, ids, fam.config)["logits"]
        past = run(s, ids[:, :32], fam.config)
        for t in range(32, 40):  # one token at a time on the growing cache
            step = run(s, ids[:, t : t + 1], fam.config, past, start=t)
            np.testing.assert_allclose(
                step["logits"][:, 0].astype(np.float32),
                full[:, t].astype(np.float32),
                atol=1e-4 if dtype == "float32" else 2e-2,
            )
            past = step
        assert past["present.0.key"].shape[2] == 40


def test_float16_graph_stays_close_to_the_float32_reference(tiny_dir, tmp_path, eval_ids):
    fam = load_family(tiny_dir)
    ids = eval_ids[:2, :64]
    got = run(
        session(export_exit(fam, 5, tmp_path / "h", tiny_dir, dtype="float16")), ids.numpy(), fam.config
    )["logits"]
    assert got.dtype == np.float16
    kl, top1 = kl_top1(
        load_model(tiny_dir)(ids, exit=5).logits.detach(), torch.from_numpy(got.astype(np.float32))
    )
    assert kl < 1e-3 and top1 > 0.99


def test_right_padding_leaves_each_row_as_alone(tiny_dir, tmp_path, eval_ids):
    """A padded batch (right padding, as onnxruntime-genai pads one) gives each row the logits it
    gets alone, at its real positions."""
    fam = load_family(tiny_dir)
    s = session(export_exit(fam, 3, tmp_path / "p", tiny_dir))
    short, long_ = eval_ids[0, :20].numpy(), eval_ids[1, :28].numpy()
    ids = np.stack([np.concatenate([short, np.zeros(8, np.int64)]), long_])
    mask = np.ones((2, 28), np.int64)
    mask[0, 20:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(28), (2, 1))}
    for i in range(4):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, fam.config.head_dim), np.float32)
    both = s.run(["logits"], feeds)[0]
    assert np.abs(both[0, :20] - run(s, short[None], fam.config)["logits"][0]).max() < 1e-4
    assert np.abs(both[1] - run(s, long_[None], fam.config)["logits"][0]).max() < 1e-4


def test_int8_head_and_embedding(tiny_dir, tmp_path, eval_ids):
    """head int8: the float head as an 8-bit grid (its MatMulNBits decodes to that grid exactly);
    embed int8: rows with one scale each. Both stay close to the float model."""
    fam = family(tiny_dir, "rtn", 4, 32, True)
    path = export_exit(fam, 5, tmp_path / "q8", tiny_dir, head="int8", embed="int8", accuracy_level=0)
    head = [n for n in nbits_nodes(path) if n.input[1] == "lm_head.2.int8.B"]
    assert len(head) == 1
    want = int8_grid(fam.tensors["lm_head.2.weight"]).dequantize().numpy()
    np.testing.assert_array_equal(identity_decode(path, head[0]).T, want)
    m = onnx.load(str(path), load_external_data=False)
    assert "model.embed_tokens.weight" not in {t.name for t in m.graph.initializer}
    ids = eval_ids[:2, :64]
    got = torch.from_numpy(run(session(path), ids.numpy(), fam.config)["logits"])
    kl, top1 = kl_top1(fam.dequantized_model()(ids, exit=5).logits.detach(), got)
    assert kl < 1e-2 and top1 > 0.97


@pytest.mark.parametrize("sym", [True, False])
def test_embedding_gathered_from_the_tied_heads_grid(tied_dir, tmp_path, eval_ids, sym):
    """embed head: the embedding rows are the quantized head's rows (GatherBlockQuantized on the
    head's own MatMulNBits bytes): no embedding bytes, logits of our model with that embedding."""
    fam = family(tied_dir, "rtn", 4, 32, sym, heads=True)
    path = export_exit(fam, 5, tmp_path / "h", tied_dir, embed="head", accuracy_level=0)
    onnx.checker.check_model(str(path), full_check=True)
    inits = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert not any(n.startswith("model.embed_tokens") for n in inits)
    float_embed = export_exit(fam, 5, tmp_path / "f", tied_dir, accuracy_level=0)
    size = fam.config.vocab_size * fam.config.hidden_size * 4
    assert (float_embed.parent / "model.onnx.data").stat().st_size - (
        path.parent / "model.onnx.data"
    ).stat().st_size >= size
    deq = fam.dequantized_model()
    deq.model.embed_tokens.weight = torch.nn.Parameter(fam.weight("lm_head"))
    ids = eval_ids[:2, :48]
    got = run(session(path), ids.numpy(), fam.config)["logits"]
    assert np.abs(got - deq(ids, exit=5).logits.detach().numpy()).max() < 1e-3
    with pytest.raises(UserError, match="embed head: gathers the embedding from the head's grid"):
        X.check_onnx(fam.config, {}, ONNXExport(embed="head"))


# --- onnxruntime-genai ---------------------------------------------------------------------------


@needs_genai
def test_genai_greedy_generation_is_our_pytorch_generation(src, tmp_path, eval_ids):
    """32 greedy tokens through onnxruntime-genai (the folder as exported) are the tokens of our
    dequantized model with its KV cache, and genai's logits at every step are ours."""
    from ruyi_quant.exporters.onnx.runner import load

    fam = family(src, "rtn", 4, 32, True, heads=True)
    deq = fam.dequantized_model()
    e = fam.config.exits[1]
    export_exit(fam, e, tmp_path / "g", src, accuracy_level=0)
    model, got_exit, _, _ = load(tmp_path / "g", None)
    assert got_exit == e
    prompt = eval_ids[2, :12].tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    cache, ids, ours, theirs = deq.new_cache(), torch.tensor([prompt]), [], []
    while not gen.is_done():
        logits = deq(ids, exit=e, cache=cache).logits[0, -1]  # genai's: those it picks from next
        np.testing.assert_allclose(
            np.asarray(gen.get_logits()).reshape(-1), logits.detach().numpy(), atol=1e-3
        )
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
        ours.append(int(logits.argmax()))
        ids = torch.tensor([[ours[-1]]])
    assert len(theirs) == 32 and theirs == ours


@needs_genai
def test_generate_cli_runs_each_exit_of_the_multi_exit_folder(tiny_dir, tmp_path, eval_ids):
    """`ruyi-quant generate --onnx` on the multi-exit folder: the exit given, greedy, the tokens
    of that exit's standalone folder."""
    from ruyi_quant.exporters.onnx.runner import generate_ids, load

    fam = family(tiny_dir, "rtn", 4, 32, True)
    X.export(fam, tmp_path / "x", tiny_dir, ONNXExport(multi=True, accuracy_level=0), progress=False)
    prompt = eval_ids[3, :10].tolist()
    for e in fam.config.exits:
        multi, got_e, _, eos = load(tmp_path / "x" / "multi-exit", e)
        alone, *_ = load(tmp_path / "x" / f"exit-{e}", e)
        assert got_e == e
        assert generate_ids(multi, prompt, 16, eos) == generate_ids(alone, prompt, 16, eos)
    sampled = [generate_ids(multi, prompt, 16, eos, sample=True, seed=s, temperature=2.0) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # sampling: seeded, and not greedy's
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruyi_quant.cli",
            "generate",
            "--onnx",
            str(tmp_path / "x"),
            "--exit",
            "3",
            "--max-new-tokens",
            "5",
            "--no-chat",
            "def f(x):",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "[exit 3:" in r.stderr and "new]" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruyi_quant.cli",
            "generate",
            "--onnx",
            str(tmp_path / "x"),
            "--exit",
            "4",
            "hi",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"ruyi-quant: error: --exit 4: {tmp_path / 'x'} holds exits [2, 3, 5]"
    )


# --- the multi-exit folder, metadata ------------------------------------------------------------


def test_multi_exit_folder_stores_each_tensor_once_and_runs_like_the_standalone_graphs(
    src, tmp_path, eval_ids
):
    fam = family(src, "rtn", 4, 32, False, heads=True)
    info = X.export(fam, tmp_path / "x", src, ONNXExport(multi=True), progress=False)
    multi = info["multi"]
    d = tmp_path / "x" / "multi-exit"
    # every distinct tensor of the exits' graphs once: the data file is their bytes plus alignment
    distinct = {}
    for e in fam.config.exits:
        for t in onnx.load(
            str(tmp_path / "x" / f"exit-{e}" / "model.onnx"), load_external_data=False
        ).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                distinct[t.name] = int({x.key: x.value for x in t.external_data}["length"])
    assert multi["tensor_bytes"] == sum(distinct.values())
    assert sum(x["tensor_bytes"] for x in info["exits"]) > multi["tensor_bytes"]
    assert (d / "family.onnx.data").stat().st_size <= 1.02 * multi["tensor_bytes"]
    ids = eval_ids[:1, :32].numpy()
    for e in fam.config.exits:
        onnx.checker.check_model(str(d / f"exit-{e}.onnx"), full_check=True)
        got = run(session(d / f"exit-{e}.onnx"), ids, fam.config)["logits"]
        np.testing.assert_array_equal(
            got, run(session(tmp_path / "x" / f"exit-{e}" / "model.onnx"), ids, fam.config)["logits"]
        )
    cfg = json.loads((d / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == f"exit-{fam.config.exits[-1]}.onnx"


def test_every_graph_carries_the_provenance(tiny_dir, tmp_path):
    fam = family(tiny_dir, "rtn", 4, 32, False)
    X.export(fam, tmp_path / "x", tiny_dir, ONNXExport(multi=True), progress=False)
    want = provenance(fam)
    paths = [(e, tmp_path / "x" / f"exit-{e}" / "model.onnx") for e in fam.config.exits] + [
        (e, tmp_path / "x" / "multi-exit" / f"exit-{e}.onnx") for e in fam.config.exits
    ]
    for e, p in paths:
        props = {x.key: x.value for x in onnx.load(str(p), load_external_data=False).metadata_props}
        assert props["ruyi.exit"] == str(e) and json.loads(props["ruyi.exits"]) == fam.config.exits
        assert (
            props["ruyi.method"] == "rtn" and props["ruyi.bits"] == "4" and props["ruyi.group_size"] == "32"
        )
        assert props["ruyi.source_model"] == want["source_model"] == str(tiny_dir)
        assert props["ruyi.quantized_by"].startswith("ruyi-quant ")


# --- refusals -------------------------------------------------------------------------------------


def test_settings_onnx_cannot_hold_are_refused_before_writing(tiny_dir, tmp_path):
    fam3 = family(tiny_dir, "rtn", 3, 32, True)
    with pytest.raises(UserError, match=r"^bits 3 \(.*\): ONNX's MatMulNBits holds 4- and 8-bit grids"):
        X.export(fam3, tmp_path / "a", tiny_dir, ONNXExport(), progress=False)
    assert not (tmp_path / "a").exists()
    X.check_onnx(fam3.config, fam3.modules, ONNXExport(weights="float"))  # dequantized: fine
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruyi_quant.cli",
            "export",
            str(tiny_dir),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "b"),
            "--weights",
            "gptq",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--weights gptq" in r.stderr
    assert not (tmp_path / "b").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruyi_quant.cli",
            "export",
            str(tiny_dir),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "c"),
            "--accuracy-level",
            "7",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--accuracy-level" in r.stderr and not (tmp_path / "c").exists()


def test_a_recipe_with_an_onnx_export_of_3_bit_grids_fails_before_quantizing(tiny_dir, tmp_path):
    from ruyi_quant.preflight import check_exports
    from ruyi_quant.recipe import Job

    job = Job(
        name="j",
        model=str(tiny_dir),
        output=str(tmp_path / "o"),
        quantize=Quantize(method="rtn", bits=3),
        export=[{"format": "onnx"}],
    )
    with pytest.raises(UserError, match=r"export\[0\]: bits 3"):
        check_exports(job, load_family(tiny_dir).config, "jobs[0]")


def test_a_missing_onnx_package_is_one_line(monkeypatch, capsys, tiny_dir, tmp_path):
    import importlib.util

    from ruyi_quant.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("onnxruntime_genai", "onnxruntime") else real(name, *a),
    )
    assert main(["generate", "--onnx", str(tmp_path), "hi"]) == 2
    assert capsys.readouterr().err == (
        "ruyi-quant: error: generate --onnx needs onnxruntime_genai (pip install 'ruyi-quant[onnx]')\n"
    )
    assert main(["export", str(tiny_dir), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "ruyi-quant: error: --format onnx needs onnxruntime (pip install 'ruyi-quant[onnx]')\n"
    )
    assert not (tmp_path / "o").exists()

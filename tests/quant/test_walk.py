"""GPTQ and AWQ read the family one layer (or head) at a time from a lazy checkpoint
and move each layer's grids to disk as they go; the results are bit for bit those of
calibrating a model loaded whole."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_ids

from ruyi_quant.pipeline import quantize
from ruyi_quant.quant import walk as walk_mod
from ruyi_quant.recipe import Quantize
from ruyi_quant.store.checkpoint import Spill, load_family, load_model, save_family

SETTINGS = {
    "gptq": Quantize(method="gptq", bits=4, group_size=32, heads=True),
    "gptq-act-order": Quantize(
        method="gptq", bits=4, group_size=32, sym=False, heads=True, gptq={"act_order": True}
    ),
    "awq": Quantize(
        method="awq", bits=4, group_size=32, sym=False, heads=True, awq={"grid": 4, "max_tokens": 256}
    ),
}


def written(fam, path, tokenizer_dir) -> bytes:
    path.mkdir()
    save_family(fam, path, tokenizer_dir)
    return (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
@pytest.mark.parametrize("how", list(SETTINGS))
def test_streamed_calibration_equals_in_memory(request, tmp_path, which, how):
    """A lazy family read layer by layer, with its grids spilled to disk, gives the checkpoint
    that calibrating the fully loaded float32 model gives, byte for byte."""
    src = request.getfixturevalue(which)
    settings = SETTINGS[how]
    calib = calib_ids(src, 4, 64)
    whole = quantize(load_model(src), settings, calib, progress=False)
    (tmp_path / "spill").mkdir()
    spill = Spill(tmp_path / "spill")
    streamed = quantize(load_family(src), settings, calib, progress=False, spill=spill)
    assert spill.files > 0 and all(type(g).__name__ == "LazyGrid" for g in streamed.grids.values())
    assert list(streamed.grids) == list(whole.grids)  # GGUF's tensor order
    a, b = written(whole, tmp_path / "whole", src), written(streamed, tmp_path / "streamed", src)
    assert len(a) > 100_000 and a == b


def test_one_layer_at_a_time(tiny_dir, monkeypatch):
    """When calibration materialises a layer or a head, nothing else of the family is held in
    float (the exit norms excepted), and every source tensor is read once."""
    import ruyi_quant.store.safetensors as stream

    loads, held = [], []
    real_load = walk_mod.Weights.load
    reads: dict = {}
    real_read = stream._read

    def load(self, prefix):
        live = {
            n.rsplit(".", 1)[0]
            for n, p in self.model.named_parameters()
            if p.device.type != "meta" and ".norms." not in n
        }
        held.append(live)
        loads.append(prefix)
        return real_load(self, prefix)

    def read(path, dtype, shape, start, end):
        reads[(path, start)] = reads.get((path, start), 0) + 1
        return real_read(path, dtype, shape, start, end)

    monkeypatch.setattr(walk_mod.Weights, "load", load)
    monkeypatch.setattr(stream, "_read", read)
    fam = load_family(tiny_dir)
    quantize(fam, SETTINGS["gptq"], calib_ids(tiny_dir, 4, 64), progress=False)
    cfg = fam.config
    assert {p for p in loads if p.startswith("lm_head")} == {f"lm_head.{j}" for j in range(len(cfg.exits))}
    assert sum(p.startswith("model.layers.") for p in loads) == cfg.num_layers
    assert all(not live for live in held), held
    assert reads and max(reads.values()) == 1


@pytest.mark.parametrize("how", ["awq", "rtn"])
def test_quantizing_leaves_the_source_family_unchanged(tiny_dir, how):
    fam = load_family(tiny_dir)
    names = list(fam.tensors)
    settings = SETTINGS["awq"] if how == "awq" else Quantize(method="rtn", bits=4, group_size=32)
    q = quantize(fam, settings, calib_ids(tiny_dir, 4, 64), progress=False)
    assert q.grids and list(fam.tensors) == names and not fam.grids


def test_per_layer_seconds_are_recorded(tiny_dir):
    fam = quantize(load_family(tiny_dir), SETTINGS["gptq"], calib_ids(tiny_dir, 4, 64), progress=False)
    secs = fam.stats["layer_seconds"]
    cfg = fam.config
    steps = [s.prefix for s in cfg.walk()] + [f"lm_head.{j}" for j in range(len(cfg.exits))]
    assert sorted(secs) == sorted(steps) and all(v >= 0 for v in secs.values())


def test_chunked_scale_search_matches_whole():
    """AWQ's scale search over a weight too large to take whole (a head) gives the scale that
    searching it whole gives."""
    from ruyi_quant.quant.awq import search_scales
    from ruyi_quant.quant.plan import QuantSpec

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=g) * torch.linspace(0.1, 4, 96)
    ws = [torch.randn(200, 96, generator=g) * 0.05, torch.randn(56, 96, generator=g) * 0.05]
    spec = QuantSpec(4, 32, True)
    s1, r1, l1 = search_scales(x, ws, spec, 8)
    s2, r2, l2 = search_scales(x, ws, spec, 8, chunk=96 * 50)  # 50 rows at a time
    assert r1 == r2 and r1 is not None and torch.allclose(s1, s2)
    # chunks compute x (Q - W)^T, whole weights x Q^T - x W^T: float32 cancellation differs
    assert torch.allclose(torch.tensor(l1), torch.tensor(l2), rtol=2e-3)


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_streamed_evaluation_equals_whole_models(request, which):
    """Evaluation reads one layer of each family at a time and gets the numbers of comparing the
    two whole dequantized models, bit for bit."""
    from ruyi_quant.evaluate import compare, compare_families

    src = request.getfixturevalue(which)
    ref = load_family(src)
    fam = quantize(load_family(src), SETTINGS["gptq"], calib_ids(src, 4, 64), progress=False)
    windows = calib_ids(src, 5, 32)
    exits = ref.config.exits
    whole = compare(ref.dequantized_model(), fam.dequantized_model(), windows, exits, 2, False)
    streamed = compare_families(ref, fam, windows, exits, 2, False)
    assert whole == streamed
    assert all(0 < streamed[e]["kl"] for e in exits)  # quantized: not the same model
    part = compare_families(ref, fam, windows, exits[:1], 2, False)  # an early exit alone
    assert part == {exits[0]: whole[exits[0]]}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_plain_checkpoints_open_lazily(tmp_path, tiny_dir, monkeypatch, arch):
    """A plain Llama/Qwen2 checkpoint opens like a family (nothing read until used) and holds what
    loading it whole gives: the same tensors by Ruyi's names, in the same order and dtype, a
    Llama layer's missing q/k/v biases as zeros."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    import ruyi_quant.store.safetensors as stream
    from ruyi_quant.quant.family import QuantizedFamily

    torch.manual_seed(0)
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=arch == "llama-tied",
    )
    hf = Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, tmp_path / "m" / f)
    reads = []
    real = stream._read
    monkeypatch.setattr(stream, "_read", lambda *a: reads.append(a) or real(*a))
    lazy = load_family(tmp_path / "m")
    assert not reads
    whole = QuantizedFamily.from_model(load_model(tmp_path / "m", dtype=None))
    assert list(lazy.tensors) == list(whole.tensors)
    for name, t in whole.tensors.items():
        got = lazy.tensors[name]
        assert got.dtype == t.dtype == torch.bfloat16 and torch.equal(got, t), name
    if arch.startswith("llama"):
        assert not lazy.tensors["model.layers.1.self_attn.k_proj.bias"].any()


def test_lazy_rtn_rounds_a_tied_head_from_the_embedding(tied_dir):
    """A head tied to the embedding has no tensor of its own in the checkpoint: lazy RTN rounds the
    embedding, as in-memory RTN does (found exporting ONNX: it raised KeyError 'lm_head.weight')."""
    from ruyi_quant.quant.plan import QuantSpec, make_plan
    from ruyi_quant.quant.rtn import rtn_family

    lazy = quantize(
        load_family(tied_dir), Quantize(method="rtn", bits=4, group_size=32, heads=True), progress=False
    )
    model = load_model(tied_dir)
    mem = rtn_family(model, make_plan(model, QuantSpec(4, 32, True), heads=True), progress=False)
    assert torch.equal(lazy.weight("lm_head"), mem.weight("lm_head"))

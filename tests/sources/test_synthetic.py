"""Scale in CI (small): loading is lazy, streamed writes equal in-memory ones byte for byte,
the synthetic Ruyi-7B has Ruyi-7B's sizes. The full-size run is benchmarks/scale.py."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from ruyi_quant.cli import main
from ruyi_quant.sources.synthetic import numel, synthetic_config, tensor_shapes, write_synthetic
from ruyi_quant.store.checkpoint import load_family, save_family
from ruyi_quant.store.safetensors import LazyTensors, entry_of, write_safetensors, write_sharded


class Reads:
    """Counts tensor reads (every read of a tensor's data goes through stream._read)."""

    def __init__(self, monkeypatch):
        import ruyi_quant.store.safetensors as stream

        self.count = 0
        real = stream._read

        def counting(*a, **k):
            self.count += 1
            return real(*a, **k)

        monkeypatch.setattr(stream, "_read", counting)


def test_opening_a_family_reads_no_tensor(tiny_dir, tmp_path, monkeypatch, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--out", str(q)]) == 0
    reads = Reads(monkeypatch)
    for path in (tiny_dir, q):
        fam = load_family(path)
        fam.stored_size()  # what inspect shows: headers only
        [fam.stored_size(fam.exit_tensor_names(j)) for j in range(len(fam.config.exits))]
    assert main(["inspect", str(q)]) == 0
    assert reads.count == 0
    fam.tensors["model.norms.0.weight"]
    assert reads.count == 1  # and a read is one read
    fam.grids["model.layers.0.mlp.up_proj"].dequantize()
    assert reads.count == 1 + 4  # qweight, qzeros, scales, g_idx


def test_streamed_rtn_equals_in_memory_rtn(tiny_dir, tmp_path):
    """The CLI's lazy RTN (each weight rounded as the family is written) and the in-memory
    quantize() of a loaded model write the same bytes."""
    from ruyi_quant.pipeline import quantize
    from ruyi_quant.recipe import Quantize
    from ruyi_quant.store.checkpoint import load_model

    lazy = tmp_path / "lazy"
    assert (
        main(
            [
                "quantize",
                str(tiny_dir),
                "--bits",
                "4",
                "--group-size",
                "32",
                "--asym",
                "--heads",
                "--out",
                str(lazy),
            ]
        )
        == 0
    )
    fam = quantize(load_model(tiny_dir), Quantize(bits=4, group_size=32, sym=False, heads=True), None, False)
    (tmp_path / "mem").mkdir()
    save_family(fam, tmp_path / "mem", tiny_dir)
    a, b = (lazy / "model.safetensors").read_bytes(), (tmp_path / "mem" / "model.safetensors").read_bytes()
    assert len(a) > 1_000_000 and a == b


def test_streamed_safetensors_are_save_files_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "model.layers.10.w": torch.randn(7, 5, generator=g),
        "model.layers.2.w": torch.randn(3),
        "q": torch.randint(-9, 9, (4, 4), generator=g, dtype=torch.int32),
        "s": torch.randn(2, 3, generator=g).half(),
        "b": torch.randn(5, generator=g).bfloat16(),
        "z": torch.arange(6, dtype=torch.uint8),
    }
    save_file(state, tmp_path / "a.safetensors", metadata={"format": "pt"})
    write_safetensors(
        tmp_path / "b.safetensors", [entry_of(k, v) for k, v in state.items()], {"format": "pt"}
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_sharded_writes_read_back(tmp_path):
    from ruyi_quant.store.safetensors import weight_files

    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(100, generator=g) for i in range(10)}
    paths = write_sharded(tmp_path, [entry_of(k, v) for k, v in state.items()], max_bytes=1000)
    assert len(paths) == 5  # 400 bytes each, two per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    lazy = LazyTensors(weight_files(tmp_path))
    assert sorted(lazy) == sorted(state) and all(torch.equal(lazy[k], v) for k, v in state.items())


def test_synthetic_ruyi_7b_has_ruyi_7bs_sizes():
    """FACTS.md: 28 trunk layers of 233M, four branch layers, five separate 151936 x 3584 heads,
    the embedding: about 10.7B parameters, 21.5 GB in bf16."""
    shapes = tensor_shapes(synthetic_config())
    layer = sum(numel(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    assert 232e6 < layer < 234e6
    assert sum(1 for n in shapes if n.startswith("lm_head.")) == 5
    total = sum(numel(s) for s in shapes.values())
    assert 10.6e9 < total < 10.8e9 and 21.2e9 < 2 * total < 21.6e9
    assert synthetic_config(3, [1, 2])["early_exit_points"] == [1, 2]
    assert synthetic_config(6)["early_exit_points"] == [5]


def test_a_small_synthetic_family_loads(tmp_path):
    write_synthetic(
        tmp_path,
        depth=3,
        exits=[1, 2],
        shard_bytes=200_000,
        progress=False,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    fam = load_family(tmp_path)
    assert fam.config.exits == [1, 2] and fam.config.hidden_size == 64
    emb = fam.tensors["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and 0.015 < emb.float().std() < 0.025
    assert abs(fam.tensors["model.norms.0.weight"].float().mean() - 1) < 0.05
    meta = json.loads((tmp_path / "ruyi_quant.json").read_text())
    assert meta["synthetic"] is True
    logits = fam.dequantized_model().forward(torch.tensor([[1, 2, 3]]), exit=1).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()

"""The familial forward agrees with stock transformers, exit by exit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ruyi_quant.errors import UserError
from ruyi_quant.exporters.hf import export_exit
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.store.checkpoint import load_model


def bf16_roundtrip(model):
    for p in model.parameters():
        p.data = p.data.bfloat16().float()
    return model


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_exported_exit_matches_transformers(which, request, tmp_path, eval_ids):
    """bf16 per-exit export loaded by Qwen2ForCausalLM == our forward at that exit (fp32)."""
    src = request.getfixturevalue(which)
    model = bf16_roundtrip(load_model(src))
    fam = QuantizedFamily.from_model(model)
    ids = eval_ids[:2, :64]
    for e in model.config.exits:
        out = tmp_path / f"exit-{e}"
        out.mkdir()
        export_exit(fam, e, out, src, weights="float", float_dtype=torch.bfloat16)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == e + 1
        assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
        hf = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            ours = model(ids, exit=e).logits
            theirs = hf(ids).logits
            assert (ours - theirs).abs().max().item() < 1e-4
            # with KV cache: prefill 40 tokens, then one token at a time
            cache, hcache = model.new_cache(), None
            o = model(ids[:, :40], exit=e, cache=cache).logits
            h = hf(ids[:, :40], use_cache=True)
            hcache = h.cache if hasattr(h, "cache") else h.past_key_values
            steps_ours, steps_hf = [o], [h.logits]
            for t in range(40, 48):
                steps_ours.append(model(ids[:, t : t + 1], exit=e, cache=cache).logits)
                h = hf(ids[:, t : t + 1], cache=hcache, use_cache=True)
                steps_hf.append(h.logits)
            a, b = torch.cat(steps_ours, 1), torch.cat(steps_hf, 1)
            assert (a - b).abs().max().item() < 1e-4
            assert (a - ours[:, :48]).abs().max().item() < 1e-4  # cache == no cache


@pytest.mark.parametrize(
    "which,arch", [("tiny_dir", "Qwen2ForCausalLM"), ("tiny_smollm_dir", "LlamaForCausalLM")]
)
def test_autotokenizer_and_automodel_load_every_export_as_the_source(
    which, arch, request, tmp_path, eval_ids
):
    """As a user loads our outputs (transformers' quick-start: AutoTokenizer, AutoModelForCausalLM):
    the saved family and every exit's export, float and GPTQ, give the source tokenizer's ids, and
    the float exports our logits. A tokenizer that transformers' Qwen2Tokenizer would override
    (SmolLM2's digits-first pre-tokenizer) makes the export a Llama with attention biases."""
    from conftest import MIXED_TEXT
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from ruyi_quant.quant.plan import QuantSpec, make_plan
    from ruyi_quant.quant.rtn import rtn_family
    from ruyi_quant.store.checkpoint import save_family

    src = request.getfixturevalue(which)

    def ids_of(d):
        return AutoTokenizer.from_pretrained(d)(MIXED_TEXT, add_special_tokens=False)["input_ids"]

    want = PreTrainedTokenizerFast.from_pretrained(src)(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    qwen2_ids = Qwen2Tokenizer.from_pretrained(src)(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert (qwen2_ids == want) == (arch == "Qwen2ForCausalLM")  # the case is real: they differ
    model = bf16_roundtrip(load_model(src))
    fam = rtn_family(model, make_plan(model, QuantSpec(4, 32, True)), progress=False)
    (tmp_path / "fam").mkdir()
    save_family(fam, tmp_path / "fam", src)
    assert ids_of(tmp_path / "fam") == want
    ids = eval_ids[:1, :48]
    for e in model.config.exits:
        for weights, f in (("float", QuantizedFamily.from_model(model)), ("gptq", fam)):
            out = tmp_path / f"{weights}-{e}"
            out.mkdir()
            export_exit(f, e, out, src, weights=weights)
            cfg = json.loads((out / "config.json").read_text())
            assert cfg["architectures"] == [arch] and ids_of(out) == want, (weights, e)
            assert ("gptqmodel" in (out / "README.md").read_text()) == (weights == "gptq")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"float-{e}", dtype=torch.float32).eval()
        assert type(hf).__name__ == arch
        with torch.no_grad():
            # measured max |diff| 1.4e-6 (both archs)
            assert (model(ids, exit=e).logits - hf(ids).logits).abs().max().item() < 1e-4
    if arch == "LlamaForCausalLM":  # q/k/v biases kept, o_proj's zero
        t = load_file(tmp_path / "float-3" / "model.safetensors")
        assert t["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
        assert not t["model.layers.0.self_attn.o_proj.bias"].any()


def test_forward_exits_equals_single_exit(tiny_dir, eval_ids):
    model = load_model(tiny_dir)
    ids = eval_ids[:2, :32]
    with torch.no_grad():
        allx = model.forward_exits(ids)
        assert sorted(allx) == model.config.exits
        for e in model.config.exits:
            assert torch.equal(allx[e], model(ids, exit=e).logits)
        # exits really differ: each has its own branch, norm and head
        assert not torch.allclose(allx[2], allx[5])


def test_batch_with_left_padding(tiny_dir, eval_ids):
    model = load_model(tiny_dir)
    a, b = eval_ids[0, :20], eval_ids[1, :12]
    ids = torch.stack([a, torch.cat([torch.zeros(8, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(20), torch.cat([torch.zeros(8), torch.ones(12)])]).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, exit=3, attention_mask=mask, position_ids=pos).logits
        alone_a = model(a[None], exit=3).logits
        alone_b = model(b[None], exit=3).logits
    assert (batched[0] - alone_a[0]).abs().max() < 1e-4
    assert (batched[1, 8:] - alone_b[0]).abs().max() < 1e-4


def test_cache_belongs_to_one_exit(tiny_dir, eval_ids):
    model = load_model(tiny_dir)
    cache = model.new_cache()
    with torch.no_grad():
        model(eval_ids[:1, :8], exit=2, cache=cache)
        with pytest.raises(UserError, match="belongs to exit 2"):
            model(eval_ids[:1, 8:9], exit=5, cache=cache)


def test_unknown_exit_is_refused(tiny_dir, eval_ids):
    model = load_model(tiny_dir)
    with pytest.raises(UserError, match=r"exits at layers \[2, 3, 5\]"):
        model(eval_ids[:1, :8], exit=4)


def _tiny_hf_kw():
    return dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_plain_checkpoints_load_as_one_exit(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**_tiny_hf_kw())).eval()
    else:
        hf = LlamaForCausalLM(LlamaConfig(**_tiny_hf_kw(), tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.exits == [2] and model.config.source_type == arch
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_sharded_checkpoint(tiny_dir, tmp_path, eval_ids):
    """A model.safetensors.index.json with two shards loads like the single file."""
    state = load_file(tiny_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    a, b = load_model(tiny_dir), load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(a(eval_ids[:1, :16], exit=3).logits, b(eval_ids[:1, :16], exit=3).logits)

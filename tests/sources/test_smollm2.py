"""The GGUF metadata scan that finds one string field without parsing the whole file."""

from __future__ import annotations

import pytest
from conftest import needs_smollm2

from ruyi_quant.errors import UserError
from ruyi_quant.sources.smollm2 import gguf_string


def test_a_string_field_is_found_past_arrays_of_every_kind(tmp_path):
    """Fields after arrays of strings, of integers and of floats, and after scalars of several
    widths, read as gguf's own reader reads them; a missing key or a non-string is None."""
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("a.u32", 7)
    w.add_array("a.tokens", ["x", "yy", "zzz" * 50, "ü"])
    w.add_array("a.ids", [1, 2, 3])
    w.add_array("a.scores", [0.5, -1.0])
    w.add_float64("a.f64", 2.5)
    w.add_bool("a.flag", True)
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_string("z.last", "end ✓")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    assert gguf_string(path, "tokenizer.ggml.pre") == r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert gguf_string(path, "z.last") == "end ✓"
    assert gguf_string(path, "general.architecture") == "llama"
    assert gguf_string(path, "a.u32") is None and gguf_string(path, "no.such.key") is None


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_string(tmp_path / "x.gguf", "tokenizer.ggml.pre")


@needs_smollm2
def test_smollm2s_string_fields_read_as_gguf_reads_them():
    import gguf

    from ruyi_quant.sources.smollm2 import smollm2_gguf_path

    path = smollm2_gguf_path()
    fields = gguf.GGUFReader(str(path)).fields
    strings = {k: f.contents() for k, f in fields.items() if f.types == [gguf.GGUFValueType.STRING]}
    assert "tokenizer.ggml.pre" in strings and len(strings) >= 5
    assert {k: gguf_string(path, k) for k in strings} == strings


@needs_smollm2
def test_smollm2_converts_to_the_tensors_transformers_makes(tmp_path):
    """Our GGUF reading gives every tensor transformers' GGUF loader gives, bit for bit, under
    the same names (q/k rows back in checkpoint order), and the written checkpoint's logits
    match transformers' model of the GGUF."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ruyi_quant.sources.smollm2 import gguf_to_plain_checkpoint, smollm2_gguf_path

    path = smollm2_gguf_path()
    info = gguf_to_plain_checkpoint(path, tmp_path / "plain", check=True)
    assert info["max_abs_logit_diff"] < 1e-3
    ours = load_file(str(tmp_path / "plain" / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

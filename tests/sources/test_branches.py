"""The family builder (make-familial) on tiny models, and ruyi-mini itself (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import needs_smollm2

from ruyi_quant import text as data
from ruyi_quant.evaluate import exit_perplexities
from ruyi_quant.runtime.generate import greedy_chat
from ruyi_quant.sources import branches, ruyi_mini
from ruyi_quant.store.checkpoint import load_model


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruyi_quant.cli", *map(str, args)], capture_output=True, text=True
    )


def test_branch_at_equals_full_layer(tiny_dir, eval_ids):
    """Training runs the branch at a few positions only; it must be the full layer there."""
    model = load_model(tiny_dir)
    ids = eval_ids[:2, :64]
    with torch.no_grad():
        x, kw = model.prepare(ids)
        for layer in model.model.layers[:2]:
            x = layer(x, **kw)
        full = model.branch(0)(x, **kw)
        pos = torch.tensor([[0, 5, 17, 63], [3, 4, 40, 62]])
        cos, sin = model.model.rotary_emb(x[:1], torch.arange(64).unsqueeze(0))
        part = branches.branch_at(model.branch(0), x, pos, cos, sin)
    assert (full[torch.arange(2).unsqueeze(1), pos] - part).abs().max() < 1e-5


def test_int8_asset_round_trip(tiny_dir):
    model = load_model(tiny_dir)
    tensors = ruyi_mini.branch_tensors(model)
    assert tensors and all(k.startswith(("model.eelayers.", "model.norms.")) for k in tensors)
    assert not any(k.startswith("model.norms.2") for k in tensors)  # the last exit's norm
    back = ruyi_mini.decode_int8(ruyi_mini.encode_int8(tensors))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        if v.dim() == 2:  # at most half a step of each row's grid
            step = v.abs().amax(1, keepdim=True) / 127
            assert ((back[k] - v).abs() <= step / 2 + 1e-7).all(), k
        else:
            assert torch.equal(back[k], v.bfloat16().float())


def test_make_familial_cli(tiny_dir, tmp_path, eval_ids):
    """A plain Qwen2 model (exit 5 of the tiny family) becomes a family with trained branches;
    the last exit is the plain model, untouched."""
    plain = tmp_path / "plain"
    r = cli("export", tiny_dir, "--exits", "5", "--weights", "float", "--dtype", "float32", "--out", plain)
    assert r.returncode == 0, r.stderr
    r = cli(
        "make-familial",
        plain / "exit-5",
        "--exits",
        "2,3",
        "--steps",
        "30",
        "--windows",
        "8",
        "--seq-len",
        "64",
        "--out",
        tmp_path / "fam",
    )
    assert r.returncode == 0, r.stderr
    fam = load_model(tmp_path / "fam")
    src = load_model(plain / "exit-5")
    assert fam.config.exits == [2, 3, 5] and fam.config.shared_heads
    report = json.loads((tmp_path / "fam" / "ruyi_quant.json").read_text())
    assert set(report["ppl_bf16"]) == {"2", "3", "5"}
    r = cli("inspect", tmp_path / "fam")  # the family is a model every command takes
    assert r.returncode == 0 and "exits [2, 3, 5]" in r.stdout, r.stderr
    with torch.no_grad():
        last = fam(eval_ids[:1], exit=5).logits
        ref = src(eval_ids[:1]).logits
        assert (last - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding only
        # the branch was trained away from its initial copy of trunk layer 2
        w0 = src.model.layers[2].mlp.down_proj.weight
        w1 = fam.branch(0).mlp.down_proj.weight.float()
        assert (w1 - w0).abs().max() > 1e-3


def test_make_familial_refuses_a_family(tiny_dir, tmp_path):
    r = cli("make-familial", tiny_dir, "--exits", "2", "--out", tmp_path / "x")
    assert r.returncode == 2 and "already a family" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@needs_smollm2
def test_ruyi_mini_assembles_and_every_exit_runs():
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import load_tokenizer

    path = resolve_model("builtin:ruyi-mini")
    model = load_model(path, torch.bfloat16)
    assert model.config.exits == list(ruyi_mini.RUYI_MINI_EXITS) and model.config.shared_heads
    tok = load_tokenizer(path)
    ev = data.text_windows(tok, "builtin:pydoc/eval", 2, 128)
    ppl = exit_perplexities(model, ev, progress=False)
    values = [ppl[e] for e in ruyi_mini.RUYI_MINI_EXITS]
    assert all(a > b for a, b in zip(values, values[1:])), ppl  # quality rises with depth
    assert values[0] < 20 * values[-1], ppl
    # the last exit is SmolLM2 as transformers loads it from the GGUF, up to bf16 rounding
    plain = load_model(resolve_model("builtin:smollm2"))
    with torch.no_grad():
        a = plain(ev[:1]).logits.float().log_softmax(-1)
        b = model(ev[:1]).logits.float().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert kl < 0.02 and top1 > 0.9, (kl, top1)
    assert "Paris" in greedy_chat(model, tok, "What is the capital of France?", max_new_tokens=12)


@pytest.mark.slow
@needs_smollm2
def test_ruyi_mini_assembly_tells_its_steps_in_a_log(tmp_path, capsys):
    """First use assembles ruyi-mini for seconds: a log (stderr not a terminal) gets a line as
    it starts and one as it ends, with the steps done, and no carriage returns."""
    ruyi_mini.assemble_ruyi_mini(tmp_path / "m")
    err = capsys.readouterr().err
    steps = ruyi_mini.ASSEMBLY_STEPS
    assert f"assemble builtin:ruyi-mini: {steps} steps ..." in err
    assert f"assemble builtin:ruyi-mini: {steps} steps in " in err
    assert "\r" not in err
    assert (tmp_path / "m" / "config.json").is_file()

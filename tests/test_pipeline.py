"""Recipes end to end through the CLI: outputs, manifest, skipping, inspect numbers."""

from __future__ import annotations

import json

import pytest
import torch

from ruyi_quant.cli import main
from ruyi_quant.errors import UserError
from ruyi_quant.recipe.load import load_recipe
from ruyi_quant.text import SPLITS, builtin_text, load_text, split_of

RECIPE = """\
defaults:
  model: {model}
  eval: {{source: {eval_source}, samples: 3, seq_len: 64, batch: 2}}
jobs:
  - name: rtn8
    output: out/rtn8
    quantize: {{method: rtn, bits: 8, group_size: 32, heads: true}}
    export:
      - {{format: hf, exits: [2, 5]}}
      - {{format: gguf, exits: [2, 5], multi: true}}
      - {{format: onnx, exits: [5], multi: true}}
  - name: rtn4
    output: out/rtn4
    quantize: {{method: rtn, bits: 4, group_size: 64}}
    eval: {{samples: 2}}
"""


def write_recipe(tmp_path, model, eval_source="builtin:pydoc/eval"):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model, eval_source=eval_source))
    return path


def test_defaults_merge_into_jobs(tmp_path):
    recipe, base = load_recipe(write_recipe(tmp_path, "builtin:tiny"))
    a, b = recipe.jobs
    assert a.model == b.model == "builtin:tiny" and base == tmp_path
    assert a.eval.samples == 3 and b.eval.samples == 2 and b.eval.seq_len == 64  # deep merge
    assert a.quantize.heads and not b.quantize.heads


def test_run_recipe_then_skip_then_redo(tiny_dir, tmp_path, capsys):
    jsonl = tmp_path / "eval.jsonl"
    text = builtin_text("pydoc/eval")
    jsonl.write_text("\n".join(json.dumps({"text": text[i : i + 2000]}) for i in range(0, 20000, 2000)))
    recipe = write_recipe(tmp_path, tiny_dir, "eval.jsonl")
    assert main(["run", str(recipe)]) == 0
    out = tmp_path / "out" / "rtn8"
    meta = json.loads((out / "ruyi_quant.json").read_text())
    assert meta["kind"] == "job" and meta["summary"]["status"] == "done"
    arts = meta["files"]
    for f in [
        "family/model.safetensors",
        "hf-gptq/exit-2/model.safetensors",
        "hf-gptq/exit-5/config.json",
        "eval.json",
        "eval.md",
        "gguf-q8_0/exit-2/Modelfile",
        "gguf-q8_0/exit-5/model-e5-q8_0.gguf",
        "gguf-q8_0/model-family-q8_0.gguf",
        "onnx-int8/exit-5/model.onnx",
        "onnx-int8/exit-5/model.onnx.data",
        "onnx-int8/exit-5/genai_config.json",
        "onnx-int8/multi-exit/exit-5.onnx",
        "onnx-int8/multi-exit/family.onnx.data",
    ]:
        assert f in arts
    assert not (out / "gguf-q8_0" / "exit-3").exists()
    assert not (out / "hf-gptq" / "exit-3").exists()
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["exit"] for r in rows] == [2, 3, 5]
    for r in rows:  # 8-bit with 8-bit heads is close; the quantized family is smaller
        assert r["kl"] < 1e-3 and r["top1"] > 0.98 and r["bytes_quant"] < 0.5 * r["bytes_ref"]
    rows4 = json.loads((tmp_path / "out" / "rtn4" / "eval.json").read_text())["rows"]
    assert all(r4["kl"] > r8["kl"] for r4, r8 in zip(rows4, rows))
    capsys.readouterr()

    # second run: both jobs complete and unchanged -> skipped, files untouched
    mtime = (out / "eval.json").stat().st_mtime_ns
    assert main(["run", str(recipe)]) == 0
    assert capsys.readouterr().out.count("skipped") >= 2
    assert (out / "eval.json").stat().st_mtime_ns == mtime

    # a damaged artifact makes the job run again
    (out / "eval.md").write_text("tampered")
    assert main(["run", str(recipe), "--only", "rtn8"]) == 0
    assert (out / "eval.md").read_text().startswith("Method `rtn`")


def test_inspect_counts(tiny_dir, tmp_path, capsys):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert main(["inspect", str(tiny_dir), "--json", str(tmp_path / "i.json")]) == 0
    got = json.loads((tmp_path / "i.json").read_text())
    for j, e in enumerate(cfg["early_exit_points"]):
        params = v * h + (e + 1) * layer + h + v * h
        assert got["per_exit"][j][2] == f"{params / 1e6:.2f}"
        assert got["per_exit"][j][3] == f"{params * 4 / 1e6:.2f}"  # float32 checkpoint
    family = v * h + (6 + 2) * layer + 3 * h + 3 * v * h
    assert got["family"]["params"] == family
    assert "exits [2, 3, 5]" in capsys.readouterr().out


def test_builtin_splits_are_disjoint():
    for corpus in ("pydoc", "stdlib"):
        parts = {s: builtin_text(f"{corpus}/{s}") for s in SPLITS}
        assert all(len(t) > 10_000 for t in parts.values()), {s: len(t) for s, t in parts.items()}
        # no paragraph of held-out text stands in the text before it
        for held, earlier in (("calib", ["train"]), ("eval", ["train", "calib"])):
            paras = [p for p in parts[held].split("\n\n") if len(p) > 80]
            assert len(paras) > 20
            for p in paras:
                assert all(p not in parts[e] for e in earlier), p[:80]


def test_a_mixed_source_takes_windows_from_each_part(tiny_dir, tmp_path):
    """`A + B`: n windows split evenly (the first part one more for odd n), each part's windows
    the ones it gives alone; a file whose own name holds " + " is one source."""
    from ruyi_quant.text import check_source, load_tokenizer, text_windows

    tok = load_tokenizer(tiny_dir)
    mixed = text_windows(tok, "builtin:pydoc/calib + builtin:stdlib/calib", 5, 32, 0)
    a, b = (
        text_windows(tok, "builtin:pydoc/calib", 3, 32, 0),
        text_windows(tok, "builtin:stdlib/calib", 2, 32, 0),
    )
    assert torch.equal(mixed, torch.cat([a, b]))
    odd = tmp_path / "a + b.txt"
    odd.write_text("words and more words " * 40)
    assert text_windows(tok, str(odd), 2, 16, 0).shape == (2, 16)
    with pytest.raises(UserError, match="missing.txt: no such text file"):
        check_source(f"builtin:pydoc/calib + {tmp_path / 'missing.txt'}")


def test_split_of_is_stable_and_proportional():
    """A document's split is a function of its name alone (the same in a process with another
    hash seed) and the splits take their shares of many names (within 2 points)."""
    import subprocess
    import sys

    doc_names = [f"doc-{i}" for i in range(4000)]
    here = [split_of(n) for n in doc_names]
    code = "from ruyi_quant.text import split_of; print(' '.join(split_of(f'doc-{i}') for i in range(4000)))"
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "12345"},
    ).stdout.split()
    assert there == here
    for split, (lo, hi) in SPLITS.items():
        share = here.count(split) / len(here)
        assert abs(share - (hi - lo) / 100) < 0.02, (split, share)


def test_cli_eval_and_export(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(tiny_dir),
                "--out",
                str(q),
                "--bits",
                "4",
                "--group-size",
                "32",
                "--override",
                "lm_head.*:bits=8",
            ]
        )
        == 0
    )
    assert main(["export", str(q), "--out", str(tmp_path / "hf"), "--exits", "3"]) == 0
    assert (
        json.loads((tmp_path / "hf" / "exit-3" / "config.json").read_text())["quantization_config"][
            "dynamic"
        ]["+:^lm_head$"]["bits"]
        == 8
    )
    assert (
        main(
            [
                "eval",
                str(tiny_dir),
                str(q),
                "--samples",
                "2",
                "--seq-len",
                "64",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [r["exit"] for r in report["rows"]] == [2, 3, 5]
    assert all(r["tokens"] == 128 for r in report["rows"])
    # the reported KL is the mean per-token KL of the saved family against its source, computed
    # here independently on the same windows (measured: identical; allowed 1e-5 relative)
    from conftest import kl_top1

    from ruyi_quant.recipe import Eval
    from ruyi_quant.store.checkpoint import load_family, load_model
    from ruyi_quant.text import eval_windows

    ids = eval_windows(tiny_dir, Eval(samples=2, seq_len=64))
    with torch.no_grad():
        ref = load_model(tiny_dir).forward_exits(ids)
        out = load_family(q).dequantized_model().forward_exits(ids)
    for r in report["rows"]:
        kl = kl_top1(ref[r["exit"]], out[r["exit"]])[0]
        assert abs(r["kl"] - kl) < 1e-5 * kl, (r["exit"], r["kl"], kl)
    assert "KL" in capsys.readouterr().out
    assert load_text(str(tmp_path / "ev" / "eval.md")).startswith("Method `rtn`")
    assert torch.tensor([r["ppl_quant"] for r in report["rows"]]).isfinite().all()


def test_sizes_are_what_the_files_hold(tiny_dir, tmp_path, capsys):
    """quantize prints the bytes on disk of what it wrote; inspect's "as stored" bytes are the
    tensor bytes of the family's safetensors file (its size minus the 8-byte length and the JSON
    header) and its "on disk" bytes the files' sizes. A bf16 source: the family in memory holds
    fp32 floats, the file bf16 ones, and the figures follow the file."""
    import os

    from ruyi_quant.store.checkpoint import load_model, save_model

    src = tmp_path / "bf16"
    src.mkdir()
    save_model(load_model(tiny_dir), src, dtype=torch.bfloat16, tokenizer_dir=tiny_dir)
    q = tmp_path / "q"
    capsys.readouterr()
    assert (
        main(["quantize", str(src), "--out", str(q), "--method", "rtn", "--bits", "4", "--group-size", "32"])
        == 0
    )
    disk = sum(os.path.getsize(p) for p in q.rglob("*") if p.is_file())
    assert f"{disk / 1e6:.2f} MB on disk" in capsys.readouterr().out
    st = q / "model.safetensors"
    header = int.from_bytes(st.read_bytes()[:8], "little")
    tensor_bytes = os.path.getsize(st) - 8 - header
    assert main(["inspect", str(q), "--json", str(tmp_path / "i.json")]) == 0
    got = json.loads((tmp_path / "i.json").read_text())
    assert got["family"]["bytes"] == tensor_bytes and got["disk_bytes"] == disk
    assert "weights MB (as stored)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "smoothed"),
    [
        (["--method", "gptq"], False),
        (["--method", "gptq", "--awq-scales"], True),
    ],
)
def test_quantize_awq_scales_smooth_the_family_before_gptq(tiny_dir, tmp_path, args, smoothed):
    """`quantize --awq-scales` folds AWQ's scales in before GPTQ: the family records the scale
    search's ratios and its norms hold the folded scales; without it the norms are the model's."""
    from ruyi_quant.store.checkpoint import load_family, load_model

    out = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_dir), "--out", str(out), *args, "--samples", "4", "--seq-len", "32"]) == 0
    )
    fam = load_family(out)
    float_state = load_model(tiny_dir).state_dict()
    norms = [k for k in fam.tensors if k.endswith("input_layernorm.weight")]
    changed = [k for k in norms if not torch.equal(fam.tensors[k].float(), float_state[k].float())]
    assert fam.method == "gptq" and bool(fam.stats.get("awq_scale_ratios")) == smoothed
    assert bool(changed) == smoothed, changed


@pytest.mark.parametrize(
    ("settings", "want"),
    [
        ({"method": "gptq"}, False),
        ({"method": "gptq", "gguf": "q4_k_m"}, True),
        ({"method": "gptq", "gguf": "q4_k_m", "gptq": {"act_order": False}}, False),
        ({"method": "gptq", "gptq": {"act_order": True}}, True),
    ],
)
def test_act_order_is_on_by_default_for_llama_cpps_blocks_only(tiny_dir, settings, want):
    """The GPTQ that quantize runs: act-order by default for K-quant blocks (fixed groups, and it
    generalised best there), off for plain grids, as set when set."""
    from ruyi_quant.model.familial import skeleton
    from ruyi_quant.pipeline import calibration_method, checked_plan
    from ruyi_quant.recipe import Quantize
    from ruyi_quant.store.checkpoint import load_model

    q = Quantize(**settings)
    model = skeleton(load_model(tiny_dir).config)
    method, _ = calibration_method(q, model, checked_plan(model, q))
    assert method.opts["act_order"] is want

"""Every bad input: one line on stderr naming the input, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import error_lines
from safetensors.torch import load_file, save_file

from ruyi_quant.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("ruyi-quant: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def nothing_written(parent, name="out"):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if name in p.name]


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A writable copy of the tiny checkpoint to break in one way."""
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors")


CASES = {
    "missing path": (lambda d: shutil.rmtree(d), ["no such model directory"]),
    "missing key": (lambda d: edit_config(d, hidden_size=None), ["missing required key 'hidden_size'"]),
    "unknown type": (lambda d: edit_config(d, model_type="mamba"), ["unsupported model_type 'mamba'"]),
    "bad exits": (lambda d: edit_config(d, early_exit_points=[2, 7]), ["early_exit_points"]),
    "missing tensor": (
        lambda d: edit_tensors(d, lambda s: s.pop("model.norms.1.weight")),
        ["missing tensor model.norms.1.weight"],
    ),
    "wrong shape": (
        lambda d: edit_tensors(
            d, lambda s: s.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(300, 128))
        ),
        ["model.layers.2.mlp.up_proj.weight has shape [300, 128], expected [320, 128]"],
    ),
    "nan": (
        lambda d: edit_tensors(
            d, lambda s: s["model.eelayers.1.self_attn.k_proj.weight"].__setitem__((0, 0), float("nan"))
        ),
        ["model.eelayers.1.self_attn.k_proj.weight contains NaN"],
    ),
    "inf": (
        lambda d: edit_tensors(d, lambda s: s["lm_head.2.weight"].__setitem__((3, 3), float("inf"))),
        ["lm_head.2.weight contains Inf"],
    ),
    "pickle only": (
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        ["never loads pickles"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint(case, broken, tmp_path, capsys):
    breaker, needles = CASES[case]
    breaker(broken)
    code, err = run_cli(capsys, "quantize", broken, "--out", tmp_path / "out")
    assert_one_line_error(code, err, *needles)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "5"], "--bits 5: bits must be one of [2, 3, 4, 8]"),
        (["--group-size", "100"], "--group-size 100: group_size must be one of"),
        (["--override", "lm_head*:bitz=8"], "unknown setting 'bitz'"),
        (["--override", "model.layer.*:bits=8"], "override pattern 'model.layer.*' matches no module"),
        (["--method", "magic"], "--method"),
    ],
)
def test_bad_quantize_settings(args, needle, tiny_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "quantize", tiny_dir, "--out", tmp_path / "out", *args)
    assert_one_line_error(code, err, needle)
    assert nothing_written(tmp_path)


def test_exit_the_model_lacks(tiny_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "export", tiny_dir, "--out", tmp_path / "out", "--exits", "2,4")
    assert_one_line_error(code, err, "exit 4", "[2, 3, 5]")
    assert nothing_written(tmp_path)


def test_output_dir_not_ours(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "quantize", tiny_dir, "--out", out, "--bits", "8")
    assert_one_line_error(code, err, "not written by ruyi-quant")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_of_ours_needs_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "quantize", tiny_dir, "--out", out, "--bits", "8")[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, err = run_cli(capsys, "quantize", tiny_dir, "--out", out, "--bits", "4")
    assert_one_line_error(code, err, "pass --force")
    assert (out / "model.safetensors").read_bytes() == before
    assert run_cli(capsys, "quantize", tiny_dir, "--out", out, "--bits", "4", "--force")[0] == 0
    assert json.loads((out / "ruyi_quant.json").read_text())["quantization"]["common"]["bits"] == 4


def test_eval_does_not_replace_an_output_without_force(tiny_dir, tmp_path, capsys):
    """`eval --out DIR` never replaces an existing quantized family with eval files."""
    q = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_dir, "--out", q, "--bits", "8")[0] == 0
    before = sorted(p.name for p in q.iterdir())
    code, err = run_cli(capsys, "eval", tiny_dir, q, "--samples", "1", "--seq-len", "32", "--out", q)
    assert_one_line_error(code, err, str(q))
    assert sorted(p.name for p in q.iterdir()) == before


def test_an_empty_marker_is_not_ours(tiny_dir, tmp_path, capsys):
    """A directory whose ruyi_quant.json is just {} is not ours: --force must not delete the
    user's other files in it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ruyi_quant.json").write_text("{}")
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "quantize", tiny_dir, "--out", out, "--bits", "8", "--force")
    assert_one_line_error(code, err, "not written by ruyi-quant")
    assert (out / "precious.txt").read_text() == "keep me"


def test_export_refuses_to_replace_its_own_input(tiny_dir, tmp_path, capsys):
    """`export FAM --out FAM --force` must not replace its own input."""
    q = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_dir, "--out", q, "--bits", "8")[0] == 0
    before = (q / "model.safetensors").read_bytes()
    code, err = run_cli(capsys, "export", q, "--out", q, "--force")
    assert_one_line_error(code, err, "input")
    assert (q / "model.safetensors").read_bytes() == before


RECIPE_ERRORS = {
    "misspelt key": (
        "jobs:\n  - name: a\n    model: builtin:tiny\n    output: o\n"
        "    quantize:\n      bits: 4\n      groupsize: 32\n",
        ["recipe.yaml:7", "unknown key 'groupsize'", "did you mean 'group_size'"],
    ),
    "unknown top key": ("jobz: []\n", ["recipe.yaml:1", "unknown key 'jobz'"]),
    "bad bits": (
        "jobs:\n  - name: a\n    model: builtin:tiny\n    output: o\n    quantize: {bits: 5}\n",
        ["recipe.yaml:5", "jobs[0].quantize.bits"],
    ),
    "missing output": ("jobs:\n  - name: a\n    model: builtin:tiny\n", ["jobs[0].output", "Field required"]),
    "bad yaml": ("jobs:\n  - name: [a\n", ["recipe.yaml", "not valid YAML"]),
    "unknown builtin": (
        "jobs:\n  - {name: a, model: 'builtin:huge', output: o}\n",
        ["builtin:huge", "unknown built-in model"],
    ),
    "missing calib file": (
        "jobs:\n  - name: a\n    model: builtin:tiny\n    output: o\n    eval: {source: nowhere.txt}\n",
        ["nowhere.txt", "no such text file"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_ERRORS))
def test_bad_recipe(case, tmp_path, capsys):
    text, needles = RECIPE_ERRORS[case]
    (tmp_path / "recipe.yaml").write_text(text)
    code, err = run_cli(capsys, "run", tmp_path / "recipe.yaml")
    assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_missing_recipe(tmp_path, capsys):
    code, err = run_cli(capsys, "run", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "nope.yaml: no such recipe file")


def test_group_size_larger_than_k(tiny_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "quantize", tiny_dir, "--out", tmp_path / "out", "--group-size", "256")
    assert_one_line_error(code, err, "group_size 256 is larger than", "128 input columns")
    assert nothing_written(tmp_path)


def test_act_order_refused_by_awq_export(tiny_dir, tmp_path, capsys):
    code, _ = run_cli(
        capsys,
        "quantize",
        tiny_dir,
        "--out",
        tmp_path / "q",
        "--method",
        "gptq",
        "--act-order",
        "--group-size",
        "32",
        "--samples",
        "4",
        "--seq-len",
        "64",
    )
    assert code == 0
    code, err = run_cli(capsys, "export", tmp_path / "q", "--weights", "awq", "--out", tmp_path / "out")
    assert_one_line_error(
        code, err, "weights: awq cannot hold act-order", "export weights: gptq", "act_order: false"
    )
    assert nothing_written(tmp_path)


def test_too_few_calibration_tokens_warns(tiny_dir, tmp_path, capsys):
    code = main(
        [
            "quantize",
            str(tiny_dir),
            "--out",
            str(tmp_path / "q"),
            "--method",
            "gptq",
            "--samples",
            "2",
            "--seq-len",
            "64",
            "--group-size",
            "32",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert (
        "ruyi-quant: warning: calibration has 128 tokens, fewer than the widest layer's 320 input columns"
    ) in err and "use at least 320 tokens" in err


def test_awq_has_no_hessian_to_warn_about(tiny_dir, tmp_path, capsys):
    """AWQ searches scales on its sampled rows; it builds no Hessian, so the GPTQ warning
    about too few tokens for one would be wrong there."""
    code = main(
        [
            "quantize",
            str(tiny_dir),
            "--out",
            str(tmp_path / "q"),
            "--method",
            "awq",
            "--samples",
            "2",
            "--seq-len",
            "64",
            "--group-size",
            "32",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "Hessian" not in err

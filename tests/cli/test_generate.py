"""The runtime's commands: `generate --family`, `chat` (the exit switched between turns) and
`eval --runtime int4`, checked against the runtime called directly and against the streamed
evaluation (a different code path: layer by layer, float32)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ruyi_quant.cli import main
from ruyi_quant.runtime.generate import generate
from ruyi_quant.runtime.model import int4_model
from ruyi_quant.store.checkpoint import load_family
from ruyi_quant.text import chat_ids, load_tokenizer

SAMPLE = ["--sample", "--seed", "7", "--temperature", "1.5", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def qdir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "q"
    assert (
        main(
            [
                "quantize",
                str(tiny_dir),
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--heads",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def expected(qdir, tiny_dir, messages, exit, dtype=torch.bfloat16):
    tok = load_tokenizer(tiny_dir)
    model = int4_model(load_family(qdir), dtype=dtype, progress=False)
    out = generate(
        model,
        [chat_ids(tok, messages)],
        exit,
        10,
        eos={tok.eos_token_id},
        pad_id=0,
        sample=True,
        seed=7,
        temperature=1.5,
        top_k=50,
    )[0]
    return tok.decode(out)


def test_generate_prints_the_runtimes_answer(qdir, tiny_dir, capsys):
    assert main(["generate", "--family", str(qdir), "--exit", "3", *SAMPLE, "hello there"]) == 0
    out, err = capsys.readouterr()
    want = expected(qdir, tiny_dir, "hello there", 3)
    assert len(set(want)) > 3  # a varied answer, not one token
    assert out == want + "\n"
    assert "[exit 3, int4 on cpu]" in err


def test_generate_batches_several_prompts(qdir, tiny_dir, capsys):
    prompts = ["hello there", "def f(x): return x"]
    assert main(["generate", "--family", str(qdir), "--exit", "2", *SAMPLE, *prompts]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(tiny_dir)
    model = int4_model(load_family(qdir), progress=False)
    rows = generate(
        model,
        [chat_ids(tok, p) for p in prompts],
        2,
        10,
        eos={tok.eos_token_id},
        sample=True,
        seed=7,
        temperature=1.5,
        top_k=50,
    )
    assert out.splitlines()[-2:] == [f"[{i}] {tok.decode(r)}" for i, r in enumerate(rows)]


def test_chat_switches_exits_between_turns_and_keeps_the_conversation(qdir, tiny_dir, capsys, monkeypatch):
    lines = "first question\n/exit 2\nsecond question\n/exit 9\n/exits\n/reset\nthird\n/quit\nnever\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--family", str(qdir), *SAMPLE]) == 0
    out, err = capsys.readouterr()
    a1 = expected(qdir, tiny_dir, [{"role": "user", "content": "first question"}], 5)
    h = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "second question"},
    ]
    a2 = expected(qdir, tiny_dir, h, 2)
    a3 = expected(qdir, tiny_dir, [{"role": "user", "content": "third"}], 2)
    assert out == f"ruyi@5> {a1}\nruyi@2> {a2}\nruyi@2> {a3}\n"
    assert a2 != expected(qdir, tiny_dir, h, 5)  # the switch changed the answer
    assert "[exit 9: the model has exits at layers [2, 3, 5]" in err  # a bad exit: the chat goes on
    assert "[exits [2, 3, 5]; now 2]" in err and "[conversation cleared]" in err


def test_runtime_eval_matches_the_streamed_eval_in_float32(qdir, tiny_dir, tmp_path, capsys):
    """--dtype fp32: the float side is our reference model and the int4 side our grids exactly, so
    their perplexities are the streamed evaluation's (another code path: layer by layer) up to
    float32 summation order (measured relative difference ~1e-6; bound 1e-4)."""
    common = ["--samples", "2", "--seq-len", "64", "--batch", "2"]
    assert main(["eval", str(tiny_dir), str(qdir), *common, "--out", str(tmp_path / "plain")]) == 0
    assert (
        main(
            [
                "eval",
                str(tiny_dir),
                str(qdir),
                *common,
                "--runtime",
                "int4",
                "--dtype",
                "fp32",
                "--prefill",
                "16",
                "--decode-tokens",
                "4",
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "rt"),
            ]
        )
        == 0
    )
    plain = {r["exit"]: r for r in json.loads((tmp_path / "plain" / "eval.json").read_text())["rows"]}
    rt = json.loads((tmp_path / "rt" / "runtime.json").read_text())
    assert [r["exit"] for r in rt["rows"]] == [2, 3, 5]
    for r in rt["rows"]:
        p = plain[r["exit"]]
        assert r["ppl_float"] == pytest.approx(p["ppl_ref"], rel=1e-4)
        assert r["ppl_int4"] == pytest.approx(p["ppl_quant"], rel=1e-4)
        assert r["kl"] == pytest.approx(p["kl"], rel=1e-2, abs=1e-6)
        assert r["top1"] == pytest.approx(p["top1"], abs=1 / 128)
        for side in ("float", "int4"):
            assert r[f"prefill_tok_s_{side}"] > 0 and r[f"decode_tok_s_{side}"] > 0
            assert r[f"peak_rss_gb_{side}"] > 0
    assert rt["weights_gb"]["int4"] < rt["weights_gb"]["float"]
    md = (tmp_path / "rt" / "runtime.md").read_text()
    assert md.count("\n| ") == 1 + 3 and "ppl fp32" in md  # header + one row per exit
    out = capsys.readouterr().out
    assert all(f"{r['decode_speedup']:.2f}" in out for r in rt["rows"])  # the terminal table


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "x"], "give --family DIR"),
        (
            ["generate", "--family", "{q}", "--exit", "4", "x"],
            "exit 4: the model has exits at layers [2, 3, 5]",
        ),
        (["generate", "--family", "{q}", "--dtype", "int3", "x"], "--dtype int3"),
        (["generate", "--family", "{q}", "--max-new-tokens", "0", "x"], "--max-new-tokens 0"),
        (["chat", "--family", "{q}", "--device", "tpu"], "--device tpu"),
        (["eval", "{q}", "{q}", "--runtime", "int4"], "the reference must be the unquantized family"),
        (["eval", "{t}", "{q}", "--runtime", "int4", "--prefill", "0"], "--prefill"),
        (
            ["eval", "{t}", "{q}", "--runtime", "int4", "--prefill", "100000", "--samples", "1"],
            "--prefill 100000",
        ),
    ],
)
def test_bad_runtime_inputs_are_one_line(qdir, tiny_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(q=qdir, t=tiny_dir) for a in argv] + (
        ["--out", str(tmp_path / "o")] if argv[0] == "eval" else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ruyi-quant: error: ") and needle in err, err
    assert not (tmp_path / "o").exists()

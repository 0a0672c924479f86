"""The int4 runtime end to end on the CPU: a quantized family loaded once as int4 (one trunk),
every exit's logits against our dequantized model, generation with and without the KV cache,
batched (left-padded) against one by one, exits switched between requests."""

from __future__ import annotations

import pytest
import torch
from conftest import kl_top1, needs_smollm2

from ruyi_quant.pipeline import quantize
from ruyi_quant.recipe import GPTQOptions, Quantize
from ruyi_quant.runtime.generate import generate
from ruyi_quant.runtime.int4 import Int4Linear
from ruyi_quant.runtime.model import int4_model
from ruyi_quant.store.checkpoint import load_family


def family(src, act_order=False, **kw):
    q = Quantize(
        method="gptq" if act_order else "rtn",
        bits=4,
        group_size=32,
        heads=True,
        gptq=GPTQOptions(act_order=act_order),
        **kw,
    )
    from conftest import calib_ids

    return quantize(load_family(src), q, calib_ids(src, 8, 64) if act_order else None, progress=False)


@pytest.fixture(scope="module", params=["tiny_dir", "tiny_shared_dir", "tied_dir"])
def fam(request):
    return family(request.getfixturevalue(request.param))


def test_every_exit_gives_our_dequantized_logits(fam, eval_ids):
    """float32 compute: the kernels' own rounding only (max abs diff measured <= 5e-6; bound 1e-4),
    top-1 identical. bfloat16 compute (the runtime's default) rounds activations and scales:
    measured on four windows of 128 tokens (the test now takes two) KL <= 3.4e-4 and top-1 >=
    97.3% (the tied family, whose head is the unscaled embedding, has the flattest logits);
    asserted KL < 1e-3 and top-1 >= 95%."""
    deq = fam.dequantized_model()
    ids = eval_ids[:2, :128]
    f32, bf16 = int4_model(fam, dtype=torch.float32, progress=False), int4_model(fam, progress=False)
    with torch.no_grad():
        for e in fam.config.exits:
            ref = deq(ids, exit=e).logits
            got = f32(ids, exit=e).logits
            assert (got - ref).abs().max() < 1e-4, e
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            kl, top1 = kl_top1(ref, bf16(ids, exit=e).logits.float())
            assert kl < 1e-3 and top1 >= 0.95, (e, kl, top1)


def test_act_order_family_runs_exactly(tiny_dir, eval_ids):
    fam = family(tiny_dir, act_order=True)
    assert any(g.act_order for g in fam.grids.values())
    ids = eval_ids[:2, :64]
    with torch.no_grad():
        got = int4_model(fam, dtype=torch.float32, progress=False)(ids, exit=5).logits
        assert (got - fam.dequantized_model()(ids, exit=5).logits).abs().max() < 1e-4


def test_one_trunk_in_memory(fam):
    """Each grid becomes one Int4Linear, shared by every exit that runs it (not a copy per exit)."""
    model = int4_model(fam, progress=False)
    lins = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(lins) == len(set(map(id, lins))) == len(fam.grids)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in fam.grids)


def test_cached_generation_equals_recomputing_every_step(fam, eval_ids):
    """Sampled (so that the tokens vary; one seed for both): the same tokens with the KV cache as
    with a full forward pass per step, at every exit."""
    model = int4_model(fam, dtype=torch.float32, progress=False)
    prompts = [eval_ids[0, :9].tolist(), eval_ids[1, :15].tolist()]
    for e in fam.config.exits:
        kw = dict(sample=True, seed=3, temperature=1.5)
        a = generate(model, prompts, e, 24, **kw)
        assert a == generate(model, prompts, e, 24, use_cache=False, **kw)
        assert len(set(a[0])) > 3  # not one token repeated


def test_switching_exits_between_requests_gives_each_exits_own_result(fam, eval_ids):
    model = int4_model(fam, progress=False)
    prompt = [eval_ids[2, :12].tolist()]
    fresh = int4_model(fam, progress=False)
    alone = {e: generate(fresh, prompt, e, 12, sample=True, seed=e) for e in fam.config.exits}
    for e in fam.config.exits + fam.config.exits[::-1]:
        assert generate(model, prompt, e, 12, sample=True, seed=e) == alone[e]
    assert len({tuple(v[0]) for v in alone.values()}) > 1


def test_a_stop_token_ends_its_row_only(fam, eval_ids):
    model = int4_model(fam, dtype=torch.float32, progress=False)
    prompts = [eval_ids[0, :9].tolist(), eval_ids[1, :15].tolist()]
    free = generate(model, prompts, fam.config.exits[-1], 8, sample=True, seed=5, temperature=1.5)
    stop = free[0][3]  # row 0's fourth token, if row 1 lacks it early
    got = generate(model, prompts, fam.config.exits[-1], 8, eos={stop}, sample=True, seed=5, temperature=1.5)
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


def test_pick_greedy_top_k_top_p():
    from ruyi_quant.runtime.generate import pick

    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    assert pick(logits, False, 1.0, 0, 1.0, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = {int(pick(logits[:1], True, 1.0, 1, 1.0, g)) for _ in range(20)}
    assert draws == {1}  # top-k 1 is greedy
    draws = {int(pick(torch.tensor([[0.0, 0.1, 9.0]]), True, 1.0, 0, 0.5, g)) for _ in range(20)}
    assert draws == {2}  # top-p keeps the one likely token


@pytest.mark.slow
@needs_smollm2
def test_ruyi_mini_batched_generation_equals_one_by_one():
    """A real model (varied greedy tokens): left-padded batches give each prompt's own tokens, and
    the KV cache changes nothing, at the first and last exits."""
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import load_tokenizer, tokenize

    src = resolve_model("builtin:ruyi-mini")
    fam = quantize(load_family(src), Quantize(method="rtn", bits=4, group_size=128), progress=False)
    model = int4_model(fam, dtype=torch.float32, progress=False)
    tok = load_tokenizer(src)
    prompts = [
        tokenize(tok, t).tolist()
        for t in ("def add(a, b):", "The capital of France is", "import numpy as np\nx = np.")
    ]
    for e in (12, 29):
        batched = generate(model, prompts, e, 12)
        assert batched == [generate(model, [p], e, 12)[0] for p in prompts]
        assert batched == generate(model, prompts, e, 12, use_cache=False)
        assert all(len(set(b)) > 2 for b in batched)


def test_logits_to_keep_gives_the_last_positions(fam, eval_ids):
    """Generation asks the head for the last position only; it must be that position's logits."""
    model = int4_model(fam, dtype=torch.float32, progress=False)
    ids = eval_ids[:2, :40]
    with torch.no_grad():
        for e in fam.config.exits:
            full = model(ids, exit=e).logits
            last = model(ids, exit=e, logits_to_keep=3).logits
            assert last.shape == (2, 3, full.shape[-1])
            assert (last - full[:, -3:]).abs().max() < 1e-5


def test_static_cache_generation_equals_the_growing_cache(fam, eval_ids):
    """The fixed-size cache and mask (what CUDA graphs need) change no token: left-padded batch,
    sampled, every exit."""
    model = int4_model(fam, dtype=torch.float32, progress=False)
    prompts = [eval_ids[0, :9].tolist(), eval_ids[1, :15].tolist()]
    for e in fam.config.exits:
        kw = dict(sample=True, seed=4, temperature=1.5)
        assert generate(model, prompts, e, 16, static=True, **kw) == generate(model, prompts, e, 16, **kw)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny_dir, eval_ids):
    """torch.compile of the decode step (inductor on the CPU; CUDA graphs on a GPU), two exits on
    one model (one compile each), against eager generation. About a minute of compiling here."""
    fam = family(tiny_dir)
    model = int4_model(fam, dtype=torch.float32, progress=False)
    prompts = [eval_ids[0, :9].tolist(), eval_ids[1, :15].tolist()]
    kw = dict(sample=True, seed=5, temperature=1.5)
    for e in (fam.config.exits[0], fam.config.exits[-1], fam.config.exits[0]):
        assert generate(model, prompts, e, 12, compiled=True, **kw) == generate(model, prompts, e, 12, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path is tested above)")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_generation_gives_the_cpu_paths_greedy_tokens(fam, eval_ids, compiled):
    """bfloat16 on both, greedy, every exit: the CUDA kernels (and CUDA graphs) give the CPU
    twin's tokens."""
    cpu, gpu = int4_model(fam, progress=False), int4_model(fam, "cuda", progress=False)
    prompts = [eval_ids[0, :9].tolist(), eval_ids[1, :15].tolist()]
    for e in fam.config.exits:
        assert generate(gpu, prompts, e, 12, compiled=compiled) == generate(cpu, prompts, e, 12)


@pytest.mark.gpu
@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path is tested above)")
def test_cuda_generation_on_ruyi_mini_gives_the_cpu_paths_greedy_tokens():
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import load_tokenizer, tokenize

    src = resolve_model("builtin:ruyi-mini")
    fam = quantize(load_family(src), Quantize(method="rtn", bits=4, group_size=128), progress=False)
    tok = load_tokenizer(src)
    prompts = [tokenize(tok, t).tolist() for t in ("def add(a, b):", "The capital of France is")]
    cpu, gpu = int4_model(fam, progress=False), int4_model(fam, "cuda", progress=False)
    for e in (12, 29):
        assert generate(gpu, prompts, e, 12, compiled=True) == generate(cpu, prompts, e, 12)

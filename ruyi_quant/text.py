"""Text for calibration and evaluation: local files or corpora that ship with Python.

Built-in corpora are split into disjoint parts by a stable hash of each document's name, so
training, calibration and evaluation text never overlap:

    builtin:pydoc/train   builtin:pydoc/calib   builtin:pydoc/eval
    builtin:stdlib/train  builtin:stdlib/calib  builtin:stdlib/eval
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from pathlib import Path

import torch

from .errors import UserError, read_json, read_text

SPLITS = {"train": (0, 80), "calib": (80, 90), "eval": (90, 100)}  # hash % 100 ranges
CORPORA = ("pydoc", "stdlib")
STDLIB_MAX_CHARS = 4_000_000


def _pydoc_docs() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def _stdlib_docs() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = {}, 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs[rel] = text
        total += len(text)
        if total > STDLIB_MAX_CHARS:
            break
    return docs


def split_of(doc_name: str) -> str:
    h = int(hashlib.sha256(doc_name.encode()).hexdigest(), 16) % 100
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= h < hi)


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


@functools.lru_cache(maxsize=8)
def builtin_text(spec: str) -> str:
    """`pydoc/eval` -> that part of the corpus as one string.

    Documents go to splits by hash; then a paragraph of calib that also stands in train, or of
    eval that stands in train or calib (even inside a longer paragraph), is dropped (pydoc repeats grammar snippets across
    topics), so held-out text is really unseen.
    """
    corpus, _, split = spec.partition("/")
    if corpus not in CORPORA:
        raise UserError(f"builtin:{spec}: unknown corpus '{corpus}' (choose {', '.join(CORPORA)})")
    if split and split not in SPLITS:
        raise UserError(f"builtin:{spec}: unknown split '{split}' (choose {', '.join(SPLITS)})")
    docs = _pydoc_docs() if corpus == "pydoc" else _stdlib_docs()
    if not split:
        return "\n\n".join(docs.values())
    earlier = ""
    for s in SPLITS:  # train, calib, eval: earlier ones win
        paras = [p for k, t in docs.items() if split_of(k) == s for p in _paragraphs(t)]
        if s != "train":
            paras = [p for p in paras if p not in earlier]
        text = "\n\n".join(paras)
        if s == split:
            return text
        earlier += "\n\n" + text
    raise AssertionError(split)


def check_source(source: str, field: str = "text") -> None:
    """Fail fast on a text source that cannot be used (before any long work starts): a missing
    file, binary data, invalid UTF-8, a JSONL line without the text field (each part of a mixed
    source)."""
    parts = source_parts(source)
    if len(parts) > 1:
        for p in parts:
            check_source(p, field)
        return
    if source.startswith("builtin:"):
        corpus, _, split = source.removeprefix("builtin:").partition("/")
        if corpus not in CORPORA or (split and split not in SPLITS):
            builtin_text(source.removeprefix("builtin:"))  # raises the precise error
        return
    if not Path(source).is_file():
        raise UserError(f"{source}: no such text file (or use builtin:pydoc/calib, builtin:stdlib/eval, ...)")
    if not load_text(source, field).strip():
        raise UserError(f"{source}: no text in it")


def load_text(source: str, field: str = "text") -> str:
    """A text source: `builtin:CORPUS/SPLIT`, a .txt file, or a .jsonl file (one `field` per line)."""
    if source.startswith("builtin:"):
        return builtin_text(source.removeprefix("builtin:"))
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: no such text file (or use builtin:pydoc/calib, builtin:stdlib/eval, ...)")
    text = read_text(path, "text file")
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{source}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UserError(f"{source}:{n}: no string field '{field}' (set the text field name)")
            parts.append(rec[field])
        return "\n\n".join(parts)
    return text


def check_tokenizer(model_dir: Path) -> None:
    """Before the work: the tokenizer beside the weights loads."""
    load_tokenizer(model_dir)


def load_tokenizer(model_dir: Path):
    """The tokenizer beside a checkpoint's weights (tokenizer.json); one that the tokenizers library
    cannot read is a UserError naming the file."""
    from transformers import PreTrainedTokenizerFast

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; put the tokenizer files beside the weights")
    read_json(path, "tokenizer")  # UTF-8 and JSON, or one line naming the file
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (Path(model_dir) / extra).is_file():
            read_json(Path(model_dir) / extra)
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    except Exception as e:  # tokenizers raises plain Exception subclasses on a bad file
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path}: the tokenizers library cannot load it ({reason})") from None


MIX = " + "  # between the parts of a mixed text source


def source_parts(source: str) -> list[str]:
    """The parts of a mixed text source (`builtin:pydoc/calib + builtin:stdlib/calib`); a file
    whose own name holds " + " is one source."""
    if MIX not in source or Path(source).is_file():
        return [source]
    return [p.strip() for p in source.split(MIX)]


def text_windows(
    tokenizer, source: str, n: int, seq_len: int, seed: int | None = None, field: str = "text"
) -> torch.Tensor:
    """Windows of a text source: up to n consecutive ones from the start (evaluation), or, given a
    seed, n at random offsets (calibration, training). [n, seq_len]. A mixed source takes n / parts
    windows from each part (the first parts one more while n does not divide), in order."""
    parts = source_parts(source)
    if len(parts) > 1:
        counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
        got = [text_windows(tokenizer, p, c, seq_len, seed, field) for p, c in zip(parts, counts) if c]
        return torch.cat(got, 0)
    ids = tokenize(tokenizer, load_text(source, field))
    if seed is None:
        return consecutive_windows(ids, n, seq_len, source)
    return random_windows(ids, n, seq_len, seed, source)


def calib_windows(model_dir: Path, cal) -> torch.Tensor:
    """The windows a Calibration section asks for (random, seeded), in the model's tokens."""
    return text_windows(load_tokenizer(model_dir), cal.source, cal.samples, cal.seq_len, cal.seed, cal.field)


def eval_windows(model_dir: Path, ev) -> torch.Tensor:
    """The windows an Eval section asks for (consecutive), in the model's tokens."""
    return text_windows(load_tokenizer(model_dir), ev.source, ev.samples, ev.seq_len, field=ev.field)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def chat_ids(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of one user message (or a conversation: [{"role", "content"}, ...]) in the
    tokenizer's chat template, ready for the answer (a message as it is when chat is False or the
    tokenizer has no template; a conversation's turns are then joined by newlines)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = "\n".join(m["content"] for m in messages)
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenize(tokenizer, text).tolist()


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """n windows of seq_len tokens at random offsets (calibration). [n, seq_len]"""
    if ids.numel() < seq_len:
        raise UserError(f"{what}: only {ids.numel()} tokens, fewer than seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, n: int, seq_len: int, what: str) -> torch.Tensor:
    """Up to n non-overlapping windows from the start (evaluation). [m, seq_len]"""
    m = min(n, ids.numel() // seq_len)
    if m == 0:
        raise UserError(f"{what}: only {ids.numel()} tokens, fewer than seq_len {seq_len}")
    return ids[: m * seq_len].view(m, seq_len)


# --- byte-level BPE pre-tokenizers ------------------------------------------------------------
# Byte-level BPE pre-tokenizers, one table for every consumer that must split text the same way:
# tokenizer.json (transformers), llama.cpp's `tokenizer.ggml.pre` name, and which transformers model
# type loads a tokenizer.json as it is.
#
# transformers 5 picks a tokenizer class from the model type (`qwen2` -> `Qwen2Tokenizer`), and
# `Qwen2Tokenizer` builds its own NFC normalizer and Qwen2 pre-tokenizer instead of reading them from
# tokenizer.json; `llama` (and our own `ruyi_qwen2`) read tokenizer.json as written. So a Qwen2-type
# export is only right for a tokenizer that IS Qwen2's (`reproduced_by_qwen2_tokenizer`).

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp name -> tokenizer.json pre_tokenizer (the ones we write ourselves)
PRE_TOKENIZER_JSON = {
    # SmolLM2 (llama.cpp `smollm`: `\p{N}` split off, then GPT-2's regex)
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    },
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer a tokenizer.json describes."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if regexes == [QWEN2_REGEX]:
        return "qwen2"
    if regexes == [LLAMA3_REGEX]:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(
        f"gguf: unknown pre-tokenizer {json.dumps(pre)[:120]}; llama.cpp would "
        "tokenize differently from transformers"
    )


def reproduced_by_qwen2_tokenizer(tokenizer_json: dict) -> bool:
    """Whether transformers' Qwen2Tokenizer (which ignores tokenizer.json's normalizer and
    pre-tokenizer) splits text as this tokenizer.json does: NFC, then Qwen2's regex."""
    norm = tokenizer_json.get("normalizer") or {}
    try:
        name = pre_tokenizer_name(tokenizer_json)
    except UserError:
        return False
    return name == "qwen2" and norm.get("type") == "NFC"

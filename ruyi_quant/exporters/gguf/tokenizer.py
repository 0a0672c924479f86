"""tokenizer.* keys of a GGUF file, from a byte-level BPE tokenizer.json (what llama.cpp needs
to tokenize exactly as transformers does)."""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf import GGUFValueType as V
from gguf import Keys

from ...errors import UserError, read_json
from ...text import pre_tokenizer_name


def tokenizer_kv(tok_dir: Path, n_vocab: int) -> list[tuple[str, object, V, V | None]]:
    """tokenizer.* key/values of a byte-level BPE tokenizer directory (tokenizer.json)."""
    path = Path(tok_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{tok_dir}: no tokenizer.json; GGUF needs the tokenizer")
    tj = read_json(path, "tokenizer")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles byte-level BPE")
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in tokens}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens) >= n_vocab:
        raise UserError(f"{path}: token id {max(tokens)} beyond the model's {n_vocab} embeddings")
    toks = [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    ttypes = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv = [
        (Keys.Tokenizer.MODEL, "gpt2", V.STRING, None),
        (Keys.Tokenizer.PRE, pre_tokenizer_name(tj), V.STRING, None),
        (Keys.Tokenizer.LIST, toks, V.ARRAY, V.STRING),
        (Keys.Tokenizer.TOKEN_TYPE, ttypes, V.ARRAY, V.INT32),
        (Keys.Tokenizer.MERGES, merges, V.ARRAY, V.STRING),
    ]
    special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=n_vocab)
    for typ, tid in sorted(special.special_token_ids.items()):
        kv.append((getattr(Keys.Tokenizer, f"{typ.upper()}_ID"), int(tid), V.UINT32, None))
    kv.append((Keys.Tokenizer.ADD_BOS, False, V.BOOL, None))
    template = special.chat_template
    if not template and (Path(tok_dir) / "chat_template.jinja").is_file():
        template = (Path(tok_dir) / "chat_template.jinja").read_text()
    if template:
        kv.append((Keys.Tokenizer.CHAT_TEMPLATE, template, V.STRING, None))
    return kv

"""Byte-level BPE pre-tokenizers, one table for every consumer that must split text the same way:
tokenizer.json (transformers), llama.cpp's `tokenizer.ggml.pre` name, and which transformers model
type loads a tokenizer.json as it is.

transformers 5 picks a tokenizer class from the model type (`qwen2` -> `Qwen2Tokenizer`), and
`Qwen2Tokenizer` builds its own NFC normalizer and Qwen2 pre-tokenizer instead of reading them from
tokenizer.json; `llama` (and our own `ruyi_qwen2`) read tokenizer.json as written. So a Qwen2-type
export is only right for a tokenizer that IS Qwen2's (`reproduced_by_qwen2_tokenizer`).
"""

from __future__ import annotations

import json

from .errors import UserError

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp name -> tokenizer.json pre_tokenizer (the ones we write ourselves)
PRE_TOKENIZER_JSON = {
    # SmolLM2 (llama.cpp `smollm`: `\p{N}` split off, then GPT-2's regex)
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
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
    raise UserError(f"gguf: unknown pre-tokenizer {json.dumps(pre)[:120]}; llama.cpp would "
                    "tokenize differently from transformers")


def reproduced_by_qwen2_tokenizer(tokenizer_json: dict) -> bool:
    """Whether transformers' Qwen2Tokenizer (which ignores tokenizer.json's normalizer and
    pre-tokenizer) splits text as this tokenizer.json does: NFC, then Qwen2's regex."""
    norm = tokenizer_json.get("normalizer") or {}
    try:
        name = pre_tokenizer_name(tokenizer_json)
    except UserError:
        return False
    return name == "qwen2" and norm.get("type") == "NFC"

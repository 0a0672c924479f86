"""Which block type llama.cpp's quantizer gives each tensor of a file, at q4_k_m, q5_k_m and q6_k.

llama.cpp (src/llama-quant.cpp) starts every weight at the file type's default block type and
gives `attn_v` and `ffn_down` six bits in the first and last eighth of the file's blocks and every
third block between (`use_more_bits`, counted over that file's block_count, so the same trunk
layer can get different types in two exits' files); `output` (and a tied `token_embd`) gets Q6_K,
or Q8_0 when its rows are not a multiple of 256. A type whose block does not divide a row falls
back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), to F16 when not even 32 does.
"""

from __future__ import annotations

from .. import names
from .kquant import TYPES

FTYPES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}  # file type -> default block type
MORE_BITS = ("q4_k_m", "q5_k_m")  # file types whose attn_v/ffn_down get Q6_K by position
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
RANK = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0")  # more bits first


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: str, k: int) -> str:
    """The type a row of k weights gets when `t` was chosen ('f16' when no block fits)."""
    if k % TYPES[t].block == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if k % TYPES[t].block == 0 else "f16"


def tensor_type(ftype: str, kind: str, block: int, n_blocks: int, k: int, tied: bool = False) -> str:
    """The block type of one tensor (kind: attn_v, ffn_down, output, token_embd, ...) of a file of
    n_blocks blocks, this one at `block` (-1 for embedding and head), k weights per row."""
    if ftype not in FTYPES:
        raise ValueError(f"file type {ftype!r}: one of {', '.join(FTYPES)}")
    if kind == "output" or (kind == "token_embd" and tied):
        return "q8_0" if k % 256 else "q6_k"
    t = FTYPES[ftype]
    if kind in ("attn_v", "ffn_down") and ftype in MORE_BITS and use_more_bits(block, n_blocks):
        t = "q6_k"
    return fallback(t, k)


def quantized(gguf_name: str) -> bool:
    """Whether llama.cpp's quantizer gives a tensor of a stock file a block type (not norms, biases)."""
    parts = gguf_name.split(".")
    return parts[-1] == "weight" and not parts[-2].endswith("_norm")


def gguf_type(ftype: str, gguf_name: str, n_blocks: int, k: int, tied: bool = False) -> str:
    """The block type of a weight named as in a stock file (blk.3.attn_v.weight, output.weight)."""
    parts = gguf_name.split(".")
    block = int(parts[1]) if parts[0] == "blk" else -1
    return tensor_type(ftype, parts[-2], block, n_blocks, k, tied)


def exit_types(cfg, ftype: str, j: int, modules, shape_of) -> dict[str, str]:
    """{familial module: block type} for the modules (linears, heads, the embedding) of exit j's
    stock file; `shape_of(module)` -> (N, K). A tied head is the embedding's entry."""
    exit_map, n = cfg.exit_map(j), cfg.exits[j] + 1
    out = {}
    for m in modules:
        plain = exit_map.rename(f"{m}.weight")
        if plain is not None and quantized(g := names.gguf_name(plain)):
            out[m] = gguf_type(ftype, g, n, shape_of(m)[1], cfg.tie_word_embeddings)
    return out


def module_types(cfg, ftype: str, modules, shape_of) -> dict[str, tuple[str, ...]]:
    """{familial module: the block types it has across every exit's file, most bits first}."""
    seen: dict[str, set[str]] = {}
    for j in range(len(cfg.exits)):
        for m, t in exit_types(cfg, ftype, j, modules, shape_of).items():
            seen.setdefault(m, set()).add(t)
    return {m: tuple(sorted(ts, key=RANK.index)) for m, ts in seen.items()}

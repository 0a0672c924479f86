"""Importance matrices for llama.cpp's K-quants, computed by us from the calibration set.

llama.cpp's `llama-imatrix` records, for every weight matrix a model multiplies, the mean
square of each input column over calibration tokens; `llama-quantize --imatrix` then weighs
each tensor's rounding error by it. Both are command-line programs that llama-cpp-python does
not ship, and its quantize API takes the matrix only as a C++ map. So:

- `collect` runs our float family over calibration windows once, layer by layer, and records
  the same statistic for every trunk and branch linear and every exit's head (a shared head sees a
  different input at each exit, so it gets one matrix per exit);
- `for_exit` names them as exit e's stock GGUF file does;
- `requantize` takes the file llama.cpp's quantizer wrote (its tensor types, its mix) and
  re-encodes each tensor that has a matrix with ggml's own `ggml_quantize_chunk` and that
  matrix, from the same F16 data: the call `llama-quantize --imatrix` makes per tensor.
  Without a matrix the call reproduces llama.cpp's bytes exactly (tests/test_gguf.py).
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ... import names
from ...quant.ggml_quantizer import quantize_rows
from ...quant.walk import Walk

HEAD_KEY = "head@{j}"  # the input of exit j's head (its norm's output)


@torch.no_grad()
def collect(source, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """{familial linear module or head@j: mean x^2 per input column} over every window, from a
    family (or a FamilialModel), on the streamed walk (quant/walk.py): one layer in float32 at a
    time, every window through it before the next is read, so no step holds the whole float model.
    Windows go one at a time and in order, so the sums are those of running each window through
    the whole model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(key: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    walk = Walk(source, windows, 1)
    with closing(walk.steps(observe=add, progress=progress, desc="imatrix")) as steps:
        for step, out in steps:
            if step.kind == "exit":
                norm_name = names.EXIT_NORM.format(j=step.j)
                norm = walk.load(norm_name)
                for h in out:
                    add(HEAD_KEY.format(j=step.j), norm(h))
                walk.drop(norm_name)
    return {k: sums[k] / counts[k] for k in sums}


def for_exit(imatrix: dict[str, torch.Tensor], cfg, j: int) -> dict[str, np.ndarray]:
    """The matrices of exit j's stock file, by GGUF tensor name (blk.N.attn_q.weight, output.weight)."""
    exit_map = cfg.exit_map(j)
    out = {}
    for key, v in imatrix.items():
        if key.startswith("head@"):
            if key == HEAD_KEY.format(j=j):  # a tied head multiplies by token_embd itself,
                head = names.EMBED if cfg.tie_word_embeddings else names.PLAIN_HEAD  # as there
                out[names.gguf_name(f"{head}.weight")] = v.numpy().astype(np.float32)
            continue
        plain = exit_map.rename(f"{key}.weight")
        if plain is not None:
            out[names.gguf_name(plain)] = v.numpy().astype(np.float32)
    return out


def provenance_kv(cal, n_windows: int) -> list[tuple]:
    """llama.cpp's own quantize.imatrix.* keys, naming our calibration set."""
    from gguf import GGUFValueType as V

    return [
        ("quantize.imatrix.file", "ruyi-quant (computed in memory)", V.STRING, None),
        (
            "quantize.imatrix.dataset",
            f"{cal.source} {n_windows}x{cal.seq_len} seed {cal.seed}",
            V.STRING,
            None,
        ),
        ("quantize.imatrix.chunks_count", n_windows, V.INT32, None),
    ]


def requantize(
    f16_path: Path, quantized_path: Path, imatrix: dict[str, np.ndarray], extra_kv: list[tuple] = ()
) -> int:
    """Re-encode, in place, each quantized tensor of llama.cpp's output that has a matrix, from
    the F16 file it was made from, with the same type; add `extra_kv` (provenance). Returns how
    many tensors changed."""
    from .metadata import read_kv, write_gguf

    src = {t.name: t for t in gguf.GGUFReader(str(f16_path)).tensors}
    r = gguf.GGUFReader(str(quantized_path))
    arrays, changed = [], 0
    for t in r.tensors:
        qtype, data = T(t.tensor_type), np.asarray(t.data)
        if t.name in imatrix and qtype not in (T.F32, T.F16, T.BF16):
            w = np.asarray(src[t.name].data)
            data = quantize_rows(qtype, w.reshape(-1, w.shape[-1]), imatrix[t.name]).reshape(data.shape)
            changed += 1
        arrays.append((t.name, data, qtype))
    kv, arch, file_type = read_kv(r)
    kv += list(extra_kv) + [("quantize.imatrix.entries_count", changed, gguf.GGUFValueType.INT32, None)]
    tmp = Path(quantized_path).with_suffix(".imatrix.tmp")
    write_gguf(tmp, arch, kv, arrays, file_type)
    del r
    tmp.replace(quantized_path)
    return changed

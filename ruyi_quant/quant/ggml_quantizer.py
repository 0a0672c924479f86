"""ggml's own quantizer (`ggml_quantize_chunk`), called in the ggml library that llama-cpp-python
ships: llama.cpp's block parameters for a float matrix, with or without an importance matrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UserError


def _libggml():
    """The ggml library inside llama-cpp-python (its loader where it has one, else by file)."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("ggml's quantizer needs llama-cpp-python (pip install 'ruyi-quant[llama]')") from None
    try:
        from llama_cpp._ggml import libggml

        return libggml
    except (ImportError, AttributeError):
        libs = sorted(Path(llama_cpp.__file__).parent.glob("lib/*ggml-base*"))
        if not libs:
            raise UserError(
                "llama-cpp-python without its ggml library: cannot apply an "
                "importance matrix (use imatrix: false)"
            ) from None
        return ctypes.CDLL(str(libs[0]))


def _ggml_quantize_chunk():
    f = _libggml().ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return f


def quantize_rows(qtype: T, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk over every row of a 2-D float matrix: uint8 [rows, row bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * type_bytes), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (cols,):
            raise ValueError(f"imatrix of {qw.shape} for a matrix of {cols} columns")
    n = _ggml_quantize_chunk()(
        int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None if qw is None else qw.ctypes.data
    )
    if n != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
    return out

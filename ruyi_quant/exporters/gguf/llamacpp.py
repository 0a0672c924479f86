"""llama.cpp's own quantizer (optional: needs llama-cpp-python), for its K-quants from an F16
file; imatrix.py then applies our importance matrix."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ...errors import UserError, too_little_space

K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
LLAMA_FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


@contextmanager
def _c_stderr_silenced():
    """Send what C code writes to file descriptor 2 to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> int:
    """Re-quantize a float GGUF with llama.cpp's own quantizer (K-quants, or its RTN Q4_0...).
    Returns the new file's size. Its importance-matrix input is a C++ map that Python cannot
    pass; imatrix.requantize applies ours afterwards."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"type {ftype}: llama.cpp's quantizer needs llama-cpp-python (pip install 'ruyi-quant[llama]')"
        ) from None
    if ftype not in LLAMA_FTYPES:
        raise UserError(f"type {ftype}: llama.cpp types are {', '.join(LLAMA_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[ftype])
    params.nthread = threads
    with _c_stderr_silenced():  # it logs every tensor (and each fallback type) there
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        if too_little_space(dst, Path(src).stat().st_size):  # llama.cpp reports no errno
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        raise UserError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return Path(dst).stat().st_size

"""llama.cpp through llama-cpp-python (optional): its own quantizer, for K-quants from an F16 file
(imatrix.py then applies our importance matrix), and `open_llama`, which runs a GGUF file."""

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


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# llama.cpp (llama-cpp-python 0.3.36) built on a CPU with AMX runs Q4_0/Q4_1/Q8_0 matmuls on its AMX
# kernels, which crashed there (SIGSEGV in ggml_backend_amx_mul_mat). Without its extra buffer types
# (llama.cpp's --no-repack) the weights stay in plain CPU buffers and run the kernels every other
# CPU runs.
AMX = "amx_int8" in _cpu_flags()


def open_llama(path, **kw):
    """llama_cpp.Llama on a GGUF file (keyword arguments: Llama's); on a CPU with AMX, without
    llama.cpp's extra buffer types."""
    import llama_cpp

    if not AMX:
        return llama_cpp.Llama(model_path=str(path), **kw)
    low = llama_cpp.llama_cpp
    real = low.llama_model_default_params

    def params():
        p = real()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kw)
    finally:
        low.llama_model_default_params = real

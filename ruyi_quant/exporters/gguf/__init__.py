"""GGUF files for llama.cpp and Ollama: everything GGUF, in one package.

    export.py     a family -> a job's GGUF folder (names, K-quants, multi-exit), extraction
    files.py      the per-exit stock qwen2/llama file, the multi-exit `ruyi` file, extract_exit
    tensors.py    each weight as its ggml type; our grids exactly (ggml.py: Q4_0/Q4_1/Q8_0 blocks)
    metadata.py   general.* / architecture / ruyi.* keys (gguf-py's Keys), the writer
    tokenizer.py  tokenizer.* keys from tokenizer.json
    ollama.py     the Modelfile beside each per-exit file
    llamacpp.py   llama.cpp's own quantizer (K-quants), imatrix.py our importance matrix for it

The contract is exporters/gguf.md.
"""

from .export import export, extract, label
from .files import base_name, extract_exit, write_exit, write_multi
from .llamacpp import K_QUANTS, llama_quantize
from .metadata import common_kv
from .ollama import write_modelfile_for
from .tensors import GGUFOptions, exit_arch, llama_rope_rows

__all__ = [
    "GGUFOptions",
    "K_QUANTS",
    "base_name",
    "common_kv",
    "exit_arch",
    "export",
    "extract",
    "extract_exit",
    "label",
    "llama_quantize",
    "llama_rope_rows",
    "write_exit",
    "write_modelfile_for",
    "write_multi",
]

"""ONNX for onnxruntime and onnxruntime-genai: everything ONNX, in one package.

    export.py    a family -> a job's ONNX folders (per exit, multi-exit), folder labels
    files.py     external data written tensor by tensor, the folders, genai_config.json, metadata
    graph.py     one exit as a decoder graph with a KV cache (opset 23 + MatMulNBits)
    weights.py   our grids as MatMulNBits initializers, exactly; 8-bit heads and embeddings
    runner.py    generation from an exported folder (onnxruntime-genai, or our own loop)

The contract is exporters/onnx.md.
"""

from .export import MULTI_FOLDER, export, label
from .files import genai_config, write_exit, write_multi
from .graph import check_onnx

__all__ = ["MULTI_FOLDER", "check_onnx", "export", "genai_config", "label", "write_exit", "write_multi"]

"""ruyi-quant: quantize and export familial (early-exit) language models."""

__version__ = "0.1.0"

"""Running quantized families directly in int4: int4.py (the linear on PyTorch's kernels)."""

"""Triton kernels for fastinf hot loops, each beside its PyTorch reference."""

"""Triton kernels for the CUDA path (imported only when the triton backend is chosen)."""

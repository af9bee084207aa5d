"""Kernels for the rewritten ops, each beside its pure-PyTorch reference, and the custom ops
that choose between them (ops.py).

nm_linear: N:M sparse linear reading the compressed weight (2:4, 4:8, ...).
"""
from .nm_linear import interpreted, nm_linear, nm_linear_reference
from .ops import kernel_mode, use_kernels

__all__ = ["interpreted", "kernel_mode", "nm_linear", "nm_linear_reference", "use_kernels"]

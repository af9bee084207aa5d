"""Kernels for the rewritten ops, each beside its pure-PyTorch reference, and the custom ops
that choose between them (ops.py).

nm_linear: N:M sparse linear reading the compressed weight (2:4, 4:8, ...).
cats_mlp:  CATS-gated MLP reading only the active neurons' rows of W_up and columns of W_down
           (cats_cpu: the same idea on CPU at decode, through Inductor and embedding_bag).
window_attention: attention over a window plus sinks, reading only those key blocks.
moe_ffn:   mixture-of-experts FFN, all experts' tokens in one grouped launch per stage.
tuning:    each kernel's launch config, autotuned on the GPU per shape and cached on disk; whether
           kernels run in triton's CPU interpreter.
"""
from .cats_cpu import cats_mlp_cpu
from .cats_mlp import cats_mlp_reference, cats_mlp_triton
from .moe_ffn import moe_ffn_reference, moe_ffn_triton
from .nm_linear import nm_linear, nm_linear_reference
from .ops import kernel_mode, use_kernels
from .tuning import interpreted
from .window_attention import window_attention_reference, window_attention_triton

__all__ = ["cats_mlp_cpu", "cats_mlp_reference", "cats_mlp_triton", "interpreted", "kernel_mode", "moe_ffn_reference", "moe_ffn_triton", "nm_linear", "nm_linear_reference",
           "use_kernels", "window_attention_reference", "window_attention_triton"]

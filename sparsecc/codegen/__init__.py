"""Kernels for the rewritten ops, each beside its pure-PyTorch reference; the custom ops that choose
between them are `sparsecc.ops` (a layer above: nothing here imports it).

nm_linear: N:M sparse linear reading the compressed weight (2:4, 4:8, ...).
csr_linear: CSR sparse linear through torch's sparse product (no kernel of its own).
quant_linear: weight-only int2/3/4/8 linear reading the packed codes (on CPU: torch's int4/int8 kernels).
cats_mlp:  CATS-gated MLP reading only the active neurons' rows of W_up and columns of W_down
           (cats_cpu: the same idea on CPU at decode, through Inductor and embedding_bag).
window_attention: attention over a window plus sinks, reading only those key blocks.
moe_ffn:   mixture-of-experts FFN, all experts' tokens in one grouped launch per stage.
tuning:    each kernel's launch config, autotuned on the GPU per shape and cached on disk; whether
           kernels run in triton's CPU interpreter.
"""
from .cats_cpu import cats_mlp_cpu
from .cats_mlp import cats_mlp_reference, cats_mlp_triton
from .csr_linear import csr_matmul
from .moe_ffn import moe_ffn_reference, moe_ffn_triton
from .nm_linear import nm_linear_reference, nm_linear_triton
from .quant_linear import quant_linear_cpu, quant_linear_reference, quant_linear_triton
from .tuning import interpreted
from .window_attention import window_attention_blocked, window_attention_reference, window_attention_triton

__all__ = ["cats_mlp_cpu", "cats_mlp_reference", "cats_mlp_triton", "csr_matmul", "interpreted", "moe_ffn_reference",
           "moe_ffn_triton", "nm_linear_reference", "nm_linear_triton", "quant_linear_cpu", "quant_linear_reference",
           "quant_linear_triton", "window_attention_blocked",
           "window_attention_reference", "window_attention_triton"]

"""The sparsecc ops as torch.library custom ops, so dynamo/Inductor keep them as single nodes
(one file each; importing this package registers them all).

    torch.ops.sparsecc.nm_linear(x, values, index, bias, n, m, in_features, kernels=None)
    torch.ops.sparsecc.csr_linear(x, crow, col, values, bias, in_features, kernels=None)
    torch.ops.sparsecc.quant_linear(x, codes, scales, zeros, bias, bits, group_size, in_features, cpu_weight=None,
                                    cpu_scales=None, kernels=None)
    torch.ops.sparsecc.cats_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act, kernels=None)
    torch.ops.sparsecc.window_attention(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq,
                                        kernels=None)
    torch.ops.sparsecc.moe_ffn(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k,
                               capacity_factor, act, mode, kernels=None)

(csr_linear_grad and moe_ffn_backward are the gradient ops of csr_linear and moe_ffn.) Each op runs
either its Triton kernel or its fallback (its pure-PyTorch reference; for window attention the
blocked SDPA path; for CATS on CPU the path reading only active rows at decode; for quant_linear on
CPU torch's weight-only int4/int8 kernels on the layout QuantLinear builds once; csr_linear has no
kernel of its own: torch's sparse product), as registered in `dispatch.WAYS`. Which one is the
kernel mode: "auto" (default) considers the kernel on CUDA tensors, where it runs unless
autotuning timed the fallback faster for that shape (so a kernel never runs where its fallback,
e.g. CATS's dense MLP, is faster; for nm_linear torch's semi-structured 2:4 product is timed too),
and the fallback elsewhere; "triton" forces the kernel on any device (on CPU only under
TRITON_INTERPRET=1: how the tests run the kernels); "reference" never uses a kernel.
An op's `kernels` argument forces the mode for that call; None (the default) takes the ambient
one: `use_kernels(mode)`, else the environment variable SPARSECC_KERNELS. The compile backend
sets `kernels` on every sparsecc op of a graph compiled with options={"kernels": mode}.
"""
from . import cats_mlp, csr_linear, moe_ffn, nm_linear, quant_linear, window_attention  # noqa: F401  (register the ops)
from .dispatch import MODES, check_mode, implementation, kernel_mode, last_way, use_kernels

__all__ = ["MODES", "check_mode", "implementation", "kernel_mode", "last_way", "use_kernels"]

"""The sparsecc ops as torch.library custom ops, so dynamo/Inductor keep them as single nodes.

    torch.ops.sparsecc.nm_linear(x, values, index, bias, n, m, in_features)
    torch.ops.sparsecc.csr_linear(x, crow, col, values, bias, in_features)
    torch.ops.sparsecc.cats_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act)
    torch.ops.sparsecc.window_attention(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq)
    torch.ops.sparsecc.moe_ffn(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k,
                               capacity_factor, act, mode)

Each op runs either its Triton kernel or its fallback (its pure-PyTorch reference; for window
attention the blocked SDPA path; for CATS on CPU the path reading only active rows at decode;
csr_linear has no kernel of its own: torch's sparse product). Which one (`kernel_mode`): "auto"
(default) considers the kernel on CUDA tensors, where it runs unless autotuning timed the
fallback faster for that shape (so a kernel never runs where its fallback, e.g. CATS's dense
MLP, is faster; for nm_linear torch's semi-structured 2:4 product is timed too), and the
fallback elsewhere; "triton" forces the kernel on any device (on CPU
only under TRITON_INTERPRET=1: how the tests run the kernels); "reference" never uses a kernel.
Set it with the environment variable SPARSECC_KERNELS, with `use_kernels(mode)`, or per
compiled model with torch.compile(..., options={"kernels": mode}).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import torch

from .nm_linear import nm_linear as nm_linear_triton
from .cats_cpu import cats_mlp_cpu
from .cats_mlp import cats_mlp_backward, cats_mlp_triton
from .nm_linear import nm_linear_reference
from . import semi_structured
from .window_attention import window_attention_blocked, window_attention_reference, window_attention_triton
from ..nm_format import decompress
from .tuning import bucket, choose
from .tuning import enabled as tuning_enabled

MODES = ("auto", "triton", "reference")
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparsecc_kernels", default=None)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def kernel_mode() -> str:
    mode = _mode.get()
    return mode if mode is not None else check_mode(os.environ.get("SPARSECC_KERNELS", "auto"))


@contextlib.contextmanager
def use_kernels(mode: str):
    """Within the block, sparsecc ops use `mode` ("auto", "triton" or "reference")."""
    token = _mode.set(check_mode(mode))
    try:
        yield
    finally:
        _mode.reset(token)


def on_gpu(x: torch.Tensor) -> bool:
    """Where mode "auto" considers the Triton kernels: tensors on a CUDA device."""
    return x.is_cuda


def pick(op: str, key: tuple, x: torch.Tensor, ways: dict) -> str:
    """Which of `ways` ({name: fn}: "kernel", "fallback", then other GPU lowerings, e.g. torch's
    2:4 product for nm_linear) op `op` runs on input x. Mode "triton": the kernel; "reference", or
    "auto" off the GPU: the fallback (the dense or reference path). "auto" on the GPU: the way the
    tuner (tuning.py) timed fastest for this shape, so a kernel is never chosen where it would be
    slower. The names of the other ways are part of the tuning key: a choice cached before a way
    existed is not reused."""
    mode = kernel_mode()
    if mode == "triton":
        return "kernel"
    if mode == "reference" or not on_gpu(x):
        return "fallback"
    others = tuple(name for name in ways if name not in ("kernel", "fallback"))
    choice = choose(f"{op}/dispatch", (*key, *others), [{"run": name} for name in ways],
                    lambda c: ways[c["run"]](), x.device)["run"]
    last_way[op] = choice
    return choice


def dispatch(op: str, key: tuple, x: torch.Tensor, kernel, fallback):
    """Run kernel() or fallback() for op `op` on input x, as `pick` decides."""
    ways = {"kernel": kernel, "fallback": fallback}
    return ways[pick(op, key, x, ways)]()


last_way: dict[str, str] = {}  # op -> the way mode "auto" last ran it on the GPU (for benchmarks)


# What each op runs, for lowering reports: (Triton kernel, fallback on CPU, fallback elsewhere and
# in mode "reference").
IMPLEMENTATIONS = {
    "nm_linear": ("nm_linear_triton", "nm_linear_reference", "nm_linear_reference"),
    "cats_mlp": ("cats_mlp_triton", "cats_mlp_cpu", "cats_mlp_reference"),
    "window_attention": ("window_attention_triton", "window_attention_blocked", "window_attention_blocked"),
    "moe_ffn": ("moe_ffn_triton", "moe_ffn_reference", "moe_ffn_reference"),
    "csr_linear": ("csr_matmul", "csr_matmul", "csr_matmul"),  # torch's sparse product on every device
}
# Other ways mode "auto" times on the GPU, where they apply.
GPU_ALTERNATIVES = {"nm_linear": f"{semi_structured.NAME} (2:4, fp16/bf16)"}


def implementation(op: str, device: torch.device | str, mode: str | None = None) -> str:
    """What op `op` ("nm_linear", ...) runs on `device` in kernel mode `mode` (default: the current one)."""
    mode = check_mode(mode) if mode is not None else kernel_mode()
    kernel, cpu_path, reference = IMPLEMENTATIONS[op]
    if mode == "triton":
        return kernel
    if mode == "reference":
        return reference
    if torch.device(device).type != "cuda":
        return cpu_path
    if not tuning_enabled(torch.device(device)):
        return kernel
    ways = ", ".join([kernel, reference, *([GPU_ALTERNATIVES[op]] if op in GPU_ALTERNATIVES else [])])
    return f"{ways}: whichever is timed fastest for the shape"


@torch.library.custom_op("sparsecc::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
              n: int, m: int, in_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias for an N:M weight W stored compressed (values, packed index). On the GPU,
    torch's semi-structured 2:4 product (semi_structured.py) is timed as a third way where it applies."""
    ways = {"kernel": lambda: nm_linear_triton(x, values, index, n, m, in_features, bias),
            "fallback": lambda: nm_linear_reference(x, values, index, n, m, in_features, bias)}
    offered = on_gpu(x) and semi_structured.applies(x, values, bias, n, m, in_features)  # pick says if it is timed
    if offered:
        ways[semi_structured.NAME] = lambda: semi_structured.linear(x, values, index, bias, in_features)
        kept = semi_structured.kept(values)
    way = pick("nm_linear", (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(values.shape), n, m), x, ways)
    if offered and way != semi_structured.NAME and not kept:
        semi_structured.forget(values)  # built while timing this shape, not chosen: free its memory
    return ways[way]()


@nm_linear.register_fake
def _(x, values, index, bias, n, m, in_features):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _setup_context(ctx, inputs, output):
    x, values, index, bias, n, m, in_features = inputs
    ctx.save_for_backward(values, index)
    ctx.nm = (n, m, in_features)
    ctx.bias_shape = None if bias is None else bias.shape


def _backward(ctx, grad):
    """d/dx (x Wᵀ + b) = grad · W with W decompressed; the compressed weight itself is frozen."""
    values, index = ctx.saved_tensors
    n, m, in_features = ctx.nm
    w = decompress(values, index, n, m, in_features, check=False).to(grad.dtype)
    grad_x = grad @ w if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_shape is not None and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None


nm_linear.register_autograd(_backward, setup_context=_setup_context)


def _csr_values(values: torch.Tensor) -> torch.Tensor:
    """torch's CSR product on CPU has no half/bf16 kernel (a model cast after compress_csr_, or
    autocast): compute those in fp32."""
    return values.float() if values.device.type == "cpu" and values.dtype in (torch.float16, torch.bfloat16) else values


def csr_weight(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, values, (crow.numel() - 1, in_features), check_invariants=False)


@torch.library.custom_op("sparsecc::csr_linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias for a weight W stored CSR (compressed.CSRLinear): torch's sparse product
    W @ xᵀ (MKL on CPU, cuSPARSE on CUDA)."""
    values = _csr_values(values)
    x2 = x.reshape(-1, in_features).to(values.dtype)
    y = (csr_weight(crow, col, values, in_features) @ x2.t()).t().to(x.dtype)
    y = y + bias if bias is not None else y
    return y.contiguous().reshape(*x.shape[:-1], crow.numel() - 1)


@csr_linear.register_fake
def _(x, crow, col, values, bias, in_features):
    return x.new_empty(*x.shape[:-1], crow.shape[0] - 1)


@torch.library.custom_op("sparsecc::csr_linear_grad", mutates_args=())
def csr_linear_grad(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """d/dx (x Wᵀ) = grad · W = (Wᵀ gradᵀ)ᵀ for the CSR weight: an op of its own, as sparse
    tensors cannot be traced."""
    values = _csr_values(values)
    g2 = grad.reshape(-1, grad.shape[-1]).to(values.dtype)
    gx = (csr_weight(crow, col, values, in_features).t() @ g2.t()).t()
    return gx.to(grad.dtype).contiguous().reshape(*grad.shape[:-1], in_features)


@csr_linear_grad.register_fake
def _(grad, crow, col, values, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _csr_grad_setup(ctx, inputs, output):
    grad, crow, col, values, in_features = inputs
    ctx.save_for_backward(crow, col, values)


def _csr_grad_backward(ctx, gg):
    """csr_linear_grad is linear in grad: its own gradient is gg · Wᵀ, the forward op (double backward)."""
    crow, col, values = ctx.saved_tensors
    return torch.ops.sparsecc.csr_linear(gg, crow, col, values, None, gg.shape[-1]), None, None, None, None


csr_linear_grad.register_autograd(_csr_grad_backward, setup_context=_csr_grad_setup)


def _csr_setup(ctx, inputs, output):
    x, crow, col, values, bias, in_features = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.in_features, ctx.has_bias = in_features, bias is not None


def _csr_backward(ctx, grad):
    """Gradients for x and the bias; the stored weight is frozen."""
    crow, col, values = ctx.saved_tensors
    grad_x = (torch.ops.sparsecc.csr_linear_grad(grad, crow, col, values, ctx.in_features)
              if ctx.needs_input_grad[0] else None)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_b, None


csr_linear.register_autograd(_csr_backward, setup_context=_csr_setup)


@torch.library.custom_op("sparsecc::cats_mlp", mutates_args=())
def cats_mlp(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
             b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None, threshold: float,
             act: str) -> torch.Tensor:
    """down((act(gate(x)) thresholded at |.| >= threshold) * up(x)): a CATS-gated MLP."""
    return dispatch("cats_mlp", (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(w_gate.shape), act), x,
                    lambda: cats_mlp_triton(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act),
                    lambda: cats_mlp_cpu(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act,
                                         sparse=False if kernel_mode() == "reference" else None))


@cats_mlp.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _cats_setup(ctx, inputs, output):
    x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act = inputs
    ctx.save_for_backward(x, w_gate, b_gate, w_up, b_up, w_down)
    ctx.threshold, ctx.act, ctx.has_b_down = threshold, act, b_down is not None


def _cats_backward(ctx, grad):
    x, w_gate, b_gate, w_up, b_up, w_down = ctx.saved_tensors
    dx, dwg, dbg, dwu, dbu, dwd, dbd = cats_mlp_backward(grad, x, w_gate, b_gate, w_up, b_up, w_down,
                                                         ctx.threshold, ctx.act)
    return dx, dwg, dbg, dwu, dbu, dwd, dbd if ctx.has_b_down else None, None, None


cats_mlp.register_autograd(_cats_backward, setup_context=_cats_setup)


@torch.library.custom_op("sparsecc::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     key_mask: torch.Tensor | None, window: int | None, dilation: int, sinks: int, scale: float,
                     inv_freq: torch.Tensor | None) -> torch.Tensor:
    """Attention over the last `window` keys (every `dilation`-th) plus `sinks` first tokens
    (window_attention.py; inv_freq given: sink scores at positions within the cache)."""
    args = (q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq)
    key = (q.dtype, tuple(q.shape[:2]), bucket(q.shape[2]), bucket(k.shape[2]), k.shape[1], q.shape[3],
           window is None, key_mask is not None, inv_freq is not None)
    return dispatch("window_attention", key, q, lambda: window_attention_triton(*args),
                    lambda: window_attention_blocked(*args))


@window_attention.register_fake
def _(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _window_setup(ctx, inputs, output):
    q, k, v, q_pos, k_pos, key_mask, *rest = inputs
    ctx.save_for_backward(q, k, v, q_pos, k_pos, key_mask, rest[-1])
    ctx.args = tuple(rest[:-1])


def _window_backward(ctx, grad):
    """Gradients by differentiating the reference (recomputed): the mask and positions are constants."""
    q, k, v, q_pos, k_pos, key_mask, inv_freq = ctx.saved_tensors
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = window_attention_reference(*qkv, q_pos, k_pos, key_mask, *ctx.args, inv_freq)
        grads = torch.autograd.grad(out, qkv, grad)
    return (*grads, None, None, None, None, None, None, None, None)


window_attention.register_autograd(_window_backward, setup_context=_window_setup)


# --- sparsecc::moe_ffn: a mixture-of-experts FFN (moe_ffn.py: reference and grouped Triton kernel) ---
from .moe_ffn import moe_ffn_backward as _moe_backward, moe_ffn_reference, moe_ffn_triton  # noqa: E402


@torch.library.custom_op("sparsecc::moe_ffn", mutates_args=())
def moe_ffn(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, w_gate: torch.Tensor,
            b_gate: torch.Tensor | None, w_up: torch.Tensor, b_up: torch.Tensor | None, w_down: torch.Tensor,
            b_down: torch.Tensor | None, top_k: int, capacity_factor: float, act: str, mode: str) -> torch.Tensor:
    """Σ over the top_k experts (fp32 router) of w_e · down_e(act(gate_e(x)) * up_e(x)) + b_down; w_e = 1
    (mode "sum") or softmax over the top_k logits ("softmax_topk"); capacity_factor <= 0: no capacity."""
    args = (x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act,
            mode)
    key = (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(w_gate.shape), top_k, capacity_factor, act)
    return dispatch("moe_ffn", key, x, lambda: moe_ffn_triton(*args), lambda: moe_ffn_reference(*args))


@moe_ffn.register_fake
def _(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act, mode):
    return x.new_empty(*x.shape[:-1], w_down.shape[1])


@torch.library.custom_op("sparsecc::moe_ffn_backward", mutates_args=())
def moe_ffn_backward(grad: torch.Tensor, x: torch.Tensor, router_weight: torch.Tensor,
                     router_bias: torch.Tensor | None, w_gate: torch.Tensor, b_gate: torch.Tensor | None,
                     w_up: torch.Tensor, b_up: torch.Tensor | None, w_down: torch.Tensor,
                     b_down: torch.Tensor | None, top_k: int, capacity_factor: float, act: str,
                     mode: str) -> list[torch.Tensor]:
    """The gradients of moe_ffn w.r.t. its nine tensor inputs (an empty tensor for an absent bias):
    an op of its own, as its routing is data-dependent and cannot be traced."""
    grads = _moe_backward(grad, x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k,
                          capacity_factor, act, mode)
    return [g if g is not None else x.new_empty(0) for g in grads]


@moe_ffn_backward.register_fake
def _(grad, x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act,
      mode):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down)]


def _moe_setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:9] if t is not None))
    ctx.present = [t is not None for t in inputs[:9]]
    ctx.args = inputs[9:]


def _moe_backward_autograd(ctx, grad):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    grads = torch.ops.sparsecc.moe_ffn_backward(grad, *tensors, *ctx.args)
    return (*(g if p else None for g, p in zip(grads, ctx.present)), None, None, None, None)


moe_ffn.register_autograd(_moe_backward_autograd, setup_context=_moe_setup)

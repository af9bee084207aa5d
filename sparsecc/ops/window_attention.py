"""torch.ops.sparsecc.window_attention: attention over a window plus sinks (codegen/window_attention.py)."""
from __future__ import annotations

import torch

from ..codegen.tuning import bucket
from ..codegen.window_attention import window_attention_blocked, window_attention_reference, window_attention_triton
from .dispatch import dispatch, register_ways

register_ways("window_attention", kernel=window_attention_triton, cpu=window_attention_blocked,
              reference=window_attention_blocked)


@torch.library.custom_op("sparsecc::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     key_mask: torch.Tensor | None, window: int | None, dilation: int, sinks: int, scale: float,
                     inv_freq: torch.Tensor | None, kernels: str | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over k, v [B, Hk, L, D] (Hq a multiple of Hk) at the last `window`
    keys (every `dilation`-th) plus `sinks` first tokens, minus the pairs key_mask ([B, L] or
    [B, T, L] bool) masks; inv_freq given: sink scores at positions within the cache."""
    key = (q.dtype, tuple(q.shape[:2]), bucket(q.shape[2]), bucket(k.shape[2]), k.shape[1], q.shape[3],
           window is None, None if key_mask is None else key_mask.dim(), inv_freq is not None)
    return dispatch("window_attention", key, q,
                    lambda fn: fn(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq), kernels)


@window_attention.register_fake
def _(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq, kernels=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _setup(ctx, inputs, output):
    q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq, _ = inputs
    ctx.save_for_backward(q, k, v, q_pos, k_pos, key_mask, inv_freq)
    ctx.args = (window, dilation, sinks, scale)


def _backward(ctx, grad):
    """Gradients by differentiating the reference (recomputed): the mask and positions are constants."""
    q, k, v, q_pos, k_pos, key_mask, inv_freq = ctx.saved_tensors
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = window_attention_reference(*qkv, q_pos, k_pos, key_mask, *ctx.args, inv_freq)
        grads = torch.autograd.grad(out, qkv, grad)
    return (*grads, *[None] * 9)


window_attention.register_autograd(_backward, setup_context=_setup)

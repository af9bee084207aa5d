"""CPU path of the CATS MLP: at decode, read only the rows of the active neurons.

The reference (cats_mlp.py) computes the dense MLP and masks it, so it costs a dense MLP. With
a few tokens and large weights the MLP is bound by reading the weights, so after the dense gate
projection (needed to know which neurons are active: seed 000, "Custom GPU Kernel 1", lines 2-3)
this path reads only
  - the rows of W_up of the neurons active for some token: a gather-dot x · W_up[idx]ᵀ that
    Inductor compiles into one loop reading each gathered row once (line 4; no copy of W_up[idx]);
  - the rows of W_downᵀ of each token's active neurons: y_t = Σ_j h_tj W_downᵀ[j], which is
    torch's embedding_bag with per-sample weights h (line 5), in several bags per token so that
    every thread reads a share.
At 50% sparsity that reads W_gate and half of W_up and W_down. W_downᵀ must be contiguous (W_down
stored column-major), which the CATS rewrite does (techniques/cats.py).

`cats_mlp_cpu` takes it only where it was measured to pay (benchmarks/cats_mlp.py --device cpu):
CPU tensors, weights of at least MIN_WEIGHTS elements, and tokens x active fraction ≤
MAX_ACTIVE_ROWS (each token costs about one pass over the active rows). Elsewhere it runs the
dense MLP, so it is never much slower than the reference.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .cats_mlp import cats_gate, cats_mlp_reference

MIN_WEIGHTS = 1 << 23     # inter x hidden below this: the dense MLP is as fast (fixed costs dominate)
MAX_ACTIVE_ROWS = 0.55    # tokens x (active neurons / all neurons) above this: the dense MLP is faster


# One token at a time (x: [H]), so that the token count is no guard: dynamo's graphs then vary
# only with dtype and inference mode, well within its recompile limit. Indices come from
# nonzero(), so Inductor's per-element bounds check is dropped (~20% faster).
@torch.compile(dynamic=True, options={"assert_indirect_indexing": False})
def _gather_dot_compiled(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    return (w[idx].to(acc) * x.to(acc)).sum(-1).to(x.dtype)


_compile_failed = False


def gather_dot(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, k] = x · W[idx]ᵀ (x: [T, H], W: [I, H] row-major, idx: k neuron indices), reading each
    gathered row once per token (callers keep T x k small: `pays`)."""
    global _compile_failed
    if not _compile_failed and idx.numel() > 1 and x.shape[1] > 1:  # sizes 0/1 would each recompile
        try:
            return torch.stack([_gather_dot_compiled(row.contiguous(), w, idx) for row in x])
        except torch._dynamo.exc.TorchDynamoException as err:  # e.g. no C++ compiler for Inductor
            _compile_failed = True
            warnings.warn(f"sparsecc: Inductor could not compile the CATS gather-dot ({type(err).__name__}: "
                          f"{err}); using an eager gather instead", stacklevel=2)
    return F.linear(x, w.index_select(0, idx))


def pays(tokens: int, active: float, inter: int, hidden: int) -> bool:
    """Whether reading only active rows beats the dense MLP (measured on CPU, see module doc)."""
    return inter * hidden >= MIN_WEIGHTS and tokens * active <= MAX_ACTIVE_ROWS


def column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.t().is_contiguous()


def wants_column_major(w_down: torch.Tensor) -> bool:
    """Whether the CATS rewrite should store W_down column-major: on the GPU (the Triton kernel then
    skips an inactive neuron's whole row of W_downᵀ) and on CPU in fp32/fp64 (this path reads those
    rows; the dense product costs the same). Not on CPU in fp16/bf16, where the dense product with
    a column-major weight ran about 2x slower (benchmarks/cats_mlp.py --dtype bf16) and that
    product is what runs for more than a token or two."""
    return w_down.device.type != "cpu" or w_down.dtype in (torch.float32, torch.float64)


def cats_mlp_cpu(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold: float, act: str,
                 sparse: bool | None = None) -> torch.Tensor:
    """The CATS MLP on CPU: reading only active neurons' rows where that pays, else dense (same
    result as cats_mlp_reference up to float rounding). `sparse` True/False forces either way."""
    eligible = x.device.type == "cpu" and column_major(w_down) and w_up.is_contiguous()
    if sparse is False or x.numel() == 0 or (sparse is None and not (eligible and w_up.numel() >= MIN_WEIGHTS)):
        return cats_mlp_reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act)
    lead, hidden = x.shape[:-1], x.shape[-1]
    with torch.no_grad():  # the op's backward is its own (sparsecc/ops/cats_mlp.py): nothing is differentiated here
        x2 = x.reshape(-1, hidden)
        v = cats_gate(x2, w_gate, b_gate, threshold, act)                  # lines 2-3: zero below t
        idx = (v != 0).any(0).nonzero().squeeze(1)                         # neurons active for some token
        if sparse is None and not pays(x2.shape[0], idx.numel() / max(1, v.shape[1]), *w_up.shape):
            y = F.linear(v * F.linear(x2, w_up, b_up), w_down, b_down)
        else:
            y = _active_rows(x2, v, idx, w_up.contiguous(), b_up, w_down.t().contiguous(), b_down)
    return y.reshape(*lead, w_down.shape[0])


def _active_rows(x, v, idx, w_up, b_up, w_down_t, b_down) -> torch.Tensor:
    tokens, out = x.shape[0], w_down_t.shape[1]
    u = gather_dot(x, w_up, idx)                                           # line 4, active rows only
    if b_up is not None:
        u = u + b_up[idx]
    h = v[:, idx] * u                                                      # [T, k]; 0 where inactive
    t, j = v[:, idx].nonzero(as_tuple=True)                                # each token's active neurons
    # bags: `parts` per token, each a contiguous share of the token's (t, j) pairs
    parts = max(1, -(-torch.get_num_threads() // tokens))
    counts = torch.bincount(t, minlength=tokens)
    starts = torch.cumsum(counts, 0) - counts
    offsets = (starts[:, None] + counts[:, None] * torch.arange(parts, device=x.device) // parts).reshape(-1)
    y = F.embedding_bag(idx[j], w_down_t, offsets, mode="sum", per_sample_weights=h[t, j])  # line 5
    y = y.view(tokens, parts, out).sum(1)
    return y + b_down if b_down is not None else y

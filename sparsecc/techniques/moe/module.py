"""MoEMLP: a gated MLP as E experts plus a router, computed by one op (`torch.ops.sparsecc.moe_ffn`)."""
from __future__ import annotations

import torch
from torch import nn

from ... import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.moe_ffn)
from ...codegen.cats_mlp import ACTIVATIONS
from ...codegen.moe_ffn import MODES, Routing, route


class MoEMLP(nn.Module):
    """A gated MLP as E experts of `expert_size` neurons plus a router, computed by one op.

    Parameters: w_gate, w_up [E, expert_size, hidden], w_down [E, hidden, expert_size], and
    b_gate, b_up [E, expert_size], b_down [hidden] where the dense MLP had biases. Buffers: the
    router, router_weight [E, hidden] and router_bias [E], in fp32 (`model.to(dtype)` casts them
    too, but the op computes the routing in fp32 whatever their dtype)."""

    def __init__(self, hidden: int, expert_size: int, num_experts: int, top_k: int,
                 capacity_factor: float | None = None, act: str = "silu", mode: str = "sum",
                 bias: tuple[bool, bool, bool] = (False, False, False), router_bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if act not in ACTIVATIONS or mode not in MODES or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEMLP: bad act {act!r}, mode {mode!r} or top_k {top_k} (of {num_experts} experts)")
        self.top_k, self.capacity_factor, self.act, self.mode = top_k, capacity_factor, act, mode
        new = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))  # noqa: E731
        self.w_gate, self.w_up = new(num_experts, expert_size, hidden), new(num_experts, expert_size, hidden)
        self.w_down = new(num_experts, hidden, expert_size)
        for name, on, shape in zip(("b_gate", "b_up", "b_down"), bias,
                                   ((num_experts, expert_size), (num_experts, expert_size), (hidden,))):
            self.register_parameter(name, new(*shape) if on else None)
        self.register_buffer("router_weight", torch.zeros(num_experts, hidden, dtype=torch.float32, device=device))
        self.register_buffer("router_bias", torch.zeros(num_experts, dtype=torch.float32, device=device)
                             if router_bias else None)

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsecc.moe_ffn(x, self.router_weight, self.router_bias, self.w_gate, self.b_gate, self.w_up,
                                          self.b_up, self.w_down, self.b_down, self.top_k,
                                          float(self.capacity_factor or 0.0), self.act, self.mode)

    def route(self, x: torch.Tensor) -> Routing:
        """The routing forward() uses for x [..., hidden] (tokens flattened): for statistics."""
        return route(x.reshape(-1, x.shape[-1]), self.router_weight, self.router_bias, self.top_k,
                     float(self.capacity_factor or 0.0), self.mode)

    def extra_repr(self) -> str:
        e, m, h = self.w_gate.shape
        return (f"hidden={h}, experts={e} x {m} neurons, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"act={self.act}, mode={self.mode}")

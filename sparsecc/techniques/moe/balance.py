"""Switch's load-balance statistics of the MoEMLPs of a model, measured on held-out batches."""
from __future__ import annotations

import torch
from torch import nn

from ..rewrites import observe
from .module import MoEMLP


@torch.no_grad()
def moe_load_balance(model: nn.Module, batches) -> dict[str, dict]:
    """Switch's balance statistics of every MoEMLP over the (non-padding) tokens of `batches`:

    f_e    share of the token-expert assignments routed to expert e (top-1: tokens whose argmax is e)
    P_e    mean router probability of e, softmax over all E logits
    aux    E · Σ_e f_e P_e, Switch's auxiliary load-balancing loss with α = 1 (1.0 = balanced)
    dropped  share of the assignments beyond an expert's capacity (0 without capacity_factor)
    """
    acc: dict[str, list] = {}

    def hook(name, ctx):
        def fn(mod, args, out):
            x = args[0]
            r = mod.route(x)
            mask = ctx.get("mask")
            sel = mask.reshape(-1) if mask is not None and mask.shape == x.shape[:-1] else slice(None)
            index, keep, probs = r.index[sel], r.keep[sel], r.logits[sel].softmax(-1)
            a = acc.setdefault(name, [torch.zeros(mod.num_experts, dtype=torch.float64),
                                      torch.zeros(mod.num_experts, dtype=torch.float64), 0, 0])
            a[0] += torch.bincount(index.reshape(-1).cpu(), minlength=mod.num_experts).double()
            a[1] += probs.double().sum(0).cpu()
            a[2] += index.shape[0]
            a[3] += int((~keep).sum())
        return fn

    observe(model, MoEMLP, hook, batches, "MoEConfig")
    out = {}
    for name, (counts, psum, tokens, dropped) in acc.items():
        f, p = counts / max(counts.sum(), 1), psum / max(tokens, 1)
        out[name] = {"f": f.tolist(), "P": p.tolist(), "aux_loss": float(len(f) * (f * p).sum()),
                     "dropped": dropped / max(counts.sum().item(), 1), "tokens": tokens}
    return out

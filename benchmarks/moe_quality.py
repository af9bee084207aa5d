"""MoEfication on the reference model: perplexity against the share of MLP neurons run per token.

    python benchmarks/moe_quality.py [--model ref|tiny] [--nsamples 128] [--write-results]

Every MLP is split into E experts (balanced k-means over the neurons' weights) with a router
fitted on `nsamples` random training windows (one data-free "centroid" router for comparison);
each token runs its top-k experts, k/E of the neurons. With capacity_factor 1.25 each expert
takes at most ceil(1.25·T·k/E) of the T tokens of a forward (Switch Transformer, seed 001), the
rest get nothing from it. Perplexity on the whole test split; Switch's load-balance statistics
(aux loss E·Σ f_e·P_e, 1.0 = balanced; expert token shares f_e; dropped assignments) on it too.
The "oracle" rows route by the true ‖h_e(x)‖₂ the fitted router imitates (all experts computed):
how much of the loss is the router's, and how much the split's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import sparsecc
from sparsecc.tools.evaluate import perplexity
from sparsecc.techniques.moe import MoEConfig, moe_load_balance

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

SETTINGS = [(8, 1), (8, 2), (8, 4), (8, 8), (16, 4)]


def oracle_routing_(model) -> None:
    """Route every MoEMLP of `model` by the true scores ‖h_e(x)‖₂ its fitted router imitates
    (computing all experts, so no saving: a bound on what a better router could reach)."""
    import torch

    from sparsecc.codegen.cats_mlp import ACTIVATIONS
    from sparsecc.techniques.moe import MoEMLP

    def forward(mod, x):
        h = ACTIVATIONS[mod.act](torch.einsum("...d,emd->...em", x, mod.w_gate)) * torch.einsum(
            "...d,emd->...em", x, mod.w_up)
        top = h.norm(dim=-1).topk(mod.top_k, dim=-1).indices
        keep = torch.zeros(h.shape[:-1], dtype=h.dtype).scatter_(-1, top, 1.0)
        return torch.einsum("...em,ehm,...e->...h", h, mod.w_down, keep)

    for mod in model.modules():
        if isinstance(mod, MoEMLP):
            mod.forward = lambda x, mod=mod: forward(mod, x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    args = p.parse_args(argv)

    model, corpus, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    held = list(test_ids[: len(test_ids) // seqlen * seqlen].reshape(-1, seqlen).split(8))  # as perplexity's batches
    dense = perplexity(model, test_ids, seqlen)
    print(f"dense: {dense:.2f}", flush=True)
    lines = ["| experts E | top-k | active neurons | router | capacity factor | test perplexity | vs dense "
             "| router R² (mean) | aux loss (mean) | expert token share (min .. max) | dropped | rewrite s |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
             f"| dense | - | 100% | - | - | {dense:.2f} | 1.000 | - | - | - | - | - |"]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    runs = [(MoEConfig(e, k, cf), False) for e, k in SETTINGS for cf in (None, 1.25)]
    runs[2:2] = [(MoEConfig(8, 2, None, router="centroid"), False)]
    runs += [(MoEConfig(8, k), True) for k in (1, 2, 4)]
    for cfg, oracle in runs:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        result = sparsecc.sparsify_(m, {"re:.*mlp": cfg}, batches, progress=False)
        secs = time.perf_counter() - t0
        if oracle:
            oracle_routing_(m)
        ppl = perplexity(m, test_ids, seqlen)
        cells = [str(cfg.num_experts), str(cfg.top_k), f"{cfg.top_k / cfg.num_experts:.1%}",
                 "oracle ‖h_e‖ (bound)" if oracle else cfg.router, str(cfg.capacity_factor or "none"), f"{ppl:.2f}",
                 f"{ppl / dense:.3f}"]
        if oracle:  # the statistics below describe the fitted router, which the oracle replaced
            cells += ["-"] * 4
        else:
            balance = moe_load_balance(m, held).values()
            r2 = [r["router_r2"] for r in result.rows if r["router_r2"] is not None]
            shares = [f for s in balance for f in s["f"]]
            cells += [f"{statistics.mean(r2):.3f}" if r2 else "-",
                      f"{statistics.mean(s['aux_loss'] for s in balance):.3f}",
                      f"{min(shares):.1%} .. {max(shares):.1%} (1/E = {1 / cfg.num_experts:.1%})",
                      f"{statistics.mean(s['dropped'] for s in balance):.1%}"]
        lines.append("| " + " | ".join(cells + [f"{secs:.1f}"]) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    report("moe-quality", "MoEfication (dense MLPs split into experts)",
           f"The `{args.model}` zoo model; every MLP split into E experts of equal size by balanced k-means over "
           f"its neurons' [W_gate, W_up] rows; routers fitted on {args.nsamples} random training windows of {seqlen} "
           f"tokens (seed {args.seed}) unless `centroid` (data-free); each token runs its top-k experts, summed "
           "unweighted; `oracle` rows pick the top-k by the true ‖h_e(x)‖₂ instead (a bound, no saving). "
           "Perplexity on the whole test split; load balance on the test split (its batches of 8 windows set the "
           "capacity): aux loss = E·Σ f_e·P_e (Switch, 1.0 = balanced), f_e = share of the "
           "token-expert assignments per expert (over all layers), dropped = share of assignments beyond capacity "
           "(mean over layers).",
           text, f"python benchmarks/moe_quality.py --model {args.model} --write-results", args.write_results,
           shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

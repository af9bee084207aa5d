"""CATS MLP (sparsecc::cats_mlp) vs the dense gated MLP, at LLaMA-7B shapes, in one run.

    python benchmarks/cats_mlp.py                    # GPU if there is one, else CPU
    python benchmarks/cats_mlp.py --quick            # small shapes (a smoke test)
    python benchmarks/cats_mlp.py --write-results    # also the cats-mlp-<device> section of RESULTS.md

Random weights and inputs; the threshold is set to the sparsity-quantile of |SiLU(x W_gateᵀ)| of
the benchmark's own input, so the stated share of neurons is inactive for every token (real
activations would be measured with `sparsecc.activation_sparsity`). Times are medians; ratio =
dense MLP time / CATS time (above 1: faster). On GPU the op runs the Triton kernel, with W_down
column-major as the seed's kernel stores it; on CPU the reference (the dense MLP plus a mask, so
slower than dense: no CPU kernel skips inactive neurons yet). The seed's goal: ≥ 1.4x dense at
50% for one token; reading W_gate fully and half of W_up and W_down bounds it at 1.5x.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecc.codegen.ops import use_kernels

try:
    from results import add_device_args, bench_mode, device_dtype, median_time, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_time, report_kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--quick", action="store_true", help="hidden 256, intermediate 512")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    hidden, inter = (256, 512) if args.quick else (args.hidden, args.inter)
    g = torch.Generator(device=device).manual_seed(0)
    w_gate, w_up = (torch.randn(inter, hidden, device=device, generator=g, dtype=dtype) / hidden ** 0.5 for _ in "gu")
    w_down = torch.randn(hidden, inter, device=device, generator=g, dtype=dtype) / inter ** 0.5
    w_down_cm = w_down.t().contiguous().t()  # same matrix, [inter, hidden]-contiguous

    def dense(x):
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    lines = ["| tokens | sparsity | dense MLP ms | CATS ms | ratio | rel. error |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in args.tokens:
        x = torch.randn(t, hidden, device=device, generator=g, dtype=dtype)
        t_dense = median_time(lambda: dense(x), device, args.reps)
        v = F.silu(F.linear(x.float(), w_gate.float())).abs().flatten().sort().values
        for s in args.sparsity:
            k = min(max(1, int(s * v.numel())), v.numel() - 1)
            thr = float(v[k - 1] + v[k]) / 2  # between two activations: no neuron sits on the threshold
            with use_kernels(bench_mode(device)):
                fn = lambda: torch.ops.sparsecc.cats_mlp(x, w_gate, None, w_up, None, w_down_cm, None, thr, "silu")  # noqa: E731
                y = fn()
                t_cats = median_time(fn, device, args.reps)
            vv = F.silu(F.linear(x.double(), w_gate.double()))
            ref = F.linear(vv * (vv.abs() >= thr) * F.linear(x.double(), w_up.double()), w_down.double())
            err = float((y.double() - ref).norm() / ref.norm())
            lines.append(f"| {t} | {s:.0%} | {t_dense * 1e3:.3f} | {t_cats * 1e3:.3f} | {t_dense / t_cats:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
    path = "Triton kernel" if device == "cuda" else "reference (dense MLP plus mask)"
    report_kernel("cats-mlp", "cats_mlp.py", args, device,
                  f"CATS MLP ({hidden} -> {inter} -> {hidden}, {str(dtype).replace('torch.', '')})",
                  f"sparsecc's op runs the {path}; ratio = dense MLP time / its time.", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

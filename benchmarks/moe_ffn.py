"""MoE FFN (sparsecc::moe_ffn) vs a per-expert loop and the dense FFN of the same total size.

    python benchmarks/moe_ffn.py                    # GPU if there is one, else CPU
    python benchmarks/moe_ffn.py --quick            # small shapes (a smoke test)
    python benchmarks/moe_ffn.py --write-results    # the moe-ffn-<device> section of RESULTS.md

Mixtral-like shapes: hidden 4096, 8 experts of 1792 neurons (a 14336-neuron dense FFN split in
8), top-2 routing with a random router, mode "sum", no capacity limit. The per-expert loop is
the op's reference (one group of PyTorch matmuls per expert); the dense FFN runs all neurons.
On GPU the op runs the grouped Triton kernel (one launch per stage for all experts); on CPU
it runs the reference, so its time equals the loop's and only the dense comparison says
anything there. Goal (issue 6, GPU): grouped ≥ 2x the per-expert loop at 8 experts.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecc.codegen.moe_ffn import moe_ffn_reference
from sparsecc.ops import use_kernels

try:
    from results import add_device_args, bench_mode, device_dtype, median_time, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_time, report_kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 1 16 2048 (GPU), 1 16 256 (CPU)")
    p.add_argument("--quick", action="store_true", help="hidden 128, 4 experts of 64 neurons")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    hidden, size, e = (128, 64, 4) if args.quick else (4096, 14336 // args.experts, args.experts)
    k = min(args.top_k, e)
    tokens = args.tokens or ([1, 16] if args.quick else [1, 16, 2048] if device == "cuda" else [1, 16, 256])
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g, dtype=dtype)  # noqa: E731
    w_gate, w_up, w_down = r(e, size, hidden) / hidden ** 0.5, r(e, size, hidden) / hidden ** 0.5, r(e, hidden, size) / size ** 0.5
    router = torch.randn(e, hidden, device=device, generator=g)
    dense_gate, dense_up = w_gate.reshape(e * size, hidden), w_up.reshape(e * size, hidden)
    dense_down = w_down.permute(1, 0, 2).reshape(hidden, e * size)
    lines = ["| tokens | dense FFN ms | per-expert loop ms | sparsecc ms | vs loop | vs dense | rel. error |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    for t in tokens:
        x = r(t, hidden)
        args_ = (router, None, w_gate, None, w_up, None, w_down, None, k, 0.0, "silu", "sum")
        t_dense = median_time(lambda: F.linear(F.silu(F.linear(x, dense_gate)) * F.linear(x, dense_up), dense_down),
                              device, args.reps)
        t_loop = median_time(lambda: moe_ffn_reference(x, *args_), device, args.reps)
        with use_kernels(bench_mode(device)):
            y = torch.ops.sparsecc.moe_ffn(x, *args_)
            t_ours = median_time(lambda: torch.ops.sparsecc.moe_ffn(x, *args_), device, args.reps)
        ref = moe_ffn_reference(x.double(), router.double(), None, w_gate.double(), None, w_up.double(), None,
                                w_down.double(), None, k, 0.0, "silu", "sum")
        err = float((y.double() - ref).norm() / ref.norm())
        lines.append(f"| {t} | {t_dense * 1e3:.3f} | {t_loop * 1e3:.3f} | {t_ours * 1e3:.3f} | {t_loop / t_ours:.2f} | "
                     f"{t_dense / t_ours:.2f} | {err:.1e} |")
        print(lines[-1], flush=True)
    path = "grouped Triton kernel" if device == "cuda" else "reference (the per-expert loop)"
    report_kernel("moe-ffn", "moe_ffn.py", args, device,
                  f"MoE FFN ({e} experts of {size}, top-{k}, hidden {hidden}, {str(dtype).replace('torch.', '')})",
                  f"sparsecc's op runs the {path}; 'vs' = other time / sparsecc time (above 1: sparsecc faster); "
                  f"the dense FFN has all {e * size} neurons.", "\n".join(lines), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

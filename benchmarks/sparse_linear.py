"""Unstructured sparse weights: the pruned nn.Linear (dense product) vs the same weight stored CSR
(sparsecc.compress_csr_: torch's sparse product, MKL on CPU, cuSPARSE on GPU), at LLM shapes and
high sparsities, in one run.

    python benchmarks/sparse_linear.py --device cpu                  # the CPU case of issue 6
    python benchmarks/sparse_linear.py --quick                       # small shapes (a smoke test)
    python benchmarks/sparse_linear.py --device cpu --write-results  # the sparse-linear-<device> section

An unstructured-pruned linear runs as the pruned nn.Linear (zeros stored, the dense product)
unless `sparsecc.compress_csr_` stores it CSR (`CSRLinear`: int32 indices, y = (W_csr @ xᵀ)ᵀ).
Weights here have a uniformly random `sparsity` share of zeros (what magnitude/Wanda/SparseGPT
leave per row, near enough). Times are medians of interleaved calls; ratio = dense time / CSR
time (above 1: CSR faster). Bytes = what one product reads of the weight (CSR: values, column
indices, row pointers). compress_csr_'s default threshold (90% zeros) comes from these figures.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from sparsecc import CSRLinear

try:
    from results import add_device_args, device_dtype, median_times, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, device_dtype, median_times, report_kernel

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-7B: q/k/v/o, gate/up, down ([out, in])


def csr_bytes(lin: CSRLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (lin.values, lin.col, lin.crow))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--quick", action="store_true", help="one 512 x 512 weight")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    shapes = [(512, 512)] if args.quick else SHAPES
    g = torch.Generator(device=device).manual_seed(0)
    lines = ["| weight [out, in] | sparsity | tokens | dense ms | CSR ms | ratio | weight MiB dense / CSR | rel. error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, generator=g, dtype=dtype) / in_f ** 0.5
        for s in args.sparsity:
            keep = torch.rand(out_f, in_f, device=device, generator=g) >= s
            ws = w * keep
            dense = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
            dense.weight.data = ws
            wc = CSRLinear.from_linear(dense)
            mib = f"{ws.numel() * ws.element_size() / 2**20:.1f} / {csr_bytes(wc) / 2**20:.1f}"
            for t in args.tokens:
                x = torch.randn(t, in_f, device=device, generator=g, dtype=dtype)
                fns = {"dense": lambda: F.linear(x, ws), "csr": lambda: wc(x)}
                ref = F.linear(x.double(), ws.double())
                err = float((fns["csr"]().double() - ref).norm() / ref.norm())
                times = median_times(fns, device, args.reps)
                lines.append(f"| {out_f} x {in_f} | {s:.0%} | {t} | {times['dense'] * 1e3:.3f} | {times['csr'] * 1e3:.3f} "
                             f"| {times['dense'] / times['csr']:.2f} | {mib} | {err:.1e} |")
                print(lines[-1], flush=True)
    report_kernel("sparse-linear", "sparse_linear.py", args, device,
                  f"Unstructured sparse linear, dense vs CSR ({str(dtype).replace('torch.', '')})",
                  "Dense F.linear with the pruned weight vs CSRLinear (torch's CSR product); ratio = dense time / CSR time.",
                  "\n".join(lines), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

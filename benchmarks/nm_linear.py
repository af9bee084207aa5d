"""N:M sparse linear (sparsecc::nm_linear) vs the dense F.linear, at LLM shapes, in one run.

    python benchmarks/nm_linear.py                    # GPU if there is one, else CPU
    python benchmarks/nm_linear.py --quick            # small shapes (a smoke test)
    python benchmarks/nm_linear.py --write-results    # also the nm-linear-<device> section of RESULTS.md

For each weight [out, in] (2:4 by default, magnitude-pruned random weights) and each number of
tokens, it first checks the op against the dense product (relative error), then times, with
the median of many runs: dense F.linear (cuBLAS on GPU), sparsecc's op (the Triton kernel on
GPU; on CPU the reference: decompress + dense product), and on GPU torch's semi-structured
2:4 tensors (cuSPARSELt/CUTLASS) where this torch and GPU support them, and the op in kernel
mode "auto" (what users get: the way — Triton kernel, reference, or torch's 2:4 product — the
tuner timed fastest for the shape). Ratio = dense time / time (above 1: faster than dense).
Bytes = the weight bytes one product must read.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecc.ops import last_way, use_kernels
from sparsecc.codegen.nm_format import compress
from sparsecc.prune import magnitude

try:
    from results import add_device_args, bench_mode, device_dtype, median_time, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_time, report_kernel

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-7B: q/k/v/o, gate/up, down ([out, in])


def semi_structured(w: torch.Tensor):
    """torch's 2:4 tensor for w, or the reason there is none."""
    try:
        from torch.sparse import to_sparse_semi_structured
        return to_sparse_semi_structured(w), None
    except Exception as e:  # unsupported GPU, dtype or build
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 1 16 2048 (GPU), 1 16 256 (CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    n, m = (int(v) for v in args.pattern.split(":"))
    shapes = [(256, 256), (512, 256)] if args.quick else SHAPES
    tokens = args.tokens or ([1, 16] if args.quick else [1, 16, 2048] if device == "cuda" else [1, 16, 256])
    torch.manual_seed(0)

    head = ["| weight [out, in] | tokens | dense ms | sparsecc ms | ratio | rel. error |"]
    if device == "cuda":
        head = ["| weight [out, in] | tokens | dense ms | sparsecc ms | ratio | torch 2:4 ms | ratio | auto ms | ratio "
                "| auto runs | rel. error (worst) |"]
    lines = head + ["|" + " --- |" * (head[0].count("|") - 1)]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    notes = set()
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=torch.float32)
        w = (w * magnitude(w, pattern=args.pattern)).to(dtype)
        values, index = compress(w, n, m)
        dense_bytes = w.numel() * w.element_size()
        nm_bytes = values.numel() * values.element_size() + index.numel()
        semi, why = semi_structured(w) if device == "cuda" and (n, m) == (2, 4) else (None, None)
        if why:
            notes.add(f"torch 2:4 unavailable: {why}")
        for t in tokens:
            x = torch.randn(t, in_f, device=device, dtype=dtype)
            with use_kernels(bench_mode(device)):
                sparse_fn = lambda: torch.ops.sparsecc.nm_linear(x, values, index, None, n, m, in_f)  # noqa: E731
                y = sparse_fn()
                ref = F.linear(x.double(), w.double())
                err = float((y.double() - ref).norm() / ref.norm())
                t_sparse = median_time(sparse_fn, device, args.reps)
            t_dense = median_time(lambda: F.linear(x, w), device, args.reps)
            row = f"| {out_f} x {in_f} | {t} | {t_dense * 1e3:.3f} | {t_sparse * 1e3:.3f} | {t_dense / t_sparse:.2f} |"
            if device == "cuda":
                if semi is not None:
                    t_semi = median_time(lambda: F.linear(x, semi), device, args.reps)
                    row += f" {t_semi * 1e3:.3f} | {t_dense / t_semi:.2f} |"
                else:
                    row += " n/a | - |"
                with use_kernels("auto"):
                    y_auto = sparse_fn()  # the first call times the ways (tuning.py); later calls run the chosen one
                    err = max(err, float((y_auto.double() - ref).norm() / ref.norm()))
                    t_auto = median_time(sparse_fn, device, args.reps)
                row += f" {t_auto * 1e3:.3f} | {t_dense / t_auto:.2f} | {last_way['nm_linear']} |"
            lines.append(row + f" {err:.1e} |")
            print(lines[-1], flush=True)
        notes.add(f"weight bytes per product: dense {dense_bytes / 2**20:.1f} MiB vs {args.pattern} compressed "
                  f"{nm_bytes / 2**20:.1f} MiB for {out_f} x {in_f} ({nm_bytes / dense_bytes:.3f} of dense)")
    path = "Triton kernel" if device == "cuda" else "reference (decompress, then dense product)"
    report_kernel("nm-linear", "nm_linear.py", args, device,
                  f"N:M linear ({args.pattern}, {str(dtype).replace('torch.', '')})",
                  f"sparsecc's op runs the {path}; ratio = dense time / its time (above 1: faster than dense).",
                  "\n".join(lines + [""] + [f"- {s}" for s in sorted(notes)]), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

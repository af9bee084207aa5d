"""CATS MLP (sparsecc::cats_mlp) vs the dense gated MLP, at LLaMA-7B shapes, in one run.

    python benchmarks/cats_mlp.py                    # GPU if there is one, else CPU
    python benchmarks/cats_mlp.py --quick            # small shapes (a smoke test)
    python benchmarks/cats_mlp.py --write-results    # also the cats-mlp-<device> section of RESULTS.md

Random weights and inputs; the threshold is set to the sparsity-quantile of |SiLU(x W_gateᵀ)| of
the benchmark's own input, so the stated share of neurons is inactive for every token (real
activations would be measured with `sparsecc.activation_sparsity`). Times are medians; ratio =
dense MLP time / CATS time (above 1: faster). W_down is laid out for the op as the CATS rewrite
stores it (column-major except half/bf16 on CPU; the dense baseline keeps nn.Linear's row-major). On GPU the op runs the
Triton kernel; on CPU `cats_mlp_cpu`, which reads only the active neurons' rows where its rule
says that pays and otherwise runs the dense MLP plus a mask (column "CPU path"; "active" is the
share of neurons active for some token of the batch). The seed's goal: ≥ 1.4x dense at 50% for
one token; reading W_gate fully and half of W_up and W_down bounds it at 1.5x.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecc.codegen import cats_cpu
from sparsecc.ops import use_kernels

try:
    from results import add_device_args, bench_mode, device_dtype, median_times, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_times, report_kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--quick", action="store_true", help="hidden 256, intermediate 512")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    hidden, inter = (256, 512) if args.quick else (args.hidden, args.inter)
    g = torch.Generator(device=device).manual_seed(0)
    w_gate, w_up = (torch.randn(inter, hidden, device=device, generator=g, dtype=dtype) / hidden ** 0.5 for _ in "gu")
    w_down = torch.randn(hidden, inter, device=device, generator=g, dtype=dtype) / inter ** 0.5
    # the layout the CATS rewrite gives W_down: column-major ([inter, hidden]-contiguous) except
    # for half/bf16 on CPU (cats_cpu.wants_column_major)
    w_down_cm = w_down.t().contiguous().t() if cats_cpu.wants_column_major(w_down) else w_down

    def dense(x):
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    cpu = device == "cpu"
    lines = ["| tokens | sparsity | active | " + ("CPU path | " if cpu else "") + "dense MLP ms | CATS ms | ratio | rel. error |",
             "| ---: | ---: | ---: | " + ("--- | " if cpu else "") + "---: | ---: | ---: | ---: |"]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    for t in args.tokens:
        x = torch.randn(t, hidden, device=device, generator=g, dtype=dtype)
        v = F.silu(F.linear(x.float(), w_gate.float())).abs().flatten().sort().values
        vv = F.silu(F.linear(x.double(), w_gate.double()))
        fns, rows = {"dense": lambda: dense(x)}, []
        for s in args.sparsity:
            k = min(max(1, int(s * v.numel())), v.numel() - 1)
            thr = float(v[k - 1] + v[k]) / 2  # between two activations: no neuron sits on the threshold
            fns[s] = lambda thr=thr: torch.ops.sparsecc.cats_mlp(x, w_gate, None, w_up, None, w_down_cm, None, thr, "silu")
            with use_kernels(bench_mode(device)):
                y = fns[s]()
            ref = F.linear(vv * (vv.abs() >= thr) * F.linear(x.double(), w_up.double()), w_down.double())
            rows.append((s, float((vv.abs() >= thr).any(0).double().mean()), float((y.double() - ref).norm() / ref.norm())))
        with use_kernels(bench_mode(device)):
            times = median_times(fns, device, args.reps)  # CPU: interleaved, dense and CATS alike
        for s, active, err in rows:
            sparse = cats_cpu.column_major(w_down_cm) and cats_cpu.pays(t, active, inter, hidden)
            path = ("active rows | " if sparse else "dense | ") if cpu else ""
            lines.append(f"| {t} | {s:.0%} | {active:.0%} | {path}{times['dense'] * 1e3:.3f} | {times[s] * 1e3:.3f} | "
                         f"{times['dense'] / times[s]:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
    # what W_down's layout costs the dense down projection (why half/bf16 on CPU stay row-major)
    h = torch.randn(args.tokens[0], inter, device=device, generator=g, dtype=dtype)
    col = w_down.t().contiguous().t()
    lay = median_times({"row": lambda: F.linear(h, w_down), "col": lambda: F.linear(h, col)}, device, args.reps)
    lines += ["", f"- dense down projection, {args.tokens[0]} token(s): W_down row-major {lay['row'] * 1e3:.3f} ms, "
                  f"column-major {lay['col'] * 1e3:.3f} ms"]
    print("\n" + lines[-1], flush=True)
    path = "Triton kernel" if device == "cuda" else "CPU path (cats_cpu.py)"
    report_kernel("cats-mlp", "cats_mlp.py", args, device,
                  f"CATS MLP ({hidden} -> {inter} -> {hidden}, {str(dtype).replace('torch.', '')})",
                  f"sparsecc's op runs the {path}; ratio = dense MLP time / its time.", "\n".join(lines), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

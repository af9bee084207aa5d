"""Weight-only quantized linear (sparsecc::quant_linear, through pack_'s QuantLinear) vs the dense linear, in one run.

    python benchmarks/quant_linear.py                    # GPU if there is one, else CPU
    python benchmarks/quant_linear.py --quick            # a small weight (a smoke test)
    python benchmarks/quant_linear.py --write-results    # also the quant-linear-<device> section of RESULTS.md

The weight (LLaMA-7B's down_proj, [4096, 11008], random) is rtn-quantized twice: int8 symmetric with
one scale per output row, and int4 with groups of 128 (asymmetric); each nn.Linear holding the
dequantized weight and its grid is packed by `sparsecc.pack_` into a QuantLinear. For each number of
tokens it checks each product against the float64 product of the dequantized weight (relative
error), then times, with medians of interleaved calls: the dense F.linear (fp32 on CPU, cuBLAS fp16
on GPU) and the QuantLinears: on CPU their kernel mode "auto" (torch's int8/int4 weight-only
kernels on the layout QuantLinear built once, x in bf16); on GPU the Triton kernel itself and mode
"auto" (what users get: the way the tuner timed fastest, the kernel or dequantize-then-cuBLAS).
Ratio = dense time / time (above 1: faster than dense). Bytes = the weight bytes one product reads.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from sparsecc.ops import last_way, use_kernels
from sparsecc.prune.quantize import QUANTIZED, rtn
from sparsecc.techniques.packing import QuantLinear, pack_

try:
    from results import add_device_args, bench_mode, device_dtype, median_times, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_times, report_kernel

SHAPES = [(4096, 11008)]  # LLaMA-7B down_proj ([out, in])
FORMS = {"int8": dict(bits=8, group_size=None, sym=True), "int4": dict(bits=4, group_size=128, sym=False)}


def quant_layer(w: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> tuple[QuantLinear, torch.Tensor]:
    """(QuantLinear packed by pack_, its dequantized weight) for the weight w."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    wq, grid = rtn(w, bits, group_size, sym)
    lin.weight.data = wq
    lin.__dict__[QUANTIZED] = grid
    holder = nn.Sequential(lin)
    forms = pack_(holder, "quant")
    assert list(forms) == ["0"], forms
    return holder[0], wq


def stored_bytes(q: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (q.codes, q.scales, q.zeros))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--quick", action="store_true", help="one 512 x 1024 weight, few repeats")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    shapes = [(512, 1024)] if args.quick else SHAPES
    tokens = [1, 16] if args.quick and args.tokens == [1, 16, 128] else args.tokens
    g = torch.Generator(device=device).manual_seed(0)
    cuda = device == "cuda"
    ways = ["triton", "auto"] if cuda else ["auto"]
    cols = [f"{f} {w} ms | ratio" for w in ways for f in FORMS] if cuda else [f"{f} ms | ratio" for f in FORMS]
    head = f"| weight [out, in] | tokens | dense {str(dtype).replace('torch.', '')} ms | {' | '.join(cols)} |" \
           + (" auto runs |" if cuda else "") + " rel. error (worst) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    notes = []
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f, device=device, generator=g) / in_f ** 0.5).to(dtype)
        layers = {f: quant_layer(w, **spec) for f, spec in FORMS.items()}
        dense_bytes = w.numel() * w.element_size()
        notes.append(f"weight bytes per product for {out_f} x {in_f}: dense {dense_bytes / 2**20:.1f} MiB, "
                     + ", ".join(f"{f} {stored_bytes(q) / 2**20:.1f} MiB ({stored_bytes(q) / dense_bytes:.3f} of dense)"
                                 for f, (q, _) in layers.items()))
        if not cuda:
            made = {f: q.cpu_weight is not None for f, (q, _) in layers.items()}
            notes.append("torch's CPU kernels in use: " + ", ".join(f"{f} {'yes' if v else 'NO (reference)'}"
                                                                      for f, v in made.items()))
        for t in tokens:
            x = torch.randn(t, in_f, device=device, generator=g).to(dtype)
            fns = {"dense": lambda: F.linear(x, w)}
            err = 0.0
            runs = []
            for way in ways:
                mode = bench_mode(device) if way != "auto" else "auto"
                for f, (q, wq) in layers.items():
                    def fn(q=q, mode=mode):
                        with use_kernels(mode):
                            return q(x)
                    with torch.no_grad():
                        y = fn()  # on the GPU the first call tunes (launch configs; in "auto" also the way)
                        ref = F.linear(x.double(), wq.double())
                        err = max(err, float((y.double() - ref).norm() / ref.norm()))
                    if way == "auto" and cuda:
                        runs.append(f"{f}: {last_way.get('quant_linear', '?')}")
                    fns[f"{f} {way}"] = fn
            with torch.no_grad():
                times = median_times(fns, device, args.reps)
            row = f"| {out_f} x {in_f} | {t} | {times['dense'] * 1e3:.3f} |"
            for way in ways:
                for f in FORMS:
                    row += f" {times[f'{f} {way}'] * 1e3:.3f} | {times['dense'] / times[f'{f} {way}']:.2f} |"
            if cuda:
                row += f" {', '.join(runs)} |"
            lines.append(row + f" {err:.1e} |")
            print(lines[-1], flush=True)
    way = ("the Triton kernel (forced) and mode auto" if cuda else
           "torch's weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) with x cast to bf16")
    report_kernel("quant-linear", "quant_linear.py", args, device,
                  f"Weight-only quantized linear, int8 (per row, sym) and int4 (g128) vs dense "
                  f"{str(dtype).replace('torch.', '')}",
                  f"QuantLinear (pack_) runs {way}; ratio = dense time / its time (above 1: faster than dense); "
                  "rel. error against the float64 product of the dequantized weight.",
                  "\n".join(lines + [""] + [f"- {s}" for s in notes]), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

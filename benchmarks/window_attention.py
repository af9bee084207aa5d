"""Window + sink attention (sparsecc::window_attention) vs dense causal SDPA and FlexAttention with
the same mask, prefill at growing lengths and decode against the rolling cache, in one run.

    python benchmarks/window_attention.py                    # GPU if there is one, else CPU
    python benchmarks/window_attention.py --quick            # small shapes (a smoke test)
    python benchmarks/window_attention.py --write-results    # window-attention-<device> section of RESULTS.md

Shapes: batch 1, 32 query heads / 8 KV heads (grouped), head dim 128, window 1020 + 4 sinks (a
1024-position cache, StreamingLLM's setting). Prefill: T queries over T keys; decode: 1 query
over the 1024 cached keys, where dense attention would read all T. On GPU the op runs the Triton
kernel, which reads only the sink and window key blocks, so its time should grow linearly in T
(dense SDPA: quadratically); FlexAttention gets the same mask as a BlockMask, rebuilt for each
length as it must be (its build time is reported apart). On CPU the op runs its blocked PyTorch
path (a block of queries against only the keys it can see), linear in T too. Goal (issue 6,
GPU): time linear in length and ≥ 0.9x FlexAttention.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sparsecc.ops import use_kernels
from sparsecc.codegen.window_attention import window_attention_reference

try:
    from results import add_device_args, bench_mode, device_dtype, median_time, report_kernel
except ImportError:  # run as a module
    from benchmarks.results import add_device_args, bench_mode, device_dtype, median_time, report_kernel


def flex(q, k, v, sinks, window):
    """FlexAttention with the same mask (None where it is unavailable), and the mask's build time."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None, 0.0

    def mask_mod(b, h, qi, ki):
        qi = qi + (k.shape[2] - q.shape[2])
        return (ki <= qi) & ((qi - ki < window) | (ki < sinks))
    t0 = time.perf_counter()
    block = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device)
    build = time.perf_counter() - t0
    fn = torch.compile(flex_attention)
    return (lambda: fn(q, k, v, block_mask=block, enable_gqa=True)), build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 1024..16384 (GPU), 512..4096 (CPU)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--quick", action="store_true", help="4 heads, head dim 32, lengths 64 128, window 60")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    device, dtype = device_dtype(args)
    hq, hk, d = (4, 2, 32) if args.quick else (32, 8, 128)
    window = 60 if args.quick else args.window
    lengths = args.lengths or ([64, 128] if args.quick else [1024, 2048, 4096, 8192, 16384] if device == "cuda"
                               else [512, 1024, 2048, 4096])
    s, cache = args.sinks, args.sinks + window
    g = torch.Generator(device=device).manual_seed(0)
    head = ("| phase | T (queries x keys) | dense SDPA ms | sparsecc ms | vs dense | FlexAttention ms (mask build ms) "
            "| vs Flex | rel. error |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    for n in lengths:
        for phase, t, keys in (("prefill", n, n), ("decode", 1, min(cache, n))):
            q = torch.randn(1, hq, t, d, device=device, dtype=dtype, generator=g)
            k, v = (torch.randn(1, hk, keys, d, device=device, dtype=dtype, generator=g) for _ in "kv")
            seen = n  # tokens streamed so far: the cache holds the sinks and the last keys - s of them
            j = torch.arange(keys, device=device)
            q_pos, k_pos = torch.arange(seen - t, seen, device=device), torch.where(j < s, j, j + seen - keys)
            with use_kernels(bench_mode(device)):
                fn = lambda: torch.ops.sparsecc.window_attention(q, k, v, q_pos, k_pos, None, window, 1, s,  # noqa: E731
                                                                 d ** -0.5, None)
                out = fn()
                t_ours = median_time(fn, device, args.reps)
            # dense: prefill is causal attention over all n keys; decode reads all n cached keys
            kd, vd = (torch.randn(1, hk, n, d, device=device, dtype=dtype, generator=g) for _ in "kv") \
                if phase == "decode" else (k, v)
            dense = lambda: F.scaled_dot_product_attention(q, kd, vd, is_causal=phase == "prefill",  # noqa: E731
                                                           enable_gqa=True)
            t_dense = median_time(dense, device, args.reps)
            fl, build = flex(q, k, v, s, window) if device == "cuda" else (None, 0.0)
            t_flex = median_time(fl, device, args.reps) if fl is not None else None
            ref = window_attention_reference(q.double(), k.double(), v.double(), q_pos, k_pos, None, window, 1, s,
                                             d ** -0.5, None) if n <= 2048 else None
            err = f"{float((out.double() - ref).norm() / ref.norm()):.1e}" if ref is not None else "-"
            flex_cells = (f"{t_flex * 1e3:.3f} ({build * 1e3:.1f}) | {t_flex / t_ours:.2f}" if t_flex is not None
                          else "- | -")
            lines.append(f"| {phase} | {t} x {keys} | {t_dense * 1e3:.3f} | {t_ours * 1e3:.3f} | "
                         f"{t_dense / t_ours:.2f} | {flex_cells} | {err} |")
            print(lines[-1], flush=True)
    path = "Triton kernel" if device == "cuda" else "blocked PyTorch path"
    report_kernel("window-attention", "window_attention.py", args, device,
                  f"Window + sink attention ({hq}/{hk} heads, head dim {d}, {s} sinks + window {window}, "
                  f"{str(dtype).replace('torch.', '')})",
                  f"sparsecc's op runs the {path}; 'vs' columns = other time / sparsecc time (above 1: sparsecc "
                  "faster). Decode: one query over the rolling cache; dense decode reads all T cached keys. "
                  "rel. error: against the reference in float64 (T <= 2048).",
                  "\n".join(lines), shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

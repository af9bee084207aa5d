"""Pruning time of one square linear layer by each method, next to the seeds' reported times.

    python benchmarks/prune_time.py [--size 4096] [--tokens 262144] [--sparsity 0.5]

The layer is [size, size] (a LLaMA-7B attention projection at 4096); its Hessian X^T X is built
from `tokens` calibration tokens (SparseGPT/Wanda use 128 sequences x 2048 = 262144) in chunks,
with X drawn LLM-like: per-channel scales, a few outlier channels and a rank-64 correlated part
(so H is far from diagonal). Hessian construction is timed separately: it is shared calibration
work, not pruning. Wanda's ||X_j||_2 is read off diag(X^T X) (the same number InputStats gives).
OBS is not run on the whole layer: the call is made to show its cost guard refusing it, and its
time is extrapolated from running it on a few rows (its cost is linear in the rows).
Prints a markdown table (--write-results: also the "prune-time" section of RESULTS.md). SparseGPT's column sweep, OBS and the permutation search
run their small-op loops on one thread whatever --threads says (see sparsegpt.single_thread).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from sparsecc.errors import RecipeError
from sparsecc.prune.obs import DEFAULT_MAX_COST, obs, obs_cost
from sparsecc.prune.sparsegpt import sparsegpt
from sparsecc.prune.wanda import wanda

try:
    from results import machine, write_section
except ImportError:  # run as a module
    from benchmarks.results import machine, write_section

# Seed 002 (Wanda talk), "Pruning Efficiency", LLaMA, whole model; the seed states neither unit
# nor hardware (the Wanda paper: seconds, excluding the shared forward passes).
SEED_002 = {"SparseGPT": {"7B": 203.1, "13B": 339.0, "30B": 810.3, "65B": 1353.4},
            "Wanda": {"7B": 0.54, "13B": 0.91, "30B": 2.9, "65B": 5.6}}
# Seed 003 (unstructured pruning deep dive), Table 1: whole BERT-base (CoNLL-2003, 4096 samples), s.
SEED_003 = {"OBS": "192.5 (50%) .. 300.7 (80%)", "SparseGPT": "18.0", "Wanda": "0.9"}


def build_hessian(size: int, tokens: int, chunk: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(size, generator=g))
    scale[torch.randperm(size, generator=g)[: max(1, size // 512)]] *= 20.0  # outlier features
    mix = torch.randn(64, size, generator=g) / 8.0
    h = torch.zeros(size, size)
    done = 0
    while done < tokens:
        t = min(chunk, tokens - done)
        x = torch.randn(t, size, generator=g) * scale + torch.randn(t, 64, generator=g) @ mix
        h.addmm_(x.t(), x)
        done += t
    return h


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=8192, help="calibration tokens per X chunk")
    ap.add_argument("--obs-rows", type=int, default=1, help="rows OBS is timed on for the extrapolation")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); on a busy machine 1 can be far faster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-results", action="store_true", help="update the prune-time section of RESULTS.md")
    a = ap.parse_args()
    d, s = a.size, a.sparsity
    if a.threads:
        torch.set_num_threads(a.threads)

    t_h, h = timed(lambda: build_hessian(d, a.tokens, a.chunk, a.seed))
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(a.seed + 1)) / d ** 0.5
    act_norm = h.diagonal().sqrt()

    rows = []
    t_wanda, _ = timed(lambda: wanda(w, act_norm, s))
    rows.append(("Wanda", f"{s:.0%}", f"{t_wanda:.3f}"))
    t, _ = timed(lambda: wanda(w, act_norm, pattern="2:4"))
    rows.append(("Wanda", "2:4", f"{t:.3f}"))
    t_sgpt, _ = timed(lambda: sparsegpt(w, h, s))
    rows.append(("SparseGPT (B = B_s = 128)", f"{s:.0%}", f"{t_sgpt:.2f}"))
    t, _ = timed(lambda: sparsegpt(w, h, pattern="2:4"))
    rows.append(("SparseGPT (B = 128)", "2:4", f"{t:.2f}"))

    k = int(d * s)
    cost = obs_cost(d, d, k)
    try:
        t_obs, _ = timed(lambda: obs(w, h, s, name=f"{d}x{d}"))
        rows.append(("OBS (exact, row by row)", f"{s:.0%}", f"{t_obs:.2f}"))
    except RecipeError:
        r = min(a.obs_rows, d)
        t_obs, _ = timed(lambda: obs(w[:r], h, s, max_cost=float("inf")))
        rows.append((f"OBS: refused by max_cost={DEFAULT_MAX_COST:.0e} ({cost:.2g} multiply-adds)", f"{s:.0%}",
                     f"~{t_obs * d / r:,.0f} estimated ({t_obs:.1f} s measured on {r} of the {d} rows)"))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = [f"One {d}x{d} linear, Hessian from {a.tokens} tokens ({t_h:.1f} s to build, not counted); "
           f"{machine()}; load average {load:.1f} at the end.", "",
           "| method | sparsity | seconds, this machine, one layer |", "| --- | --- | --- |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "Seed figures (whole models):", "",
            "| method | seed 002: LLaMA 7B / 13B / 30B / 65B (no unit given; the paper says seconds) "
            "| seed 003: BERT-base CoNLL, seconds |", "| --- | --- | --- |"]
    out += [f"| {m} | {' / '.join(str(v) for v in SEED_002[m].values())} | {SEED_003[m]} |" for m in ("SparseGPT", "Wanda")]
    out.append(f"| OBS | - | {SEED_003['OBS']} |")
    seed_ratio = SEED_002["SparseGPT"]["7B"] / SEED_002["Wanda"]["7B"]
    out += ["", f"SparseGPT / Wanda time at {s:.0%}: {t_sgpt / t_wanda:.0f}x here (one layer, CPU) vs {seed_ratio:.0f}x "
            f"in seed 002 (LLaMA-7B) and {float(SEED_003['SparseGPT']) / float(SEED_003['Wanda']):.0f}x in seed 003 (BERT-base)."]
    text = "\n".join(out)
    print(text)
    if a.write_results:
        write_section("prune-time", "\n".join([
            "## Pruning time", "", text, "",
            f"Measured {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/prune_time.py --write-results`. "
            "The seeds time whole models on hardware they do not state, so compare the ratios between methods, not the seconds."]))

if __name__ == "__main__":
    main()

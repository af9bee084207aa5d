"""Perplexity of the reference model pruned by each method, in the layout of the seeds' tables.

    python benchmarks/prune_quality.py [--model ref|tiny] [--nsamples 128] [--eval-windows 0] [--write-results]

Dense; magnitude, Wanda, SparseGPT at 50% unstructured, 4:8 and 2:4; then 70% uniform vs OWL.
Every linear but lm_head is pruned (as in SparseGPT/Wanda), calibrating block-sequentially on
`nsamples` random windows of the training split; perplexity on the whole test split.
"""
from __future__ import annotations

import argparse
import copy
import time


import sparsecc
from sparsecc.tools.evaluate import perplexity
from sparsecc.prune.owl import outlier_ratio

try:
    from results import README, add_quality_args, machine, quality_setup, write_section
except ImportError:  # run as a module
    from benchmarks.results import README, add_quality_args, machine, quality_setup, write_section

METHODS = {"Magnitude": lambda **kw: sparsecc.MagnitudeConfig(**kw),
           "Wanda": lambda **kw: sparsecc.WandaConfig(**kw),
           "SparseGPT": lambda **kw: sparsecc.SparseGPTConfig(**kw)}
SETTINGS = {"50%": dict(sparsity=0.5), "4:8": dict(pattern="4:8"), "2:4": dict(pattern="2:4")}


def run(model, batches, test_ids, seqlen, recipe, windows):
    m = copy.deepcopy(model)
    t = time.perf_counter()
    if recipe is not None:
        sparsecc.sparsify_(m, recipe, batches, progress=False)
    secs = time.perf_counter() - t
    return perplexity(m, test_ids, seqlen, max_windows=windows), secs


def outlier_lines(model, batches, skip) -> list[str]:
    """Why Wanda/OWL can (or cannot) beat magnitude here: the spread of the input column norms
    ||X_j|| (Wanda's score is |W_ij| ||X_j||: equal norms make it magnitude) and OWL's outlier
    ratio D_l (M = 5) per linear, from the dense model on the calibration batches."""
    stats = sparsecc.Pipeline([sparsecc.CollectInputStats()], progress=False).run(
        model, batches, keep_changes=False).stats["input_stats"]
    mods = dict(model.named_modules())
    lines = ["| linear (dense model) | max / median of ‖X_j‖₂ | max abs(x) | OWL D (M=5, %) |", "| --- | ---: | ---: | ---: |"]
    for name, st in stats.items():
        if name in skip:
            continue
        l2 = st.l2
        d = outlier_ratio(mods[name].weight.detach().abs() * l2[None, :], 5.0)
        lines.append(f"| {name} | {float(l2.max() / l2.median()):.1f} | {float(st.max_abs.max()):.1f} | {100 * d:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--eval-windows", type=int, default=0, help="0 = the whole test split")
    args = p.parse_args(argv)

    model, corpus, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    windows = args.eval_windows or None
    skip = {"lm_head": None}

    dense, _ = run(model, batches, test_ids, seqlen, None, windows)
    print(f"dense: {dense:.2f}", flush=True)
    table = {}
    for name, make in METHODS.items():
        for col, kw in SETTINGS.items():
            table[name, col] = run(model, batches, test_ids, seqlen, {"default": make(**kw), **skip}, windows)
            print(f"{name} {col}: {table[name, col][0]:.2f} ({table[name, col][1]:.1f} s)", flush=True)
    owl = {}
    for name, make in METHODS.items():
        for col, kw in {"uniform": {}, "OWL": dict(layerwise="owl")}.items():
            owl[name, col] = run(model, batches, test_ids, seqlen, {"default": make(sparsity=0.7, **kw), **skip}, windows)
            print(f"{name} 70% {col}: {owl[name, col][0]:.2f}", flush=True)

    lines = [f"| {args.model} model | {' | '.join(SETTINGS)} |", "| --- |" + " ---: |" * len(SETTINGS),
             f"| Dense | {' | '.join(f'{dense:.2f}' for _ in SETTINGS)} |"]
    for name in METHODS:
        lines.append(f"| {name} | {' | '.join(f'{table[name, c][0]:.2f}' for c in SETTINGS)} |")
    lines += ["", "| 70% sparsity | uniform | OWL |", "| --- | ---: | ---: |"]
    for name in METHODS:
        lines.append(f"| {name} | {owl[name, 'uniform'][0]:.2f} | {owl[name, 'OWL'][0]:.2f} |")
    lines += ["", "| pruning time (s, whole model) | " + " | ".join(SETTINGS) + " |", "| --- |" + " ---: |" * len(SETTINGS)]
    for name in METHODS:
        lines.append(f"| {name} | {' | '.join(f'{table[name, c][1]:.1f}' for c in SETTINGS)} |")
    outliers = "\n".join(outlier_lines(model, batches, skip))
    text = "\n".join(lines)
    print("\n" + text + "\n\n" + outliers)
    if args.write_results:
        scope = "the whole test split" if windows is None else f"{windows} test windows"
        write_section("prune-quality", "\n".join([
            "## Pruning quality (WikiText-2 test perplexity)", "",
            f"The `{args.model}` zoo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"context {seqlen}); every linear but lm_head pruned; calibration: {args.nsamples} random windows of "
            f"{seqlen} tokens from the training split (seed {args.seed}), block-sequential; perplexity on {scope}.", "",
            text, "",
            "Activation outliers in the dense model: seed 002 credits Wanda's gain over magnitude to the "
            "emergent large-magnitude features of LLMs, and OWL allocates by them; where the column norms "
            "are nearly equal, Wanda's score is magnitude times a near-constant:", "",
            outliers, "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}. Produced by "
            f"`python benchmarks/prune_quality.py --model {args.model} --write-results`."]))
        write_section("prune-quality", "\n".join([  # the same tables, in README's Results section
            f"WikiText-2 test perplexity of the `{args.model}` reference model, every linear but lm_head pruned "
            f"(`python benchmarks/prune_quality.py --write-results`; details in `benchmarks/RESULTS.md`):", "",
            "\n".join(lines[:lines.index("| pruning time (s, whole model) | " + " | ".join(SETTINGS) + " |") - 1])]),
            path=README)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

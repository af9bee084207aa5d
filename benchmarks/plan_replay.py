"""Calibrate once, apply anywhere: a Plan of a mixed recipe replays the recipe exactly and cheaply.

    python benchmarks/plan_replay.py [--model ref|tiny] [--nsamples 128] [--write-results]

For each recipe, on the zoo model: `sparsify_(model, recipe, batches)` (calibration and rewrite in
one run), then `calibrate` -> `Plan.save` -> `Plan.load` -> `sparsify_(model, plan)` on a fresh
copy (no data). Reported: seconds of each step, the plan's size on disk, test perplexity of both
models and the largest logit difference between them on the test windows (0 = the same model).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import sparsecc
from sparsecc.tools.evaluate import perplexity

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

RECIPES = {
    "SparseGPT 2:4 + CATS 50% + 4 sinks/window 124": {
        "re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=4, window=124), "re:.*mlp": sparsecc.CATSConfig(0.5),
        "re:.*layers\\.\\d+\\.(mlp|self_attn)\\..*": sparsecc.SparseGPTConfig(pattern="2:4"), "lm_head": None},
    "Wanda 50% (OWL) + MoE 8 experts top-4": {
        "re:.*layers\\.\\d+\\.(mlp|self_attn)\\..*": sparsecc.WandaConfig(0.5, layerwise="owl"),
        "re:.*mlp": sparsecc.MoEConfig(8, 4), "lm_head": None},
}


@torch.no_grad()
def max_logit_diff(a, b, test_ids, seqlen: int, windows: int = 16) -> float:
    x = test_ids[: windows * seqlen].reshape(windows, seqlen)
    return max(float((a(w[None]).logits - b(w[None]).logits).abs().max()) for w in x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    args = p.parse_args(argv)

    model, _, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    lines = ["| recipe | sparsify_(recipe) s | calibrate s | plan on disk | load + sparsify_(plan) s "
             "| perplexity: recipe / plan | max logit difference |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    print("\n" + "\n".join(lines), flush=True)
    for label, recipe in RECIPES.items():
        direct = copy.deepcopy(model)
        t0 = time.perf_counter()
        sparsecc.sparsify_(direct, recipe, batches, progress=False)
        t_direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = sparsecc.calibrate(model, batches, recipe, progress=False)
        t_cal = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = plan.save(Path(tmp) / "plan")
            size = sum(f.stat().st_size for f in path.iterdir())
            replayed = copy.deepcopy(model)
            t0 = time.perf_counter()
            sparsecc.sparsify_(replayed, sparsecc.Plan.load(path))
            t_apply = time.perf_counter() - t0
        ppl_d, ppl_p = perplexity(direct, test_ids, seqlen), perplexity(replayed, test_ids, seqlen)
        diff = max_logit_diff(direct, replayed, test_ids, seqlen)
        lines.append(f"| {label} | {t_direct:.1f} | {t_cal:.1f} | {size / 2**20:.2f} MB | {t_apply:.2f} "
                     f"| {ppl_d:.2f} / {ppl_p:.2f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    intro = (f"The `{args.model}` zoo model; {args.nsamples} random training windows of {seqlen} tokens (seed "
             f"{args.seed}); perplexity on the whole test split; logits compared on 16 test windows. The plan "
             "holds every decision (masks and updated weights, CATS thresholds, MoE splits and routers, "
             "attention forms), so applying it needs no data and no calibration forward.")
    report("plan-replay", "Calibrate once, apply anywhere (Plans of mixed recipes)", intro, "\n".join(lines),
           f"python benchmarks/plan_replay.py --model {args.model} --write-results", args.write_results,
           shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

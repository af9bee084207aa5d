"""CATS on the reference model: perplexity and held-out activation sparsity at 50/70/90%.

    python benchmarks/cats_quality.py [--model ref|tiny] [--nsamples 128] [--write-results]

Thresholds are calibrated on `nsamples` random windows of the training split; the share of MLP
neurons zeroed is then measured on the test split (held-out text) and perplexity on the whole
test split. Also CATS 50% on top of SparseGPT 2:4 weights (the two compose). The seed (000,
CATS on Llama2-7B) reports zero-shot accuracy, not perplexity; its shape is what to compare:
average accuracy 0.659 dense, 0.643 at 50%, 0.614 at 70%, 0.476 at 90%.
"""
from __future__ import annotations

import argparse
import copy
import time

import sparsecc
from sparsecc.tools.evaluate import perplexity

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

SEED_LLAMA2_AVG_ACC = {"dense": 0.6589, 0.5: 0.6433, 0.7: 0.6143, 0.9: 0.4764}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    args = p.parse_args(argv)

    model, corpus, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    held = list(test_ids[: len(test_ids) // seqlen * seqlen].reshape(-1, seqlen).split(16))
    dense = perplexity(model, test_ids, seqlen)
    print(f"dense: {dense:.2f}", flush=True)
    lines = ["| setting | test perplexity | vs dense | neurons zeroed on test text (min .. max over layers) "
             "| calibration s | seed 000: Llama2-7B avg. accuracy |", "| --- | ---: | ---: | --- | ---: | ---: |",
             f"| dense | {dense:.2f} | 1.000 | - | - | {SEED_LLAMA2_AVG_ACC['dense']:.3f} |"]
    print("\n" + "\n".join(lines), flush=True)  # the header now, each row as it is measured
    runs = [(f"CATS {t:.0%}", {"re:.*mlp": sparsecc.CATSConfig(t)}, t) for t in (0.5, 0.7, 0.9)]
    runs.append(("SparseGPT 2:4 + CATS 50%", {"default": sparsecc.SparseGPTConfig(pattern="2:4"), "lm_head": None,
                                              "re:.*mlp": sparsecc.CATSConfig(0.5)}, None))
    for name, recipe, target in runs:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        sparsecc.sparsify_(m, recipe, batches, progress=False)
        secs = time.perf_counter() - t0
        share = sparsecc.activation_sparsity(m, held).values()
        ppl = perplexity(m, test_ids, seqlen)
        seed = f"{SEED_LLAMA2_AVG_ACC[target]:.3f}" if target in SEED_LLAMA2_AVG_ACC else "-"
        lines.append(f"| {name} | {ppl:.2f} | {ppl / dense:.3f} | {min(share):.1%} .. {max(share):.1%} | "
                     f"{secs:.1f} | {seed} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    report("cats-quality", "CATS (input-dependent MLP sparsity)",
           f"The `{args.model}` zoo model; thresholds from {args.nsamples} random training windows of {seqlen} tokens "
           f"(seed {args.seed}); the share of zeroed MLP neurons measured on the test split; perplexity on the "
           "whole test split.",
           text, f"python benchmarks/cats_quality.py --model {args.model} --write-results", args.write_results,
           shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

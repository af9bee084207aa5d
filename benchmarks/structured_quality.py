"""Structured pruning of MLP channels on the reference model: perplexity by score and update.

    python benchmarks/structured_quality.py [--model ref|tiny] [--nsamples 128] [--write-results]

Every gated MLP loses the same share of its intermediate channels (the linears shrink); scores
and updates as in `sparsecc/techniques/structured.py`. FLAP's paper (An et al. 2024) reports its
fluctuation metric with bias compensation well ahead of Wanda-SP on LLaMA; the issue's goal is
FLAP + refit >= 3% better than Wanda-SP without update at 50%.
"""
from __future__ import annotations

import argparse
import copy

import sparsecc
from sparsecc.tools.evaluate import perplexity

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

SETTINGS = [("magnitude", None), ("wanda-sp", None), ("wanda-sp", "refit"), ("flap", None), ("flap", "refit")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    args = p.parse_args(argv)

    model, _, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    dense = perplexity(model, test_ids, seqlen)
    params = sum(q.numel() for q in model.parameters())
    head = "| score | update | " + " | ".join(f"{s:.0%} of MLP channels" for s in args.sparsity) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---:" for _ in args.sparsity) + " |",
             "| dense | - | " + " | ".join(f"{dense:.2f}" for _ in args.sparsity) + " |"]
    print("\n" + "\n".join(lines), flush=True)
    sizes = {}
    for score, update in SETTINGS:
        cells = []
        for s in args.sparsity:
            m = copy.deepcopy(model)
            sparsecc.sparsify_(m, {"re:.*mlp": sparsecc.StructuredConfig(s, score=score, update=update)}, batches,
                               progress=False)
            sizes[s] = sum(q.numel() for q in m.parameters()) / params
            cells.append(f"{perplexity(m, test_ids, seqlen):.2f}")
        lines.append(f"| {score} | {update or 'none'} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append("| parameters vs dense | | " + " | ".join(f"{sizes[s]:.2f}x" for s in args.sparsity) + " |")
    intro = (f"The `{args.model}` zoo model; every gated MLP loses the given share of its intermediate channels "
             f"(gate/up rows and down columns removed: the linears shrink); statistics from {args.nsamples} "
             f"random training windows of {seqlen} tokens (seed {args.seed}); perplexity on the whole test split.")
    report("structured-quality", "Structured pruning of MLP channels (WikiText-2 test perplexity)", intro,
           "\n".join(lines), f"python benchmarks/structured_quality.py --model {args.model} --write-results",
           args.write_results, shown=len(lines) - 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

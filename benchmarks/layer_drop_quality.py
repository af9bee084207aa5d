"""Layer drop on the reference model: perplexity after removing whole decoder blocks.

    python benchmarks/layer_drop_quality.py [--model ref|tiny] [--nsamples 128] [--write-results]

`LayerDropConfig(n, score)` (sparsecc/techniques/layer_drop.py) removes the n blocks with the
lowest score, measured on the dense model: "bi", ShortGPT's Block Influence (1 - cos of a block's
input and output hidden states), or "loss", the calibration loss increase when the block alone is
skipped. The blocks are removed from the model (renumbered; the config says the new count).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--drop", type=int, nargs="+", default=[1, 2], help="blocks removed")
    args = p.parse_args(argv)

    model, _, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    layers = len(model.model.layers)
    if not all(0 < n < layers for n in args.drop):
        p.error(f"--drop: between 1 and {layers - 1} blocks (the model has {layers})")
    params = sum(q.numel() for q in model.parameters())
    lines = ["| score | blocks removed | blocks kept | parameters vs dense | perplexity |",
             "| --- | --- | ---: | ---: | ---: |",
             f"| dense | - | {layers}/{layers} | 1.00x | {perplexity(model, test_ids, seqlen):.2f} |"]
    print("\n" + "\n".join(lines), flush=True)
    for score in ("bi", "loss"):
        for n in args.drop:
            m = copy.deepcopy(model)
            report_ = sparsecc.sparsify_(m, {"model.layers": sparsecc.LayerDropConfig(n=n, score=score)}, batches,
                                         progress=False)
            row = report_.rows[0]
            removed = ", ".join(str(b) for b in row.get("dropped", [])) or "?"
            kept = sum(q.numel() for q in m.parameters()) / params
            lines.append(f"| {score} | {removed} | {layers - n}/{layers} | {kept:.2f}x | "
                         f"{perplexity(m, test_ids, seqlen):.2f} |")
            print(lines[-1], flush=True)
    intro = (f"The `{args.model}` zoo model; scores from {args.nsamples} random training windows of {seqlen} tokens "
             f"(seed {args.seed}), on the dense model; perplexity on the whole test split. Blocks are numbered "
             "from 0 (the embedding side).")
    report("layer-drop-quality", "Layer drop (WikiText-2 test perplexity)", intro, "\n".join(lines),
           f"python benchmarks/layer_drop_quality.py --model {args.model} --write-results", args.write_results,
           shown=len(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

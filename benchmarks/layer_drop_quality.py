"""Layer drop on the reference model: perplexity after removing whole decoder blocks.

    python benchmarks/layer_drop_quality.py [--model ref|tiny] [--nsamples 128] [--write-results]

`LayerDropConfig(n, score)` (sparsecc/techniques/layer_drop.py) removes the n blocks with the
lowest score, measured on the dense model: "bi", ShortGPT's Block Influence (1 - cos of a block's
input and output hidden states), "loss", the calibration loss increase when the block alone is
skipped, or "l0", the log_alpha of hard-concrete gates x + z (block(x) - x) learned on the calibration
batches toward n blocks removed (the config's defaults: 100 steps, lr 0.1, seed 0). The blocks are
removed from the model (renumbered; the config says the new count).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--drop", type=int, nargs="+", default=[1, 2], help="blocks removed")
    p.add_argument("--scores", nargs="+", default=["bi", "loss", "l0"], choices=["bi", "loss", "l0"],
                   help="block scores compared")
    p.add_argument("--l0-steps", type=int, default=100, help="gate-training steps of score l0 (the config's default: 100)")
    args = p.parse_args(argv)

    model, _, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    layers = len(model.model.layers)
    if not all(0 < n < layers for n in args.drop):
        p.error(f"--drop: between 1 and {layers - 1} blocks (the model has {layers})")
    params = sum(q.numel() for q in model.parameters())
    lines = ["| score | blocks removed | blocks kept | parameters vs dense | perplexity | scoring + drop (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: |",
             f"| dense | - | {layers}/{layers} | 1.00x | {perplexity(model, test_ids, seqlen):.2f} | - |"]
    print("\n" + "\n".join(lines), flush=True)
    for score in args.scores:
        for n in args.drop:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report_ = sparsecc.sparsify_(m, {"model.layers": layer_drop(n, score, args.l0_steps)}, batches,
                                         progress=False)
            seconds = time.perf_counter() - t0
            row = report_.rows[0]
            removed = ", ".join(str(b) for b in row.get("dropped", [])) or "?"
            kept = sum(q.numel() for q in m.parameters()) / params
            lines.append(f"| {score} | {removed} | {layers - n}/{layers} | {kept:.2f}x | "
                         f"{perplexity(m, test_ids, seqlen):.2f} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    steps = f" (`steps={args.l0_steps}`)" if "l0" in args.scores and args.l0_steps != 100 else ""
    intro = (f"The `{args.model}` zoo model; scores from {args.nsamples} random training windows of {seqlen} tokens "
             f"(seed {args.seed}), on the dense model; perplexity on the whole test split. Blocks are numbered "
             f"from 0 (the embedding side). Score l0{steps}: gates trained on the dense model, weights frozen.")
    report("layer-drop-quality", "Layer drop (WikiText-2 test perplexity)", intro, "\n".join(lines),
           f"python benchmarks/layer_drop_quality.py --model {args.model}"
           f"{f' --l0-steps {args.l0_steps}' if args.l0_steps != 100 else ''} --write-results", args.write_results,
           shown=len(lines))
    return 0


def layer_drop(n: int, score: str, l0_steps: int):
    return sparsecc.LayerDropConfig(n=n, score=score, **({"steps": l0_steps} if score == "l0" else {}))


if __name__ == "__main__":
    raise SystemExit(main())

"""Learned structured masks (L0Config: hard-concrete gates trained toward the target size) against the
one-shot structured scores, removing the same number of MLP channels of the reference model.

    python benchmarks/l0_quality.py [--model ref|tiny] [--steps 150] [--target 0.5] [--write-results]

Every MLP loses `target` of its intermediate channels (the linears shrink); the one-shot rows rank them
by a score computed once (techniques/structured.py), the L0 rows by log_alpha learned over `steps` Adam
steps on the calibration windows with the weights frozen (passes/analysis/unit_gates.py). Both remove
exactly the same count in every module, so every row has the same parameters. All methods see the same
calibration windows, grouped `--batch` to a gate step (the one-shot statistics are sums: the grouping
does not change them). FLAP + refit is the best one-shot score at 50% of the MLP channels in the
"Structured pruning" section.
"""
from __future__ import annotations

import argparse
import copy
import time

import sparsecc
from sparsecc.graph.calibration import CalibrationSet
from sparsecc.tools.evaluate import perplexity

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

ONE_SHOT = ["wanda-sp", "flap", "flap+refit"]
MLP = "re:.*mlp"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--target", type=float, default=0.5, help="share of each MLP's channels removed")
    p.add_argument("--steps", type=int, default=150, help="L0 gate-training steps (one --batch of windows each)")
    p.add_argument("--batch", type=int, default=4, help="calibration windows per gate-training step")
    p.add_argument("--scores", nargs="+", default=ONE_SHOT, help="one-shot settings, score[+refit]")
    p.add_argument("--l0", nargs="+", default=["none", "refit"], help="L0 rows by update: none, refit")
    args = p.parse_args(argv)

    model, _, seqlen, batches, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    batches = CalibrationSet([b for x in batches for b in x.split(args.batch)], batches.setup)
    dense = perplexity(model, test_ids, seqlen)
    params = sum(q.numel() for q in model.parameters())
    lines = [f"| method | update | gate steps | MLP {args.target:.0%}: perplexity | vs dense | parameters | time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
             f"| dense | - | - | {dense:.2f} | 1.00x | 1.00x | - |"]
    print("\n" + "\n".join(lines), flush=True)
    rows = [(s.split("+")[0], "refit" if "+refit" in s else None, None) for s in args.scores]
    rows += [("l0", None if u == "none" else u, args.steps) for u in args.l0]
    for score, update, steps in rows:
        config = (sparsecc.techniques.L0Config(args.target, steps=steps, update=update, seed=args.seed)
                  if score == "l0" else sparsecc.StructuredConfig(args.target, score=score, update=update))
        m = copy.deepcopy(model)
        t = time.perf_counter()
        sparsecc.sparsify_(m, {MLP: config}, batches, progress=False)
        secs = time.perf_counter() - t
        ppl = perplexity(m, test_ids, seqlen)
        size = sum(q.numel() for q in m.parameters()) / params
        lines.append(f"| {'L0 (learned gates)' if score == 'l0' else score} | {update or 'none'} | "
                     f"{steps if steps else '-'} | {ppl:.2f} | {ppl / dense:.2f}x | {size:.2f}x | {secs:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    intro = (f"The `{args.model}` zoo model; every MLP loses {args.target:.0%} of its intermediate channels (the "
             f"linears shrink), chosen by a one-shot score or by L0Config's learned hard-concrete gates "
             f"({args.steps} Adam steps of {args.batch} windows, weights frozen, Lagrangian toward the target "
             f"size, seed {args.seed}). Calibration: {args.nsamples} random training windows of {seqlen} tokens "
             f"(seed {args.seed}); perplexity on the whole test split. Time: the whole sparsify_ call.")
    report("l0-quality", "Learned L0 masks vs one-shot structured scores (WikiText-2 test perplexity)", intro, text,
           f"python benchmarks/l0_quality.py --model {args.model}"
           f"{'' if args.steps == 150 else f' --steps {args.steps}'} --write-results",
           args.write_results, shown=len(text.splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tuning after pruning on the reference model: perplexity before / LoRA / full, in the layout
of seed 002's table (Wanda's LLaMA-7B at 2:4: 11.53 -> 8.24 LoRA, 7.02 full; dense 5.68).

    python benchmarks/finetune_quality.py [--model ref|tiny] [--steps 200] [--batch-size 8] [--write-results]

SparseGPT at 50%, 4:8 and 2:4 (every linear but lm_head; calibration as in prune_quality.py), then
`sparsecc.finetune_` on random windows of the training split (seed 1): LoRA (rank 8) and full
fine-tuning at the same steps, each from the same pruned weights; then, at 2:4, full fine-tuning
distilled from the dense model's logits against the plain LM loss. WikiText-2 test perplexity; the
share of the pruning gap closed is (before - after) / (before - dense). Every run is checked to end
with exactly the zeros it started with (the "zeros kept" column counts them).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import sparsecc
from sparsecc.tools.evaluate import perplexity

try:
    from results import add_quality_args, quality_setup, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, quality_setup, report

SETTINGS = {"50%": dict(sparsity=0.5), "4:8": dict(pattern="4:8"), "2:4": dict(pattern="2:4")}


def zeros_kept(before: dict, model) -> int:
    """The number of pruned weights still exactly zero; raises if any moved (the benchmark's own check)."""
    kept = 0
    for name, p in model.named_parameters():
        if name in before:
            z = before[name]
            if not bool((p.detach()[z] == 0).all()):
                raise AssertionError(f"{name}: a pruned weight became nonzero")
            kept += int(z.sum())
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=0, help="0 = the whole test split")
    args = p.parse_args(argv)
    methods = {"LoRA": dict(method="lora", lr=args.lr_lora), "full": dict(method="full", lr=args.lr_full)}
    torch.manual_seed(0)
    dense, source, seqlen, calib, test_ids = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    from sparsecc.zoo import load_tokens
    train = sparsecc.sample_batches(load_tokens().train, args.steps * args.batch_size, seqlen, seed=1,
                                    batch_size=args.batch_size)
    windows = args.eval_windows or None
    ppl = lambda m: perplexity(m, test_ids, seqlen, max_windows=windows)  # noqa: E731
    dense_ppl = ppl(dense)
    table = {"Dense": {s: (dense_ppl, None, None, None) for s in SETTINGS}}
    # the same training on the dense model: how much of a gain is recovery, how much is more training
    more = copy.deepcopy(dense)
    t = time.perf_counter()
    sparsecc.finetune_(more, train, steps=args.steps, allow_dense=True, progress=False, **methods["full"])
    dense_more = (ppl(more), time.perf_counter() - t)
    print(f"dense, fine-tuned the same way: {dense_ppl:.2f} -> {dense_more[0]:.2f}", flush=True)
    runs = {}
    for setting, kw in SETTINGS.items():
        pruned = copy.deepcopy(dense)
        sparsecc.sparsify_(pruned, {"default": sparsecc.SparseGPTConfig(**kw), "lm_head": None}, calib, progress=False)
        zeros = {n: p.detach() == 0 for n, p in pruned.named_parameters() if p.dim() == 2 and bool((p == 0).any())}
        before = ppl(pruned)
        table.setdefault("SparseGPT", {})[setting] = (before, None, None, None)
        variants = dict(methods)
        if setting == "2:4":
            variants["full, distilled"] = dict(methods["full"], teacher=dense, distill_weight=0.5)
        for label, fkw in variants.items():
            m = copy.deepcopy(pruned)
            t = time.perf_counter()
            rep = sparsecc.finetune_(m, train, steps=args.steps, progress=False, **fkw)
            secs = time.perf_counter() - t
            after = ppl(m)
            closed = (before - after) / (before - dense_ppl) if before > dense_ppl else float("nan")
            row = f"+ {label} fine-tuning"
            table.setdefault(row, {})[setting] = (after, closed, secs, zeros_kept(zeros, m))
            runs[(setting, label)] = rep
            print(f"{setting} {label}: {before:.2f} -> {after:.2f} ({closed:.0%} of the gap) in {secs:.0f}s, "
                  f"train loss {rep.losses[0]:.3f} -> {sum(rep.losses[-10:]) / 10:.3f}", flush=True)

    cols = list(SETTINGS)
    lines = [f"| {args.model} model, SparseGPT | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for row, vals in table.items():
        if row == "+ full, distilled fine-tuning":
            continue
        lines.append(f"| {row} | " + " | ".join(
            "-" if s not in vals else f"{vals[s][0]:.2f}" + (f" ({vals[s][1]:.0%})" if vals[s][1] is not None else "")
            for s in cols) + " |")
    lines.append("| Dense + the same full fine-tuning | " + " | ".join(f"{dense_more[0]:.2f}" for _ in cols) + " |")
    lines += ["", "| run | steps | seconds | trained parameters | zeros kept (all) | train loss first -> last 10 |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for (setting, label), rep in runs.items():
        vals = table[f"+ {label} fine-tuning"][setting]
        lines.append(f"| {setting} {label} | {rep.steps} | {vals[2]:.0f} | {rep.trainable:,} | {vals[3]:,} | "
                     f"{rep.losses[0]:.3f} -> {sum(rep.losses[-10:]) / 10:.3f} |")
    plain, dist = table["+ full fine-tuning"]["2:4"], table["+ full, distilled fine-tuning"]["2:4"]
    lines += ["", "| 2:4, full fine-tuning, same steps | test perplexity | gap closed |", "| --- | ---: | ---: |",
              f"| LM loss (cross-entropy) | {plain[0]:.2f} | {plain[1]:.0%} |",
              f"| distilled: 0.5 LM + 0.5 T²·KL(dense ‖ pruned), T = 2 | {dist[0]:.2f} | {dist[1]:.0%} |"]
    text = "\n".join(lines)
    intro = (f"The `{args.model}` zoo model pruned by SparseGPT (every linear but lm_head; {args.nsamples} calibration "
             f"windows), then `sparsecc.finetune_` for {args.steps} steps of {args.batch_size} windows of {seqlen} "
             f"tokens from the training split (AdamW, warm-up then cosine; LoRA rank 8 on every linear, lr {args.lr_lora:g}, "
             f"merged as (W + BA) ⊙ mask; full: lr {args.lr_full:g}), each from the same pruned weights. WikiText-2 test "
             "perplexity; in brackets, the share of the pruning gap closed, (before - after) / (before - dense). "
             "Every run ends with all its pruned weights exactly zero (checked: zeros kept). The last row trains the "
             "dense model the same way: the part of a gain that is more training rather than recovery.")
    report("finetune-quality", "Fine-tuning after pruning (WikiText-2 test perplexity)", intro, text,
           f"python benchmarks/finetune_quality.py --model {args.model} --steps {args.steps} --write-results",
           args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

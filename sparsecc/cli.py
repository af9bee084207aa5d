"""Command line: `sparsecc demo` (the embedded offline default)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .techniques import MagnitudeConfig, SparseGPTConfig, WandaConfig


METHODS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}


def demo(args) -> int:
    import torch

    import sparsecc
    from sparsecc.evaluate import perplexity
    from sparsecc.zoo import encode_text, load_corpus, load_model

    t0 = time.time()
    model, tok, info = load_model(args.model, data_dir=args.data_dir, progress=True)
    corpus = load_corpus(args.data_dir)
    seqlen = model.config.max_position_embeddings
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, context {seqlen}), "
          f"trained on {corpus.source.get('name')}", flush=True)
    train_ids, test_ids = encode_text(tok, corpus.train_text), encode_text(tok, corpus.test_text)
    windows = args.eval_windows or None
    dense = perplexity(model, test_ids, seqlen, max_windows=windows)

    batches = sparsecc.sample_batches(train_ids, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                                      batch_size=8, source={"corpus": corpus.source})
    config = METHODS[args.method](sparsity=args.sparsity, pattern=args.pattern)
    recipe = {"default": config, "lm_head": None}
    report = sparsecc.sparsify_(model, recipe, batches)
    compiled = torch.compile(model, backend="sparsecc")
    pruned = perplexity(compiled, test_ids, seqlen, max_windows=windows)

    print("\nper-layer sparsity")
    print(report.table())
    print(f"\n{'model':<28} {'test perplexity':>16}")
    print(f"{'dense':<28} {dense:>16.2f}")
    label = f"{args.method} {args.pattern or format(args.sparsity, '.0%')} (compiled)"
    print(f"{label:<28} {pruned:>16.2f}")
    print(f"\nevaluated on {corpus.source.get('name')} test, "
          f"{'all' if windows is None else windows} windows of {seqlen} tokens; total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_ppl": dense, "pruned_ppl": pruned, "report": report.to_dict(), "model": info},
                      f, indent=2, default=str)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparsecc", description="sparsecc: a sparsifying compiler for PyTorch models")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train/load the small reference model, prune it, compile it, compare perplexity")
    d.add_argument("--model", default="tiny", choices=["tiny", "ref"], help="zoo variant (default: tiny)")
    d.add_argument("--data-dir", default=None, help="folder with wikitext-2/ (default: ../shared/data, "
                   "$SPARSECC_DATA, else text from the Python installation)")
    d.add_argument("--method", default="sparsegpt", choices=sorted(METHODS))
    d.add_argument("--sparsity", type=float, default=0.5)
    d.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (overrides --sparsity)")
    d.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-windows", type=int, default=0, help="limit test windows (0 = whole test split)")
    d.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())

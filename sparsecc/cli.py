"""Command line: `sparsecc demo | prune | eval | bench`.

    sparsecc demo                                   the embedded offline default (README)
    sparsecc prune MODEL_DIR --recipe R --calib TEXT --out OUT [--overwrite] [--compress]
    sparsecc eval MODEL_DIR --text FILE             perplexity the way the seeds compute it
    sparsecc bench [--quick]                        the benchmarks that run on this machine

Errors print one line naming the fix and exit with status 2; Ctrl-C exits with 130 and leaves
no half-written output.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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

    print("\nper-layer report")
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


def prune(args) -> int:
    import sparsecc
    from sparsecc.checkpoint import check_output_dir, save_pruned
    from sparsecc.local_models import load_local_model, read_text, tokenize

    check_output_dir(args.out, args.overwrite)  # before any work
    recipe = sparsecc.load_recipe(args.recipe)
    model, tok = load_local_model(args.model_dir, args.tokenizer)
    seqlen = args.seqlen or min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    ids = tokenize(tok, read_text(args.calib), what=f"calibration text {args.calib!r}")
    batches = sparsecc.sample_batches(ids, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                                      batch_size=args.batch_size, source={"calib": str(args.calib)})
    plan = None
    if args.save_plan:  # calibrate to a Plan (kept in the checkpoint), then apply it
        plan = sparsecc.calibrate(model, batches, recipe, progress=not args.quiet)
        report = sparsecc.sparsify_(model, plan)
    else:
        report = sparsecc.sparsify_(model, recipe, batches, progress=not args.quiet)
    out = save_pruned(model, args.out, report, recipe=recipe, tokenizer=tok, plan=plan, compress=args.compress,
                      overwrite=args.overwrite)
    print(report.table())
    print(f"\nwrote {out} ({report.sparsity:.1%} of the pruned weights are zero)")
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0


def evaluate(args) -> int:
    from sparsecc.evaluate import perplexity
    from sparsecc.local_models import load_local_model, read_text, tokenize

    model, tok = load_local_model(args.model_dir, args.tokenizer)
    seqlen = args.seqlen or min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    ids = tokenize(tok, read_text(args.text), what=f"text {args.text!r}")
    ppl = perplexity(model, ids, seqlen, batch_size=args.batch_size, max_windows=args.max_windows or None,
                     progress=not args.quiet)
    windows = ids.numel() // seqlen if not args.max_windows else min(args.max_windows, ids.numel() // seqlen)
    result = {"model": str(args.model_dir), "text": str(args.text), "perplexity": ppl, "seqlen": seqlen,
              "windows": windows, "tokens": ids.numel()}
    print(f"perplexity {ppl:.3f} ({windows} windows of {seqlen} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def bench(args) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        raise FileNotFoundError("sparsecc bench runs the scripts in benchmarks/ of a source checkout; "
                                "clone the repository and install it with pip install -e .")
    runs = [["train_reference.py", "--variant", "tiny" if args.quick else "ref"],
            ["prune_time.py", *(["--size", "1024", "--tokens", "16384"] if args.quick else [])],
            ["prune_quality.py", *(["--model", "tiny", "--eval-windows", "64", "--nsamples", "32"] if args.quick else [])],
            ["cats_quality.py", *(["--model", "tiny", "--nsamples", "32"] if args.quick else [])],
            ["moe_quality.py", *(["--model", "tiny", "--nsamples", "32"] if args.quick else [])],
            ["streaming.py", *(["--model", "tiny", "--factor", "4", "--streams", "1"] if args.quick else [])],
            ["nm_linear.py", *(["--quick"] if args.quick else [])],  # these five: GPU if there is one
            ["cats_mlp.py", *(["--quick"] if args.quick else [])],
            ["window_attention.py", *(["--quick"] if args.quick else [])],
            ["moe_ffn.py", *(["--quick"] if args.quick else [])],
            ["sparse_linear.py", *(["--quick"] if args.quick else [])]]
    for script, *rest in runs:
        cmd = [sys.executable, str(root / script), *rest, *(["--write-results"] if args.write_results else [])]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparsecc", description="sparsecc: a sparsifying compiler for PyTorch models")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prune", help="prune a local transformers model folder with a recipe; write a checkpoint")
    pr.add_argument("model_dir", help="a folder saved by save_pretrained (nothing is fetched from a hub)")
    pr.add_argument("--recipe", required=True, help="recipe file (.yaml, .json or .toml)")
    pr.add_argument("--calib", required=True, help="calibration text: a file, or a folder of .txt files")
    pr.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    pr.add_argument("--compress", action="store_true", help="store N:M weights compressed (values + 2-bit positions for 2:4)")
    pr.add_argument("--save-plan", action="store_true", help="also keep the Plan (decisions and activation "
                    "statistics) in OUT/plan, to re-apply to the dense model without data")
    pr.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument("--seqlen", type=int, default=0, help="window length (default: the model's context, at most 2048)")
    pr.add_argument("--batch-size", type=int, default=1)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--json", default=None, help="also write the per-layer report as JSON here")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    ev = sub.add_parser("eval", help="perplexity of a local model folder (or sparsecc checkpoint) on a text file")
    ev.add_argument("model_dir")
    ev.add_argument("--text", required=True, help="a text file, or a folder of .txt files")
    ev.add_argument("--tokenizer", default=None)
    ev.add_argument("--seqlen", type=int, default=0, help="window length (default: the model's context, at most 2048)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many windows (0: all)")
    ev.add_argument("--json", default=None)
    ev.add_argument("--quiet", action="store_true")
    be = sub.add_parser("bench", help="run the benchmarks that apply on this machine (from a source checkout)")
    be.add_argument("--quick", action="store_true", help="small sizes and the tiny model (minutes, not an hour)")
    be.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
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
    from sparsecc.errors import SparseccError
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return {"demo": demo, "prune": prune, "eval": evaluate, "bench": bench}[args.cmd](args)
    except (SparseccError, FileExistsError, FileNotFoundError) as e:
        print(f"sparsecc {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsecc {args.cmd}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

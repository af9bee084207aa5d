"""Command line: `sparsecc demo | prune | finetune | eval | bench`.

    sparsecc demo                                   the embedded offline default (README)
    sparsecc prune MODEL_DIR --recipe R --calib TEXT --out OUT [--overwrite] [--compress] [--max-memory 24GiB]
                   [--activations memory|bf16|fp16|disk] [--offload-folder DIR] [--device cuda]
    torchrun --nproc_per_node=N -m sparsecc prune ...   calibration shared by N processes (gloo / NCCL)
    sparsecc finetune PRUNED_DIR --text FILE --out OUT [--steps 200] [--method full|lora] [--teacher DENSE_DIR]
                   [--eval-text FILE] [--checkpoint-dir DIR]   training that keeps every pruned weight zero
    sparsecc eval MODEL_DIR --text FILE             perplexity the way the seeds compute it
    sparsecc bench [--quick] [--only NAMES]         the benchmarks that run on this machine

Errors print one line naming the fix and exit with status 2 (`sparsecc --traceback CMD ...` shows
where an unexpected one came from); options and output paths are checked before any work, and a
failing command writes nothing. Ctrl-C exits with 130 and leaves no half-written output.
Module-level imports stay light (no torch) so that --help and --version answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import __version__


class _Methods(dict):
    """--method name -> config class, imported on first use (the names alone are needed for --help)."""

    def __getitem__(self, name):
        from .. import techniques
        return getattr(techniques, super().__getitem__(name))


METHODS = _Methods(magnitude="MagnitudeConfig", wanda="WandaConfig", sparsegpt="SparseGPTConfig")


def demo(args) -> int:
    """The embedded default: a shipped zoo model pruned, compiled and compared on held-out text."""
    import torch

    import sparsecc
    from .evaluate import perplexity
    from ..zoo import load_model, load_tokens

    t0 = time.time()
    if args.bits is not None and args.method != "sparsegpt":
        raise ValueError(f"--bits quantizes in SparseGPT's sweep; use --method sparsegpt (not {args.method})")
    quant = {} if args.bits is None else {"bits": args.bits, "group_size": args.group_size}
    config = METHODS[args.method](sparsity=args.sparsity, pattern=args.pattern, **quant)  # bad values fail before any work
    model, _, info = load_model(args.model)
    tokens = load_tokens()
    seqlen = model.config.max_position_embeddings
    corpus = tokens.source.get("name")
    print(f"model: {args.model} ({info['params'] / 1e6:.2f}M params, context {seqlen}), shipped trained on {corpus}",
          flush=True)
    windows = args.eval_windows or None
    dense = perplexity(model, tokens.test, seqlen, max_windows=windows)

    batches = sparsecc.sample_batches(tokens.train, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                                      batch_size=8, source={"corpus": tokens.source})
    report = sparsecc.sparsify_(model, {"default": config, "lm_head": None}, batches)
    compiled = torch.compile(model, backend="sparsecc")
    pruned = perplexity(compiled, tokens.test, seqlen, max_windows=windows)

    print("\nper-layer report")
    print(report.table())
    print(f"\n{'model':<28} {'test perplexity':>16}")
    print(f"{'dense':<28} {dense:>16.2f}")
    label = f"{args.method} {args.pattern or format(args.sparsity, '.0%')}{f' int{args.bits}' if args.bits else ''} (compiled)"
    print(f"{label:<28} {pruned:>16.2f}")
    n = tokens.test.numel() // seqlen if windows is None else min(windows, tokens.test.numel() // seqlen)
    print(f"\nevaluated on {corpus} test, {n} windows of {seqlen} tokens; total {time.time() - t0:.0f} s")
    if args.json:
        result = {"dense_ppl": dense, "pruned_ppl": pruned, "report": report.to_dict(), "model": info}
        os.replace(_staged(args.json, json.dumps(result, indent=2, default=str)), args.json)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other error (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _version() -> str:
    """sparsecc's version, and torch's as installed (read from its metadata: importing it takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"sparsecc {__version__} (torch {version('torch')})"
    except PackageNotFoundError:
        return f"sparsecc {__version__}"


def at_least(least: int):
    """argparse type: an int of at least `least` (checked before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if least == 0 else f'at least {least}'}, got {value}")
        return value
    return parse


def _check_output(opt: str, path, makes_parents: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder given for a file,
    a parent that is a file, missing (unless the command makes it) or not writable."""
    path = Path(path)
    if opt == "--json" and path.is_dir():
        raise IsADirectoryError(f"--json {str(path)!r} is a folder; give a file name, e.g. {str(path / 'report.json')!r}")
    folder = path.absolute().parent
    while makes_parents and not folder.exists():  # the nearest folder that exists must take the new ones
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{opt} {str(path)!r}: {str(folder)!r} is a file, not a folder; choose another path")
    if not folder.exists():
        raise FileNotFoundError(f"{opt} {str(path)!r}: folder {str(folder)!r} does not exist; create it or choose another path")
    # os.access, then a real probe: permission bits are not the whole story (ACLs, NFS root squash, quotas)
    ok = os.access(folder, os.W_OK | os.X_OK)
    if ok:
        import tempfile
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sparsecc-probe-", dir=folder))
        except OSError:
            ok = False
    if not ok:
        raise PermissionError(f"{opt} {str(path)!r}: folder {str(folder)!r} is not writable; choose another path")


def _staged(path, text: str) -> Path:
    """`text` written to a temporary file beside `path`; os.replace it onto `path` to publish it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _seqlen(args, config) -> int:
    """--seqlen, or the model's context (at most 2048); refused beyond the model's context."""
    context = getattr(config, "max_position_embeddings", None)
    if args.seqlen is None:
        return min(context or 2048, 2048)
    if context and args.seqlen > context:
        raise ValueError(f"--seqlen {args.seqlen} is longer than the model's context of {context} tokens "
                         f"(config.max_position_embeddings); pass --seqlen {context} or less, or leave it out")
    return args.seqlen


def prune(args) -> int:
    import sparsecc
    from ..io.checkpoint import META
    from ..io.folders import check_output_dir
    from ..passes.memory import parse_bytes

    check_output_dir(args.out, args.overwrite)  # the outputs before any work
    _check_output("--out", args.out, makes_parents=True)
    out, model_dir = Path(args.out).resolve(), Path(args.model_dir).resolve()
    if args.json and out in (j := Path(args.json).resolve(), *j.parents):
        raise ValueError(f"--json {args.json!r} lies in --out {args.out!r}, which is written whole; "
                         "put the report beside it, e.g. --json report.json")
    if out in (model_dir, *model_dir.parents):
        raise ValueError(f"--out {args.out!r} would replace the model being pruned ({args.model_dir!r}); "
                         "choose another folder")
    recipe = sparsecc.load_recipe(args.recipe)
    budget = parse_bytes(args.max_memory) if args.max_memory is not None else None
    if args.offload_folder is not None and args.activations != "disk":
        raise ValueError("--offload-folder is where --activations disk writes; add --activations disk or leave it out")
    whole = ["--no-onload"] * args.no_onload + ["--save-plan"] * args.save_plan
    onload = [f"--device {args.device}"] * (args.device not in (None, "cpu")) + \
        [f"--activations {args.activations}"] * (args.activations != "memory")
    if onload and (whole or (model_dir / META).is_file()):
        raise ValueError(f"{onload[0]} applies to onloading (one block at a time), which "
                         + (f"{' and '.join(whole)} turns off; leave out one or the other" if whole else
                            f"a sparsecc checkpoint does not get (it is loaded whole); leave out {onload[0].split()[0]}"))
    rank = _join_ranks()
    try:
        return _prune(args, recipe, budget, rank, model_dir)
    finally:
        if rank is not None:
            import torch.distributed as dist
            dist.destroy_process_group()


def _join_ranks() -> int | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) -> this
    rank; calibration is then shared by the ranks (sparsify_, prune_folder). None: one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a rank waits for the others while they solve their linears: a long timeout
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30))
    return dist.get_rank()


def _prune(args, recipe, budget, rank, model_dir) -> int:
    import sparsecc
    from ..errors import WholeModelError
    from ..io.checkpoint import META, save_pruned
    from ..passes.memory import check_whole_memory
    from .local_models import load_local_model

    if not (args.no_onload or args.save_plan or (model_dir / META).is_file()):
        try:
            report = _prune_onloaded(args, recipe, budget)
        except WholeModelError as e:
            if budget is not None or args.activations != "memory" or args.device not in (None, "cpu"):
                raise
            if not rank:  # the reason, less the advice to do what this does now
                from ..io.lazy import WHOLE_MODEL
                reason = str(e).removesuffix(WHOLE_MODEL).rstrip(":; ")
                print(f"sparsecc prune: loading the whole model ({reason})", file=sys.stderr)
        else:
            return _done(args, report, Path(args.out)) if not rank else 0
    model, tok = load_local_model(args.model_dir, args.tokenizer)
    if budget is not None:
        check_whole_memory(model, recipe, budget)
    batches = _calibration(args, tok, model.config)
    plan = None
    if args.save_plan:  # calibrate to a Plan (kept in the checkpoint), then apply it
        plan = sparsecc.calibrate(model, batches, recipe, progress=not args.quiet)
        report = sparsecc.sparsify_(model, plan)
    else:
        report = sparsecc.sparsify_(model, recipe, batches, progress=not args.quiet)
    if rank:  # under torchrun rank 0 writes
        return 0
    out = _with_json(args, report.to_json(), lambda: save_pruned(
        model, args.out, report, recipe=recipe, tokenizer=tok, plan=plan, compress=args.compress,
        overwrite=args.overwrite))
    return _done(args, report, out)


def _with_json(args, text: str, save):
    """save() (which writes the output folder), with `text` going to --json: written first beside its
    place and published only once the folder is complete, so whichever write fails, neither is left."""
    staged = _staged(args.json, text) if args.json else None
    try:
        out = save()
        if staged:
            os.replace(staged, args.json)
    finally:
        if staged:
            staged.unlink(missing_ok=True)
    return out


def _calibration(args, tok, config):
    import sparsecc
    from .local_models import read_text, tokenize

    seqlen = _seqlen(args, config)
    ids = tokenize(tok, read_text(args.calib), what=f"calibration text {args.calib!r}")
    return sparsecc.sample_batches(ids, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                                   batch_size=args.batch_size, source={"calib": str(args.calib)})


def _prune_onloaded(args, recipe, budget):
    """`prune_folder`: one decoder block in memory at a time; the report JSON published with the folder."""
    import sparsecc
    from transformers import AutoConfig
    from .local_models import check_model_dir, load_tokenizer

    tok = load_tokenizer(args.tokenizer or check_model_dir(args.model_dir))
    config = AutoConfig.from_pretrained(args.model_dir, local_files_only=True, trust_remote_code=False)
    batches = _calibration(args, tok, config)
    staged = []  # the JSON report, staged while the folder is complete but not yet in place
    try:
        report = sparsecc.prune_folder(args.model_dir, recipe, batches, args.out, tokenizer=tok,
                                       compress=args.compress, max_memory=budget, activations=args.activations,
                                       offload_folder=args.offload_folder, device=args.device,
                                       overwrite=args.overwrite, progress=not args.quiet, before_publish=(
                                           lambda report: staged.append(_staged(args.json, report.to_json())))
                                       if args.json else None)
        if staged:
            os.replace(staged[0], args.json)
    finally:
        for f in staged:
            f.unlink(missing_ok=True)
    return report


def _done(args, report, out: Path) -> int:
    from ..io.checkpoint import checkpoint_size

    print(report.table())
    print(f"\nwrote {out} ({report.sparsity:.1%} of the pruned weights are zero)")
    print(size_line(checkpoint_size(out)))
    return 0


def size_line(size: dict) -> str:
    """"checkpoint 1.2 MB = 0.31x dense; pruned linears 0.11x" from checkpoint_size's figures."""
    n = float(size["bytes"])
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    line = f"checkpoint {n:.3g} {unit}"
    if size.get("ratio") is not None:
        line += f" = {size['ratio']:.2f}x dense"
    if size.get("linear_ratio") is not None:
        line += f"; pruned linears {size['linear_ratio']:.2f}x"
    return line


def finetune(args) -> int:
    import sparsecc
    from ..io.checkpoint import META, read_meta, save_pruned
    from ..io.folders import check_output_dir
    from ..io.report import Report
    from .local_models import load_local_model, read_text, tokenize

    if args.teacher is None and (args.distill_weight is not None or args.temperature is not None):
        raise ValueError("--distill-weight and --temperature set the distillation from --teacher; add --teacher "
                         "DENSE_DIR or leave them out")
    check_output_dir(args.out, args.overwrite)  # the outputs before any work
    _check_output("--out", args.out, makes_parents=True)
    out, model_dir = Path(args.out).resolve(), Path(args.model_dir).resolve()
    if out in (model_dir, *model_dir.parents):
        raise ValueError(f"--out {args.out!r} would replace the model being fine-tuned ({args.model_dir!r}); "
                         "choose another folder")
    if args.checkpoint_dir and out in (c := Path(args.checkpoint_dir).resolve(), *c.parents):
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir!r} lies in --out, which is written whole; put it "
                         "beside it")
    model, tok = load_local_model(args.model_dir, args.tokenizer)
    meta = read_meta(model_dir) if (model_dir / META).is_file() else {}
    teacher = load_local_model(args.teacher, args.tokenizer or args.model_dir)[0] if args.teacher else None
    seqlen = _seqlen(args, model.config)
    train = _windows(tokenize(tok, read_text(args.text), what=f"text {args.text!r}"), seqlen, f"--text {args.text!r}")
    if args.eval_text:
        held = _windows(tokenize(tok, read_text(args.eval_text), what=f"text {args.eval_text!r}"), seqlen,
                        f"--eval-text {args.eval_text!r}")
    elif len(train) >= 10:  # the last tenth of the text, kept out of training
        train, held = train[:len(train) - len(train) // 10], train[len(train) - len(train) // 10:]
    else:
        held = None
    report = sparsecc.finetune_(
        model, list(train.split(args.batch_size)), steps=args.steps, lr=args.lr, method=args.method, rank=args.rank,
        teacher=teacher, distill_weight=0.5 if args.distill_weight is None else args.distill_weight,
        temperature=2.0 if args.temperature is None else args.temperature,
        eval_batches=list(held.split(args.batch_size)) if held is not None else None, merge=True,
        checkpoint_dir=args.checkpoint_dir, allow_dense=args.allow_dense, seed=args.seed, progress=not args.quiet)
    from ..prune.masks import zero_share
    rows = [dict(r) for r in meta.get("rows", [])]
    params = dict(model.named_parameters())
    for r in rows:  # a quantized weight that rounded to zero adds a zero: the rows say what the weights are now
        if r.get("param") in params and r.get("shape"):
            r["sparsity"] = zero_share(params[r["param"]])
    result = {"finetune": report.to_dict(), "model": str(args.model_dir), "text": str(args.text),
              "eval_text": str(args.eval_text) if args.eval_text else ("last tenth of --text" if held is not None else None),
              "seqlen": seqlen, "batch_size": args.batch_size}
    setup = {**meta.get("setup", {}), "finetune": {k: v for k, v in result.items() if k != "finetune"}
             | {k: v for k, v in report.to_dict().items() if k != "losses"}}
    recipe = sparsecc.load_recipe(meta["recipe"]) if meta.get("recipe") else None
    _with_json(args, json.dumps(result, indent=2, default=str), lambda: save_pruned(
        model, args.out, Report(rows, setup), recipe=recipe, tokenizer=tok,
        compress=args.compress or bool(meta.get("compressed")), overwrite=args.overwrite))
    print(report.table())
    print(f"\nwrote {out}")
    return 0


def _windows(ids, seqlen: int, what: str):
    """[n, seqlen] non-overlapping windows of a token stream (the remainder dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than one window of {seqlen}; give a longer text"
                         f"{f' or pass --seqlen {ids.numel()}' if ids.numel() >= 2 else ''}")
    return ids[:n * seqlen].view(n, seqlen)


def evaluate(args) -> int:
    from .evaluate import perplexity
    from .local_models import load_local_model, read_text, tokenize

    model, tok = load_local_model(args.model_dir, args.tokenizer)
    seqlen = _seqlen(args, model.config)
    ids = tokenize(tok, read_text(args.text), what=f"text {args.text!r}")
    n = ids.numel()
    if n < seqlen:
        raise ValueError(f"text {str(args.text)!r} has {n} tokens, fewer than one window of {seqlen}; give a longer "
                         f"text{f' or pass --seqlen {n}' if n >= 2 else ''}")
    windows = min(n // seqlen, args.max_windows or n)
    ppl = perplexity(model, ids, seqlen, batch_size=args.batch_size, max_windows=windows, progress=not args.quiet)
    result = {"model": str(args.model_dir), "text": str(args.text), "perplexity": ppl, "seqlen": seqlen,
              "windows": windows, "tokens": n}
    print(f"perplexity {ppl:.3f} ({windows} windows of {seqlen} tokens)")
    if args.json:
        os.replace(_staged(args.json, json.dumps(result, indent=2)), args.json)
    return 0


KERNEL_BENCHMARKS = ("nm_linear", "cats_mlp", "window_attention", "moe_ffn", "sparse_linear", "quant_linear")


def _benchmarks(quick: bool) -> dict:
    """benchmarks/<name>.py -> its arguments, in the order `sparsecc bench` runs them."""
    q = (lambda *a: list(a)) if quick else (lambda *a: [])
    return {"train_reference": ["--variant", "tiny" if quick else "ref"],
            "prune_time": q("--size", "1024", "--tokens", "16384"),
            "prune_quality": q("--model", "tiny", "--eval-windows", "64", "--nsamples", "32"),
            "cats_quality": q("--model", "tiny", "--nsamples", "32"),
            "moe_quality": q("--model", "tiny", "--nsamples", "32"),
            "plan_replay": q("--model", "tiny", "--nsamples", "16"),
            "structured_quality": q("--model", "tiny", "--nsamples", "16"),
            "layer_drop_quality": q("--model", "tiny", "--nsamples", "8", "--drop", "1"),
            "quant_quality": q("--model", "tiny", "--nsamples", "16"),
            "l0_quality": q("--model", "tiny", "--nsamples", "16", "--steps", "20"),
            "finetune_quality": q("--model", "tiny", "--nsamples", "16", "--steps", "20", "--eval-windows", "64"),
            "e2e": q("--quick", "--models", "ref", "--threads", "1"),  # the compiled row is most of its minute
            "streaming": q("--model", "tiny", "--factor", "4", "--streams", "1"),
            "scale": q("--quick"),
            "distributed": q("--model", "tiny", "--nsamples", "8", "--recipes", "bonsai,sparsegpt"),
            **{name: q("--quick") for name in KERNEL_BENCHMARKS}}  # these: on the GPU if there is one


def bench(args) -> int:
    import difflib
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not root.is_dir():
        raise FileNotFoundError("sparsecc bench runs the scripts in benchmarks/ of a source checkout; "
                                "clone the repository and install it with pip install -e .")
    runs = _benchmarks(args.quick)
    if args.only:
        names = [n for part in args.only.split(",") if part.strip()
                 for n in (KERNEL_BENCHMARKS if part.strip() == "kernels" else [part.strip().removesuffix(".py")])]
        for n in names:
            if n not in runs:
                near = difflib.get_close_matches(n, list(runs), n=1)
                raise ValueError(f"--only: no benchmark {n!r}{f'; did you mean {near[0]!r}?' if near else ''} "
                                 f"(names: {', '.join(runs)}, or kernels for the last {len(KERNEL_BENCHMARKS)})")
        runs = {n: runs[n] for n in dict.fromkeys(names)}
    missing = [f"{n}.py" for n in runs if not (root / f"{n}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing from {root}; restore them (git checkout benchmarks/)")
    failed = []
    for name, rest in runs.items():
        cmd = [sys.executable, str(root / f"{name}.py"), *rest, *(["--write-results"] if args.write_results else [])]
        print(f"$ python {' '.join(cmd[1:])}", flush=True)
        if not args.dry_run:
            code = subprocess.run(cmd).returncode
            if code:  # the rest still run; the failures are reported at the end
                failed.append(f"{name}.py (exit status {code})")
    if failed:
        print(f"sparsecc bench: error: {len(failed)} of {len(runs)} benchmarks failed: {', '.join(failed)}; "
              "their output is above", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = _Parser(prog="sparsecc", description="sparsecc: a sparsifying compiler for PyTorch models")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--traceback", action="store_true", help="on an unexpected error, show where it came from")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    count, natural = at_least(1), at_least(0)
    pr = sub.add_parser("prune", help="prune a local transformers model folder with a recipe; write a checkpoint")
    pr.add_argument("model_dir", help="a folder saved by save_pretrained (nothing is fetched from a hub)")
    pr.add_argument("--recipe", required=True, help="recipe file (.yaml, .json or .toml)")
    pr.add_argument("--calib", required=True, help="calibration text: a file, or a folder of .txt files")
    pr.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    pr.add_argument("--compress", action="store_true", help="store pruned/quantized weights compressed (kept values + bitmask or N:M positions, "
                    "packed integer codes); such a folder loads with sparsecc.load_pruned")
    pr.add_argument("--save-plan", action="store_true", help="also keep the Plan (decisions and activation "
                    "statistics) in OUT/plan, to re-apply to the dense model without data")
    pr.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    pr.add_argument("--max-memory", default=None, metavar="SIZE", help="refuse, before any work, a run whose "
                    "estimated peak exceeds SIZE (e.g. 24GiB; tensors only, the process itself takes ~0.5 GiB more)")
    pr.add_argument("--activations", choices=("memory", "bf16", "fp16", "disk"), default="memory",
                    help="how onloading keeps the calibration hidden states between blocks: as computed (default), "
                    "in half precision (half of fp32's bytes), or on disk (one batch in memory at a time)")
    pr.add_argument("--offload-folder", default=None, metavar="DIR", help="where --activations disk writes its "
                    "temporary files (default: the system's temporary folder); deleted at the end")
    pr.add_argument("--device", default=None, help="where onloading reads, calibrates and prunes each block: cpu "
                    "(default) or cuda (under torchrun: each rank's own GPU); --max-memory then budgets that device")
    pr.add_argument("--no-onload", action="store_true", help="load the whole model first (by default a plain "
                    "model folder is read one decoder block at a time, when the recipe allows)")
    pr.add_argument("--nsamples", type=count, default=128, help="calibration windows (default 128)")
    pr.add_argument("--seqlen", type=at_least(2), default=None, help="window length (default: the model's context, at most 2048)")
    pr.add_argument("--batch-size", type=count, default=1)
    pr.add_argument("--seed", type=natural, default=0)
    pr.add_argument("--json", default=None, help="also write the per-layer report as JSON here")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    ft = sub.add_parser("finetune", help="fine-tune a pruned model folder on text, every pruned weight kept zero "
                        "(N:M patterns and quantization grids too); write a checkpoint")
    ft.add_argument("model_dir", help="a sparsecc checkpoint (from `sparsecc prune`) or a save_pretrained folder")
    ft.add_argument("--text", required=True, help="training text: a file, or a folder of .txt files")
    ft.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    ft.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    ft.add_argument("--steps", type=count, default=200, help="optimizer steps (default 200)")
    ft.add_argument("--method", choices=("full", "lora"), default="full", help="train every weight (default), or "
                    "LoRA adapters merged as (W + BA) * mask")
    ft.add_argument("--rank", type=count, default=8, help="LoRA rank (default 8)")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 full, 1e-3 LoRA)")
    ft.add_argument("--teacher", default=None, metavar="DIR", help="the dense model folder: distil on its logits")
    ft.add_argument("--distill-weight", type=float, default=None, help="with --teacher: share of the distillation "
                    "loss (default 0.5)")
    ft.add_argument("--temperature", type=float, default=None, help="with --teacher: distillation temperature (default 2)")
    ft.add_argument("--eval-text", default=None, help="held-out text for the perplexity before/after (default: "
                    "the last tenth of --text, kept out of training)")
    ft.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="save the run's state here every 50 steps; "
                    "the same command resumes from it")
    ft.add_argument("--allow-dense", action="store_true", help="fine-tune a model with nothing pruned, as dense")
    ft.add_argument("--compress", action="store_true", help="store pruned/quantized weights compressed")
    ft.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    ft.add_argument("--seqlen", type=at_least(2), default=None, help="window length (default: the model's context, at most 2048)")
    ft.add_argument("--batch-size", type=count, default=8, help="windows per step (default 8)")
    ft.add_argument("--seed", type=natural, default=0)
    ft.add_argument("--json", default=None, help="also write the fine-tuning report as JSON here")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ev = sub.add_parser("eval", help="perplexity of a local model folder (or sparsecc checkpoint) on a text file")
    ev.add_argument("model_dir")
    ev.add_argument("--text", required=True, help="a text file, or a folder of .txt files")
    ev.add_argument("--tokenizer", default=None)
    ev.add_argument("--seqlen", type=at_least(2), default=None, help="window length (default: the model's context, at most 2048)")
    ev.add_argument("--batch-size", type=count, default=8)
    ev.add_argument("--max-windows", type=natural, default=0, help="evaluate at most this many windows (0: all)")
    ev.add_argument("--json", default=None)
    ev.add_argument("--quiet", action="store_true")
    be = sub.add_parser("bench", help="run the benchmarks that apply on this machine (from a source checkout)")
    be.add_argument("--quick", action="store_true", help="small sizes and the tiny model (minutes, not an hour)")
    be.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    be.add_argument("--only", default=None, metavar="NAMES", help="comma-separated scripts to run, e.g. nm_linear,cats_mlp "
                    f"(kernels: {','.join(KERNEL_BENCHMARKS)}); default: all")
    be.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    d = sub.add_parser("demo", help="prune the shipped reference model, compile it, compare perplexity (offline)")
    d.add_argument("--model", default="tiny", choices=["tiny", "ref"], help="shipped zoo model (default: tiny)")
    d.add_argument("--method", default="sparsegpt", choices=sorted(METHODS))
    d.add_argument("--sparsity", type=float, default=0.5)
    d.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (overrides --sparsity)")
    d.add_argument("--bits", type=int, default=None, choices=[2, 3, 4, 8],
                   help="also quantize the kept weights to this many bits in the same sweep (--method sparsegpt)")
    d.add_argument("--group-size", type=count, default=128, help="inputs sharing a scale and zero point with --bits (default 128)")
    d.add_argument("--nsamples", type=count, default=32, help="calibration windows (default 32)")
    d.add_argument("--seed", type=natural, default=0)
    d.add_argument("--eval-windows", type=natural, default=256, help="test windows (default 256; 0: the whole test split)")
    d.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    from ..errors import SparseccError

    def error(message) -> int:  # one line, whatever the message holds
        print(f"sparsecc {args.cmd}: error: " + "; ".join(filter(None, map(str.strip, str(message).splitlines()))),
              file=sys.stderr)
        return 2

    try:
        if getattr(args, "json", None):
            _check_output("--json", args.json)  # before any work, for every command
        if getattr(args, "quiet", False):
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        return {"demo": demo, "prune": prune, "finetune": finetune, "eval": evaluate, "bench": bench}[args.cmd](args)
    except KeyboardInterrupt:
        kept = getattr(args, "checkpoint_dir", None)
        kept = kept if kept and (Path(kept) / "state.json").is_file() else None
        print(f"sparsecc {args.cmd}: interrupted; nothing was written" + (
            f" but the run's state in {kept} (the same command resumes from it)" if kept else ""), file=sys.stderr)
        return 130
    except (SparseccError, OSError, ValueError) as e:  # bad input, files, disk: the message names the fix
        if args.traceback:
            raise
        return error(e)
    except Exception as e:  # a bug: still one line, and a way to see more
        if args.traceback:
            raise
        return error(f"{type(e).__name__}: {e} (unexpected; rerun as `sparsecc --traceback {args.cmd} ...` "
                     "to see where, and report it)")


if __name__ == "__main__":
    sys.exit(main())

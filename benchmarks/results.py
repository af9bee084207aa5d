"""Shared by the benchmark scripts: write one named section of benchmarks/RESULTS.md between
markers (leaving the rest alone), describe the machine, time a function, and the set-up the
kernel benchmarks (device/dtype options) and quality benchmarks (model, calibration, test ids) share."""
from __future__ import annotations

import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
README = RESULTS.parents[1] / "README.md"


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# sparsecc results\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def machine() -> str:
    import os

    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def median_time(fn, device: str, reps: int = 5) -> float:
    """Median seconds of fn() after a warm-up: CUDA events via triton.testing.do_bench on GPU,
    perf_counter over `reps` calls on CPU."""
    return median_times({"fn": fn}, device, reps)["fn"]


def median_times(fns: dict, device: str, reps: int = 5) -> dict:
    """{name: median seconds} of several fns (as median_time). On CPU the calls are interleaved,
    one of each per round, so that a machine slowing down during the run affects them alike."""
    import statistics
    import time

    if device == "cuda":
        import triton.testing
        return {k: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3 for k, fn in fns.items()}
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_device_args(p) -> None:
    """--device/--dtype/--reps options of the kernel benchmarks."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=int, default=5, help="CPU repeats (GPU: triton.testing.do_bench)")


def device_dtype(args):
    """(device, torch dtype) chosen by add_device_args' options."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    return device, getattr(torch, DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")])


def add_quality_args(p) -> None:
    """--model/--data-dir/--nsamples/--seed/--write-results options of the quality benchmarks."""
    p.add_argument("--model", default="ref", choices=["ref", "tiny"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-results", action="store_true")


def quality_setup(model_name: str, data_dir, nsamples: int, seed: int):
    """The shipped zoo model and WikiText-2 token streams (with `data_dir`: a model trained on that
    folder's text), calibration batches from the train split and the test split:
    (model, corpus source, seqlen, batches, test_ids)."""
    import sparsecc
    from sparsecc.zoo import encode_text, load_corpus, load_model, load_tokens, train_model

    if data_dir is None:
        model, _, _ = load_model(model_name)
        tokens = load_tokens()
        source, train_ids, test_ids = tokens.source, tokens.train, tokens.test
    else:
        model, tok, _ = train_model(model_name, data_dir=data_dir)
        corpus = load_corpus(data_dir)
        source = corpus.source
        train_ids, test_ids = encode_text(tok, corpus.train_text), encode_text(tok, corpus.test_text)
    seqlen = model.config.max_position_embeddings
    batches = sparsecc.sample_batches(train_ids, nsamples, seqlen, seed=seed, batch_size=16,
                                      source={"corpus": source})
    return model, source, seqlen, batches, test_ids


def bench_mode(device: str) -> str:
    """The kernel mode the kernel benchmarks time: on the GPU the Triton kernel itself ("triton":
    mode "auto" could run the fallback where it is faster), elsewhere the CPU path ("auto")."""
    return "triton" if device == "cuda" else "auto"


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def report(section: str, title: str, intro: str, text: str, command: str, write: bool, gpu: str = "",
           shown: int = 0) -> None:
    """Print a benchmark's table and, when `write`, store it as a section of RESULTS.md with the
    date, the machine and the command that reproduces it. The first `shown` lines of `text` were
    printed as they were measured (header first, then each row) and are not printed again."""
    rest = text.splitlines()[shown:]
    if rest:
        print("\n".join(rest if shown else ["", *rest]), flush=True)
    if write:
        write_section(section, "\n".join([
            f"## {title}", "", intro, "", text, "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}{gpu}. Produced by `{command}`."]))


def report_kernel(section: str, script: str, args, device: str, title: str, intro: str, text: str,
                  shown: int = 0) -> None:
    """`report` for the kernel benchmarks: section `<section>-<device>` (plus `-<dtype>` when
    --dtype names another than the device's default), the GPU named."""
    default = "fp16" if device == "cuda" else "fp32"
    dtype = f"-{args.dtype}" if args.dtype not in (None, default) else ""
    report(f"{section}-{device}{dtype}", f"{title} on {device_name(device)}", intro, text,
           f"python benchmarks/{script} --device {device}{' --quick' if args.quick else ''}"
           f"{f' --dtype {args.dtype}' if dtype else ''}{f' --reps {args.reps}' if args.reps != 5 else ''} --write-results",
           args.write_results, f", {device_name(device)}" if device == "cuda" else "", shown)

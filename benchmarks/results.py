"""Shared by the benchmark scripts: write one named section of benchmarks/RESULTS.md between
markers (leaving the rest alone), describe the machine, time a function."""
from __future__ import annotations

import platform
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
    import statistics
    import time

    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

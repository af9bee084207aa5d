"""Autotuning of the kernels' launch configs (block sizes, warps, pipeline stages), cached.

Each kernel wrapper lists candidate configs, its default first, and calls

    config = choose("nm_linear", key, candidates, launch, device)

where `launch(config)` runs the kernel once with that config and `key` holds what the best config
depends on (dtype, problem sizes, tokens bucketed to a power of two). On a CUDA device the first
call for a key times every candidate (triton.testing.do_bench; a config that fails to compile, e.g.
out of shared memory, counts as infinitely slow) and keeps the fastest, in memory and in
`<cache>/autotune.json` (cache: $SPARSECC_CACHE, else ~/.cache/sparsecc), keyed by GPU name and
triton version, so later processes skip the search. Elsewhere (the interpreter on CPU tensors),
and with SPARSECC_AUTOTUNE=0, the default config is used without timing.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

import torch

ENV = "SPARSECC_AUTOTUNE"
_lock = threading.Lock()
_cache: dict[str, dict] | None = None  # loaded from disk on first use


def bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: one tuning per bucket, not per sequence length."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def candidates(default: dict, **choices: list) -> list[dict]:
    """`default` first, then every combination of `choices` (each a list of values for one launch
    parameter, the others taken from default), without repeats."""
    out = [default]
    for name, values in choices.items():
        out = [{**c, name: v} for c in out for v in values]
    unique = [default]
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def cache_path() -> Path:
    """$SPARSECC_CACHE/autotune.json, else ~/.cache/sparsecc/autotune.json."""
    return Path(os.environ.get("SPARSECC_CACHE") or "~/.cache/sparsecc").expanduser() / "autotune.json"


def interpreted() -> bool:
    """Whether triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 when they were defined)."""
    try:
        import triton
    except ImportError:  # pragma: no cover - triton is a dependency
        return False
    return bool(triton.knobs.runtime.interpret)


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreted() and os.environ.get(ENV, "1") != "0"


def _bench(fn: Callable[[], None]) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _entries() -> dict[str, dict]:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_path().read_text())
        except (OSError, ValueError):  # no file yet, or a damaged one: tune again
            _cache = {}
    return _cache


def _full_key(kernel: str, key: tuple, device: torch.device) -> str:
    import triton
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return json.dumps([kernel, gpu, triton.__version__, *[str(k) for k in key]])


def choose(kernel: str, key: tuple, candidates: list[dict], launch: Callable[[dict], None],
           device: torch.device) -> dict:
    """The fastest of `candidates` for `key` (see the module docstring); candidates[0] when not tuning."""
    if not enabled(device) or len(candidates) == 1:
        return candidates[0]
    full = _full_key(kernel, key, device)
    with _lock:
        hit = _entries().get(full)
    if hit in candidates:
        return hit
    times = []
    for config in candidates:
        try:
            times.append(_bench(lambda: launch(config)))
        except Exception:  # noqa: BLE001 - e.g. out of resources for this block size: not a candidate
            times.append(float("inf"))
    if min(times) == float("inf"):
        raise RuntimeError(f"sparsecc: no launch config of the {kernel} kernel runs for {key}")
    best = candidates[times.index(min(times))]
    with _lock:
        entries = _entries()
        entries[full] = best
        try:
            path = cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=0))
            tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError:  # a read-only cache folder only costs a re-tune next time
            pass
    return best


def forget() -> None:
    """Drop the in-memory table (the next choose() re-reads the file)."""
    global _cache
    with _lock:
        _cache = None

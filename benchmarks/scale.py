"""Pruning models larger than memory (sequential onloading, issue 16): the peak memory and the time of
`sparsecc prune` on random-weight Llama folders of growing depth, the whole-model path refused under a
memory budget that onloading meets, and 1 vs 2 processes (torch.distributed) on the same model.

    python benchmarks/scale.py [--quick] [--depths 8,16,32] [--workdir DIR] [--write-results]
    python benchmarks/scale.py --depths 8 --methods sparsegpt,wanda,magnitude [--write-results]

What it does and measures:
- Writes random-weight Llama folders (hidden 1536, intermediate 4096, 12 query / 4 key-value heads of
  128, vocabulary 8192, fp32, untied lm_head; `--quick`: hidden 256, intermediate 512, 4 / 2 heads
  of 64) at each depth (8 / 16 / 32 layers; `--quick`: 2 / 4 / 8), one decoder block at a time: the
  model is built on the meta device for its tensor names and shapes, each block's tensors are drawn
  (normal(0, 0.02) from a generator seeded per block, norms ones) and saved as one shard, so the
  generator's memory stays flat too. The zoo tokenizer is saved beside them (the command line needs
  one). The folders live in a temporary folder, deleted at the end.
- Runs `sparsecc prune FOLDER --recipe R --calib TEXT --out OUT --nsamples N --seqlen L --quiet` (recipe:
  SparseGPT 50% on every linear but lm_head; calibration text: the shipped WikiText-2 train split,
  decoded from the token ids the package ships) in a child process (this script with `--child`, which
  calls `sparsecc.tools.cli.main`): the child takes its baseline after its imports, then reads the
  peak resident memory the command adds above it the way benchmarks/e2e.py's PeakMemory does
  (malloc_trim, /proc/self/clear_refs 5, VmHWM - VmRSS), and samples /proc/self/status every 20 ms for
  the anonymous / file-backed split of the resident set at its largest.
- Compares the peak with sparsecc's own estimate (`passes/memory.py:onload_peak_bytes`, computed as
  `prune_folder` computes it) and with the issue's bound: peak <= 1.5 x (one block's parameters + its
  Hessians (sum over its linears of in^2 x 8 bytes, fp64) + calibration activations (2 x nsamples x
  seqlen x hidden x 4 bytes)); and its flatness, peak(deepest) / peak(shallowest).
- On the deepest model: `--no-onload --max-memory X` must be refused (exit status 2) and the default
  (onloading) run under the same `--max-memory X` must succeed.
- On the shallowest model (`--no-activations`: not): the same run with `--activations bf16` and
  `--activations disk` (estimate, peak, time, and how many checkpoint tensors equal the default's).
- On the shallowest model (not with --quick unless --distributed): `torchrun --nproc_per_node=2` (gloo)
  against 1 process, each rank with OMP_NUM_THREADS=1, and 1 process with 2 threads; the checkpoints'
  per-tensor sha256 tables (sparsecc.json) are compared. If the command line does not join a process
  group under torchrun, the row says "not available" with the reason.
- `--methods M1,M2,...` runs instead one model (the first of --depths) once per pruning method at 50%
  (estimate and its peak phase, peak, anon / file at peak, time): section "scale-methods".
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    from results import report
except ImportError:  # run as a module
    from benchmarks.results import report

SCRIPT = Path(__file__).resolve()
RESULT_TAG = "SCALE-RESULT "
MiB, GiB = 2 ** 20, 2 ** 30
SHAPES = {
    "full": dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=4, head_dim=128),
    "quick": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
VOCAB = 8192  # >= the zoo tokenizer's 2048
RECIPE = {"default": {"method": "sparsegpt", "sparsity": 0.5}, "lm_head": None}
# imported by the child before its baseline: what `sparsecc prune` imports on its way (~50 MiB of code
# and tables that do not grow with the model), so that the peak is the run's data
PREIMPORT = ("torch._dynamo", "torch.export", "networkx", "sparsecc.api", "sparsecc.graph.capture", "sparsecc.io.lazy",
             "sparsecc.io.onload", "sparsecc.io.checkpoint", "sparsecc.passes.analysis", "sparsecc.passes.transform.prune",
             "sparsecc.tools.local_models", "sparsecc.zoo")


# ----------------------------------------------------------------------------------------------------
# the child: one `sparsecc prune` run, measured from inside the process that runs it
# ----------------------------------------------------------------------------------------------------

def _status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(line.split()[1]) * 1024
    return fields


class RssSampler(threading.Thread):
    """Samples /proc/self/status every `every` seconds; keeps the sample with the largest VmRSS."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.top, self.halt = every, _status(), threading.Event()

    def run(self):
        while not self.halt.wait(self.every):
            now = _status()
            if now["VmRSS"] > self.top["VmRSS"]:
                self.top = now

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return self.top


def run_child(cli_args: list[str]) -> int:
    """In the child process: import what `sparsecc prune` uses, take the baseline, run the command line,
    print one RESULT_TAG line of JSON (peak bytes above the baseline, split, seconds, block times)."""
    import torch
    import torch.distributed as dist

    # whether the command line joins a process group (torchrun): patched before sparsecc is imported
    joined: list[int] = []
    init = dist.init_process_group

    def init_process_group(*a, **kw):
        out = init(*a, **kw)
        joined.append(dist.get_world_size())
        return out
    dist.init_process_group = init_process_group

    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401  (the model code, before the baseline)

    import sparsecc  # noqa: F401
    from sparsecc.tools import cli
    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:  # moved or renamed: imported by the run instead
            pass
    try:
        from e2e import PeakMemory
    except ImportError:  # run as a module
        from benchmarks.e2e import PeakMemory

    # when each block is read and written (sparsecc.io.onload.BlockFiles), and the peak so far then
    marks: list[tuple[str, int, float]] = []
    hwm: list[int] = []  # VmHWM as each block is written, in bytes (minus the baseline, once known)
    try:
        from sparsecc.io.onload import BlockFiles
        load, done = BlockFiles.load, BlockFiles.done
        def load_block(self, k, name):
            if k == 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1 and not (joined or dist.is_initialized()):
                # under torchrun, but pruning alone: stop now rather than prune the model once per rank
                print("scale.py: error: sparsecc prune did not join a torch.distributed process group under "
                      "torchrun (each rank would prune the whole model alone)", file=sys.stderr, flush=True)
                os._exit(3)
            marks.append(("load", k, time.perf_counter()))
            return load(self, k, name)
        BlockFiles.load = load_block
        def done_block(self, k, name, rows):
            out = done(self, k, name, rows)
            marks.append(("done", k, time.perf_counter()))
            hwm.append(_status()["VmHWM"])
            return out
        BlockFiles.done = done_block
    except (ImportError, AttributeError):
        pass
    sampler = RssSampler()
    with PeakMemory("cpu") as mem:
        base = _status()
        sampler.start()
        t0 = time.perf_counter()
        code = cli.main(cli_args)
        seconds = time.perf_counter() - t0
        top = sampler.stop()
    end = _status()
    if dist.is_available() and dist.is_initialized():  # still joined: however it was initialised
        joined.append(dist.get_world_size())
    loads = [t for kind, _, t in marks if kind == "load"]
    dones = [t for kind, _, t in marks if kind == "done"]
    blocks = (dones[-1] - loads[0]) / len(dones) if dones and loads else None
    result = {"code": code, "peak_bytes": mem.peak, "seconds": seconds, "block_seconds": blocks,
              "blocks_done": len(dones), "threads": torch.get_num_threads(),
              "peak_by_block": [h - base["VmRSS"] for h in hwm],
              "rank": int(os.environ.get("RANK", 0)), "world": max(joined, default=1),
              "base": {k: base[k] for k in ("VmRSS", "RssAnon", "RssFile")},
              "at_peak": {k: top[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")},
              "at_end": {k: end[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")}}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return code


# ----------------------------------------------------------------------------------------------------
# the parent: model folders, runs, figures
# ----------------------------------------------------------------------------------------------------

def llama_config(shape: dict, layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(**shape, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, dtype="float32",
                       architectures=["LlamaForCausalLM"])


def write_random_llama(folder: Path, config, tokenizer, seed: int) -> int:
    """A random-weight Llama folder written one decoder block at a time (shard k+1 of L+1: block k;
    the last shard: embeddings, final norm, lm_head); returns the bytes of its tensors. Block k's
    tensors depend only on (seed, k), so a shallower model's blocks are the deeper one's first blocks."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    layers = config.num_hidden_layers
    parts = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    parts.append([k for k in shapes if not k.startswith("model.layers.")])
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(parts):
        g = torch.Generator().manual_seed(seed * 100_003 + (i if i < layers else 99_999))
        tensors = {}
        for name in names:
            shape, dtype = shapes[name]
            tensors[name] = torch.ones(shape, dtype=dtype) if name.endswith("norm.weight") else \
                torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=g)
        shard = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(names, shard)
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def check_loads_as_written(folder: Path) -> int:
    """transformers' from_pretrained loads the folder to exactly the tensors written; returns how many."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    state = model.state_dict()
    written = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        written |= load_file(str(shard))
    bad = [k for k in written if not torch.equal(state[k], written[k])]
    if set(state) != set(written) or bad:
        raise SystemExit(f"{folder}: from_pretrained differs from the files written: "
                         f"{sorted(set(state) ^ set(written))[:3] or bad[:3]}")
    return len(written)


def write_inputs(root: Path) -> tuple[Path, Path, object]:
    """The recipe file, the calibration text (the shipped WikiText-2 train split, decoded: the same
    text with or without ../shared) and the zoo tokenizer."""
    from sparsecc.zoo import load_model, load_tokens
    _, tokenizer, _ = load_model("tiny")
    recipe, calib = root / "recipe.json", root / "calib.txt"
    recipe.write_text(json.dumps(RECIPE))
    calib.write_text(tokenizer.decode(load_tokens().train.tolist()))
    return recipe, calib, tokenizer


def block_bound(config, nsamples: int, seqlen: int) -> dict:
    """The issue's bound for one decoder block: parameters + Hessians (fp64, one per linear) + the
    calibration activations (the block's inputs and outputs, fp32), and 1.5x their sum."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    params = (sum(a * b for a, b in linears) + 2 * h) * 4
    hessians = sum(a * a for a, _ in linears) * 8
    acts = 2 * nsamples * seqlen * h * 4
    return {"params": params, "hessians": hessians, "activations": acts,
            "bound": int(1.5 * (params + hessians + acts))}


def onload_estimate(folder: Path, recipe_file: Path, nsamples: int, seqlen: int,
                    activations: str = "memory") -> tuple[int, dict]:
    """sparsecc's own estimate of the onloading peak, computed as sparsecc.prune_folder computes it
    (and checks it against --max-memory) before any weight is read."""
    import torch

    import sparsecc
    from sparsecc.graph.capture import capture
    from sparsecc.io.lazy import LazyModel
    from sparsecc.passes.memory import onload_peak_bytes
    from sparsecc.passes.pipeline import Pipeline
    from sparsecc.techniques.configs import technique_for

    lazy = LazyModel(folder)
    recipe = sparsecc.load_recipe(recipe_file)
    batches = [torch.zeros(1, seqlen, dtype=torch.long) for _ in range(nsamples)]  # --batch-size 1: shapes only
    captured = capture(lazy.model, {"input_ids": batches[0].to("meta"), "use_cache": False})
    pipe = Pipeline.from_recipe(lazy.model, recipe, batches, progress=False, captured=captured)
    hessians = [n for n, c in pipe.targets.items() if "hessian" in technique_for(c).needs(c)]
    pruned = {n: c for n, c in pipe.targets.items() if n not in hessians}
    blocks = captured.blocks
    act_bytes = max(p.dtype.itemsize for p in lazy.model.parameters() if p.is_floating_point())
    return onload_peak_bytes(captured, hessians, {b: lazy.nbytes(b) for b in blocks},
                             lazy.nbytes(outside=tuple(blocks)), batches, act_bytes, activations=activations,
                             pruned=pruned)


def whole_estimate(config) -> int:
    """What `sparsecc prune --no-onload --max-memory` checks (passes/memory.py:check_whole_memory):
    3 x the parameters + an fp64 Hessian for every linear (lm_head included)."""
    b = block_bound(config, 0, 0)
    outside = (2 * config.vocab_size + 1) * config.hidden_size * 4
    params = config.num_hidden_layers * b["params"] + outside
    return 3 * params + config.num_hidden_layers * b["hessians"] + config.hidden_size ** 2 * 8


def prune(folder: Path, out: Path, inputs: dict, extra: list[str] = (), threads: int = 2,
          procs: int = 1) -> dict:
    """`sparsecc prune` in a child process (procs > 1: under torchrun, gloo); its figures (rank 0's,
    and every rank's in "ranks"), wall seconds, bytes written, the last line it printed on stderr."""
    args = [str(folder), "--recipe", str(inputs["recipe"]), "--calib", str(inputs["calib"]), "--out", str(out),
            "--nsamples", str(inputs["nsamples"]), "--seqlen", str(inputs["seqlen"]), "--quiet", *extra]
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, str(SCRIPT), "--child", "prune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    ranks = [json.loads(line.split(RESULT_TAG, 1)[1]) for line in done.stdout.splitlines() if RESULT_TAG in line]
    ranks.sort(key=lambda r: r["rank"])
    result = {"exit": done.returncode, "wall": wall, "ranks": ranks, "stderr": error_line(done.stderr),
              **(ranks[0] if ranks else {})}
    if out.is_dir():
        result["written"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        result["hashes"] = tensor_hashes(out)
    return result


def error_line(stderr: str) -> str:
    """The line of a child's stderr that says what went wrong: sparsecc's one-line error, else the last
    exception line of a traceback, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if re.match(r"(\[rank\d+\]:\s*)?(sparsecc \w+|scale\.py): error:", line)]
    raised = [line for line in lines if re.match(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b:?", line)
              and "ChildFailedError" not in line]  # torchrun's own summary of a rank that failed
    return (ours or raised or lines or [""])[-1]


def tensor_hashes(out: Path) -> dict:
    """{(kind of file, tensor): sha256} from a checkpoint's sparsecc.json, over all its files (the
    kind: the file name without its shard numbering, so that differently split folders compare)."""
    meta = json.loads((out / "sparsecc.json").read_text())
    return {(re.sub(r"-\d{5}-of-\d{5}", "", f).removesuffix(".safetensors"), t): h
            for f, table in meta.get("sha256", {}).items() for t, h in table.items()}


def one_line(text: str, n: int = 200) -> str:
    return " ".join(str(text).split())[:n].replace("|", "/")


def mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def growth(peaks: list[int]) -> str:
    """"a / b / c": the peak as the first block, half the blocks and every block were written."""
    return " / ".join(mib(peaks[i]) for i in (0, len(peaks) // 2 - 1, -1)) if len(peaks) >= 2 else "-"


def depth_table(rows: list[dict]) -> str:
    lines = ["| layers | model MiB | estimate MiB (onload_peak_bytes) | peak MiB | peak / estimate "
             "| anon / file MiB at peak | peak after block 1 / half / all MiB | bound MiB (1.5 x block) | peak / bound "
             "| prune s | s per block | written MiB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        run = r["run"]
        if run.get("exit") != 0 or run.get("peak_bytes") is None:
            lines.append(f"| {r['layers']} | {mib(r['model_bytes'])} | {mib(r['estimate'])} | failed (exit "
                         f"{run.get('exit')}): {one_line(run.get('stderr'))} |" + " |" * 8)
            continue
        top = run["at_peak"]
        per_block = "-" if run["blocks_done"] != r["layers"] else f"{run['block_seconds']:.2f}"
        lines.append(f"| {r['layers']} | {mib(r['model_bytes'])} | {mib(r['estimate'])} | {mib(run['peak_bytes'])} | "
                     f"{run['peak_bytes'] / r['estimate']:.2f} | {mib(top['RssAnon'])} / {mib(top['RssFile'])} | "
                     f"{growth(run.get('peak_by_block') or [])} | "
                     f"{mib(r['bound']['bound'])} | {run['peak_bytes'] / r['bound']['bound']:.2f} | "
                     f"{run['seconds']:.1f} | {per_block} | {mib(run.get('written'))} |")
    return "\n".join(lines)


def procs_table(rows: list[tuple[str, dict]], reference: dict | None) -> str:
    lines = ["| run | prune s (slowest rank) | wall s (imports included) | peak MiB per rank "
             "| identical masks and weights to 1 process x 1 thread |",
             "| --- | ---: | ---: | ---: | --- |"]
    for label, run in rows:
        if run.get("unavailable"):
            lines.append(f"| {label} | not available: {one_line(run['unavailable'])} | | | |")
            continue
        if run["exit"] != 0 or not run["ranks"]:
            lines.append(f"| {label} | failed (exit {run['exit']}): {one_line(run['stderr'])} | | | |")
            continue
        same = "-" if reference is None or run is reference or "hashes" not in run else \
            ("yes" if run["hashes"] == reference["hashes"] else
             f"no ({sum(run['hashes'].get(k) != h for k, h in reference['hashes'].items())} of "
             f"{len(reference['hashes'])} tensors differ)")
        lines.append(f"| {label} | {max(r['seconds'] for r in run['ranks']):.1f} | {run['wall']:.1f} | "
                     f"{' / '.join(mib(r['peak_bytes']) for r in run['ranks'])} | {same} |")
    return "\n".join(lines)


ACTIVATIONS = ("bf16", "disk")  # the other ways to keep the hidden states, run on the shallowest model


def compare_methods(folder: Path, work: Path, inputs: dict, methods: list[str], threads: int) -> str:
    """`sparsecc prune` of `folder` with each method at 50% (every linear but lm_head): estimate, peak
    and its anonymous / file-backed split, time."""
    lines = ["| method | estimate MiB (onload_peak_bytes) | estimate's peak phase | peak MiB | peak / estimate "
             "| anon / file MiB at peak | prune s | s per block |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        recipe = work / f"recipe-{method}.json"
        recipe.write_text(json.dumps({"default": {"method": method, "sparsity": 0.5}, "lm_head": None}))
        estimate, parts = onload_estimate(folder, recipe, inputs["nsamples"], inputs["seqlen"])
        run = prune(folder, work / f"out-{method}", {**inputs, "recipe": recipe}, threads=threads)
        shutil.rmtree(work / f"out-{method}", ignore_errors=True)
        phase = f"{parts.get('block')}: {parts.get('phase')}"
        if run["exit"] != 0 or not run.get("peak_bytes"):
            lines.append(f"| {method} | {mib(estimate)} | {phase} | failed (exit {run['exit']}): "
                         f"{one_line(run['stderr'])} |" + " |" * 4)
            continue
        top = run["at_peak"]
        lines.append(f"| {method} | {mib(estimate)} | {phase} | {mib(run['peak_bytes'])} | "
                     f"{run['peak_bytes'] / estimate:.2f} | {mib(top['RssAnon'])} / {mib(top['RssFile'])} | "
                     f"{run['seconds']:.1f} | {run['block_seconds'] or 0:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def compare_activations(folder: Path, work: Path, inputs: dict, done: dict, threads: int) -> str:
    """`--activations bf16` and `disk` against the default run `done` on `folder`: estimate, peak,
    time, and how many tensors of the checkpoint differ."""
    lines = ["| --activations | estimate MiB | peak MiB | anon / file MiB at peak | prune s | s per block "
             "| tensors equal to memory's |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mode, run in [("memory", done)] + [(m, None) for m in ACTIVATIONS]:
        estimate, _ = onload_estimate(folder, inputs["recipe"], inputs["nsamples"], inputs["seqlen"], mode)
        if run is None:
            run = prune(folder, work / f"out-{mode}", inputs, ["--activations", mode], threads)
            shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
        if run["exit"] != 0 or not run.get("peak_bytes"):
            lines.append(f"| {mode} | {mib(estimate)} | failed (exit {run['exit']}): {one_line(run['stderr'])} |"
                         + " |" * 4)
            continue
        ours, theirs = run.get("hashes") or {}, done.get("hashes") or {}
        same = "-" if run is done else "all" if ours == theirs else \
            f"{sum(ours.get(k) == h for k, h in theirs.items())} of {len(theirs)}"
        top = run["at_peak"]
        lines.append(f"| {mode} | {mib(estimate)} | {mib(run['peak_bytes'])} | {mib(top['RssAnon'])} / "
                     f"{mib(top['RssFile'])} | {run['seconds']:.1f} | {run['block_seconds']:.2f} | {same} |")
        print(f"  --activations {mode}: peak {mib(run['peak_bytes'])} MiB (estimate {mib(estimate)}), "
              f"{run['seconds']:.1f} s", flush=True)
    return "\n".join(lines)


def compare_processes(folder: Path, work: Path, inputs: dict, done: dict, threads: int) -> tuple[str, list]:
    """2 processes x 1 thread (torchrun, gloo) vs 1 process x 1 thread vs 1 x 2 threads on `folder`;
    `done`: the depth run already made there with `threads` threads (reused, not run again)."""
    two = prune(folder, work / "out-2procs", inputs, threads=1, procs=2)
    shutil.rmtree(work / "out-2procs", ignore_errors=True)
    if two["exit"] != 0 or not two["ranks"]:
        said = two["stderr"]
        two = {"unavailable": said.split("scale.py: error: ", 1)[1] if "scale.py: error: " in said
               else f"exit {two['exit']}: {said}"}
    elif any(r["world"] != 2 for r in two["ranks"]):
        two = {"unavailable": "sparsecc prune did not join a torch.distributed process group under torchrun "
                              f"(world size {two['ranks'][0]['world']}): each rank pruned the whole model alone"}
    single = {threads: done}
    if not two.get("unavailable"):  # without a 2-process run, the other single-process run compares nothing
        for n in (1, 2):
            if n not in single:
                single[n] = prune(folder, work / f"out-1x{n}", inputs, threads=n)
                shutil.rmtree(work / f"out-1x{n}", ignore_errors=True)
    rows = [(f"1 process x {n} thread{'s' if n > 1 else ''}", single[n]) for n in sorted(single)]
    rows.append(("2 processes x 1 thread (torchrun, gloo)", two))
    return procs_table(rows, single.get(1)), rows


def run_methods(args, work: Path, layers: int, nsamples: int, seqlen: int, t_start: float, load: float) -> int:
    """--methods: one model, one `sparsecc prune` per method; the "scale-methods" section."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    shape = SHAPES["quick" if args.quick else "full"]
    try:
        recipe, calib, tokenizer = write_inputs(work)
        folder = work / f"llama-{layers}"
        write_random_llama(folder, llama_config(shape, layers), tokenizer, args.seed)
        text = compare_methods(folder, work, {"recipe": recipe, "calib": calib, "nsamples": nsamples,
                                              "seqlen": seqlen}, methods, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    intro = (
        f"`sparsecc prune` (sequential onloading) of one random-weight Llama folder as in the section above (hidden "
        f"{shape['hidden_size']}, intermediate {shape['intermediate_size']}, {layers} layers, fp32) with each method at "
        f"50% on every linear but lm_head; calibration {nsamples} windows of {seqlen} tokens. **peak**, **anon / file** "
        "and the times are measured as above; **estimate** is `onload_peak_bytes` with its peak phase. Magnitude and "
        "Wanda prune one linear at a time (its undo copy for the report's error, fp32 scores, the keep-mask, ranked a "
        "chunk of rows at a time or, layer-wise, by a radix select: prune/masks.py); SparseGPT holds the block's "
        f"Hessians. {args.threads} thread(s). Whole run {total / 60:.1f} min; 1-minute load average {load:.1f} at the "
        f"start and {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores.")
    command = " ".join(["python benchmarks/scale.py", *(["--quick"] if args.quick else []), f"--depths {layers}",
                        *([f"--nsamples {nsamples}"] if args.nsamples else []),
                        *([f"--seqlen {seqlen}"] if args.seqlen else []),
                        *([f"--threads {args.threads}"] if args.threads != 2 else []),
                        f"--methods {','.join(methods)}", "--write-results"])
    report("scale-methods", "Scale: the onloading peak by pruning method", intro, text, command, args.write_results)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return run_child(argv[1:])
    p = argparse.ArgumentParser(prog="scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="hidden 256, 2/4/8 layers, 4 x 128 calibration tokens (well "
                   "under a minute)")
    p.add_argument("--depths", default=None, help="comma-separated layer counts (default 8,16,32; quick 2,4,8)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 16; quick 4)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 512; quick 128)")
    p.add_argument("--max-memory", default=None, help="the budget of the refusal check (default 2GiB; quick 64MiB)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="compare 1 and 2 processes on the shallowest model (default: on, off with --quick)")
    p.add_argument("--activations", action=argparse.BooleanOptionalAction, default=True,
                   help="also run --activations bf16 and disk on the shallowest model (default: yes)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the depth runs (default 2; 1 where "
                   "other jobs keep a core busy: 2 OpenMP threads then wait on each other, many times slower)")
    p.add_argument("--methods", default=None, help="instead of the depth runs: prune the shallowest model with each "
                   "of these comma-separated methods (e.g. sparsegpt,wanda,magnitude) and write the \"scale-methods\" "
                   "section")
    p.add_argument("--workdir", default=None, help="where the model folders go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    depths = sorted({int(d) for d in (args.depths or ("2,4,8" if q else "8,16,32")).split(",")})
    nsamples, seqlen = args.nsamples or (4 if q else 16), args.seqlen or (128 if q else 512)
    budget_text = args.max_memory or ("64MiB" if q else "2GiB")
    distributed = (not q) if args.distributed is None else args.distributed

    from transformers.utils import logging as hf_logging

    from sparsecc.passes.memory import parse_bytes
    hf_logging.disable_progress_bar()
    budget = parse_bytes(budget_text)
    t_start, load = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="sparsecc-scale-", dir=args.workdir))
    if args.methods:
        return run_methods(args, work, depths[0], nsamples, seqlen, t_start, load)
    rows, procs_text, acts_text, refusal, onload_under_budget = [], None, None, None, None
    try:
        recipe, calib, tokenizer = write_inputs(work)
        inputs = {"recipe": recipe, "calib": calib, "nsamples": nsamples, "seqlen": seqlen}
        for layers in depths:
            config = llama_config(SHAPES["quick" if q else "full"], layers)
            folder = work / f"llama-{layers}"
            t0 = time.perf_counter()
            model_bytes = write_random_llama(folder, config, tokenizer, args.seed)
            print(f"{layers} layers: wrote {model_bytes / MiB:,.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
            if layers == depths[0]:
                print(f"  from_pretrained loads the {check_loads_as_written(folder)} tensors as written", flush=True)
            estimate, parts = onload_estimate(folder, recipe, nsamples, seqlen)
            deepest = layers == depths[-1]
            if deepest:  # the whole model is refused under the budget that onloading meets
                whole = whole_estimate(config)
                refusal = prune(folder, work / "out-whole", inputs, ["--no-onload", "--max-memory", budget_text])
                refusal.update(estimate=whole, onload_estimate=estimate)
                print(f"  --no-onload --max-memory {budget_text}: exit {refusal['exit']} after {refusal['wall']:.1f} s "
                      f"(peak {mib(refusal.get('peak_bytes'))} MiB): {refusal['stderr']}", flush=True)
            run = prune(folder, work / "out", inputs, ["--max-memory", budget_text] if deepest else [], args.threads)
            shutil.rmtree(work / "out", ignore_errors=True)
            if deepest:
                onload_under_budget = run
            row = {"layers": layers, "model_bytes": model_bytes, "estimate": estimate, "parts": parts,
                   "bound": block_bound(config, nsamples, seqlen), "run": run}
            rows.append(row)
            print(f"  onloading{f' --max-memory {budget_text}' if deepest else ''}: exit {run['exit']}, "
                  f"peak {mib(run.get('peak_bytes'))} MiB (estimate {mib(estimate)}, bound "
                  f"{mib(row['bound']['bound'])}), {run.get('seconds', 0):.1f} s" +
                  (f"; {run['stderr']}" if run["exit"] else ""), flush=True)
            if layers == depths[0] and args.activations:
                acts_text = compare_activations(folder, work, inputs, run, args.threads)
            if layers == depths[0] and distributed:
                procs_text, _ = compare_processes(folder, work, inputs, run, args.threads)
                print(procs_text, flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start

    text = depth_table(rows)
    ok = [r for r in rows if r["run"].get("exit") == 0 and r["run"].get("peak_bytes")]
    within = all(r["run"]["peak_bytes"] <= r["bound"]["bound"] for r in ok) and len(ok) == len(rows)
    flat = ok[-1]["run"]["peak_bytes"] / ok[0]["run"]["peak_bytes"] if len(ok) >= 2 else None
    refused = refusal is not None and refusal["exit"] == 2 and "whole model" in refusal["stderr"]
    completed = onload_under_budget is not None and onload_under_budget["exit"] == 0
    b = rows[0]["bound"] if rows else None
    shape = SHAPES["quick" if q else "full"]
    lines = [text, ""]
    if b:
        lines.append(f"Bound per block: 1.5 x (parameters {mib(b['params'])} + Hessians {mib(b['hessians'])} + "
                     f"activations {mib(b['activations'])}) = {mib(b['bound'])} MiB; every run within it: "
                     f"**{'yes' if within else 'no'}**. Flatness peak({depths[-1]}) / peak({depths[0]}): "
                     + (f"**{flat:.2f}**" if flat else "-") + ".")
    if rows:
        parts = rows[-1]["parts"]
        lines.append(f"sparsecc's estimate at {rows[-1]['layers']} layers peaks in {parts.get('block')}, "
                     f"{parts.get('phase')}: " + ", ".join(
                         f"{k} {mib(v)} MiB" for k, v in parts.items() if k not in ("block", "phase")) + ".")
    if refusal is not None:
        whole = (f"`--no-onload` (estimate 3 x parameters + Hessians = {mib(refusal['estimate'])} MiB) "
                 + ("was refused" if refused else "was NOT refused")
                 + f" (exit {refusal['exit']} after {refusal['wall']:.1f} s wall, {refusal.get('seconds', 0):.1f} s in "
                 f"the command, peak {mib(refusal.get('peak_bytes'))} MiB"
                 + (f": `{one_line(refusal['stderr'], 300)}`)" if refused else ")"))
        if completed:
            peak = onload_under_budget["peak_bytes"]
            onload = (f"onloading (estimate {mib(refusal['onload_estimate'])} MiB) completed (exit 0) with a measured "
                      f"peak of {mib(peak)} MiB, " + ("within the budget" if peak <= budget else
                                                      "**above the budget** its estimate said it fits"))
        else:
            onload = f"onloading FAILED: `{one_line(onload_under_budget and onload_under_budget['stderr'])}`"
        lines.append(f"Under `--max-memory {budget_text}` ({budget / MiB:,.0f} MiB) on the {depths[-1]}-layer model: "
                     f"{whole}; {onload}. Whole model refused where onloading completes: "
                     f"**{'met' if refused and completed else 'not met'}**"
                     + (" (as the command line checks it: by estimates)" if completed and refused and peak > budget
                        else "") + ".")
    onloaded = all(r["run"].get("blocks_done") == r["layers"] for r in ok)
    if not onloaded:
        lines.append("**Some runs did not read the model block by block** (no block was written through "
                     "sparsecc.io.onload.BlockFiles): the command line loaded it whole.")
    if acts_text:
        lines += ["", f"How the calibration hidden states are kept between blocks (`--activations`), on the "
                  f"{depths[0]}-layer model; bf16 rounds the blocks' inputs (statistics of the rounded inputs), disk "
                  "keeps one file per batch in a temporary folder:", "", acts_text]
    if procs_text:
        lines += ["", f"1 vs 2 processes on the {depths[0]}-layer model (OMP_NUM_THREADS per rank as named):", "",
                  procs_text]
    else:
        lines.append("1 vs 2 processes: not run (" + ("`--no-distributed`" if args.distributed is False else
                                                       "`--quick`; `--distributed` runs it") + ").")
    text = "\n".join(lines)
    intro = (
        f"`sparsecc prune` (sequential onloading: one decoder block read, pruned and written at a time) on "
        f"random-weight Llama folders written block by block: hidden {shape['hidden_size']}, intermediate "
        f"{shape['intermediate_size']}, {shape['num_attention_heads']} query / {shape['num_key_value_heads']} "
        f"key-value heads of {shape['head_dim']}, vocabulary {VOCAB}, fp32, untied lm_head; {', '.join(map(str, depths))} "
        f"layers. Recipe SparseGPT 50% on every linear but lm_head; calibration {nsamples} windows of {seqlen} tokens "
        "of the shipped WikiText-2 train split (`--nsamples`, `--seqlen`). Each run is a child process: **peak** is "
        "the peak resident set it adds above its baseline after imports (VmHWM reset through /proc/self/clear_refs, "
        "freed heap first returned with malloc_trim, as benchmarks/e2e.py measures); **anon / file at peak** split "
        "the resident set at its largest (sampled every 20 ms, above the baseline): file-backed pages are the "
        "memory-mapped weight shards (the page cache can drop them) and the library code the run pages in, anonymous "
        "ones the process's own. **peak after "
        "block 1 / half / all**: the peak so far as the first, the middle and the last block were written (flat "
        "onloading keeps them equal). **estimate**: "
        "sparsecc's `onload_peak_bytes`, the figure `--max-memory` is checked against. **bound**: the issue's goal, "
        "1.5 x (one block's parameters + its fp64 Hessians + the calibration activations, 2 x nsamples x seqlen x "
        "hidden x 4 bytes; a Hessian per linear, although sparsecc keeps one per input: 4 of them for the block's 7 "
        "linears); the embeddings and lm_head (read for the probe and for the end only) are outside it. **prune s**: the "
        "command, tokenizing included, imports not; **s per block**: from the first block read to the last written, "
        "over the blocks. **written**: all files of the output folder. The folders sit in the page cache (just "
        f"written), so the reads do not time the disk. {args.threads} thread(s) (OMP_NUM_THREADS) unless named. Whole run "
        f"{total / 60:.1f} min; 1-minute load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        f"on {os.cpu_count()} cores (above {os.cpu_count()}: other jobs shared the cores, and the times are high).")
    flags = [("--quick", q), (f"--depths {','.join(map(str, depths))}", args.depths is not None),
             (f"--nsamples {nsamples}", args.nsamples is not None), (f"--seqlen {seqlen}", args.seqlen is not None),
             (f"--max-memory {budget_text}", args.max_memory is not None), (f"--threads {args.threads}", args.threads != 2),
             ("--distributed" if distributed else "--no-distributed", args.distributed is not None),
             ("--no-activations", not args.activations)]
    command = " ".join(["python benchmarks/scale.py", *(f for f, on in flags if on), "--write-results"])
    report("scale", "Scale: pruning models larger than memory (sequential onloading)", intro, text, command,
           args.write_results)
    print(f"total {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

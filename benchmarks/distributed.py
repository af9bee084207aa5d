"""Calibration spread over processes (torch.distributed, issue 16): 1 vs 2 processes on the recipes
whose cost is calibration forwards, and whether both give the same model.

    python benchmarks/distributed.py [--model ref|tiny] [--nsamples 16] [--recipes bonsai,...] [--write-results]

Each recipe runs `sparsecc.sparsify_` on the zoo model in child processes (this script with
`--child`): one process with one thread, then `torchrun --standalone --nproc_per_node=2` (gloo) with
one thread per rank, so that the two runs use the same cores' worth of threads per rank. **s**:
sparsify_ alone (imports, model and batches excluded; the slowest rank). **identical**: the sha256
of every tensor of the resulting model and of the report's rows (timings left out) equal to the
one-process run's. The ranks share the batches (a contiguous half each) and reduce their statistics
in global batch order (passes/distributed.py), so the model must be the same bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    from results import add_quality_args, report
except ImportError:  # run as a module
    from benchmarks.results import add_quality_args, report

SCRIPT = Path(__file__).resolve()
TAG = "DIST-RESULT "
MLP = "re:.*mlp"


def recipes():
    import sparsecc
    return {  # name -> (what it spends its time on, recipe)
        "bonsai": ("forwards: 64 masked sub-models x the batches",
                   {MLP: sparsecc.StructuredConfig(0.5, score="bonsai")}),
        "layerdrop-loss": ("forwards: one per block skipped x the batches",
                           {"model.layers": sparsecc.LayerDropConfig(n=1, score="loss")}),
        "cats+wanda": ("block forwards, gate samples", {"default": sparsecc.WandaConfig(0.5), "lm_head": None,
                                                        MLP: sparsecc.CATSConfig(0.5)}),
        "flap-refit-global": ("block forwards, two sweeps; refit solves on every rank",
                              {MLP: sparsecc.StructuredConfig(0.5, score="flap", update="refit",
                                                              layerwise="global")}),
        "sparsegpt": ("block forwards, Hessians; one solve per linear, spread over the ranks",
                      {"default": sparsecc.SparseGPTConfig(0.5), "lm_head": None}),
    }


def child(args) -> int:
    """One rank (or the single process): sparsify_ with the named recipe, its figures on stdout."""
    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    import sparsecc
    try:
        from results import quality_setup
    except ImportError:
        from benchmarks.results import quality_setup
    model, _, _, batches, _ = quality_setup(args.model, args.data_dir, args.nsamples, args.seed)
    batches = [rows for b in batches for rows in b.split(args.batch_size)]  # >= 1 batch per rank
    recipe = recipes()[args.child][1]
    t0 = time.perf_counter()
    report_ = sparsecc.sparsify_(model, recipe, batches, progress=False)
    seconds = time.perf_counter() - t0
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in report_.rows],
                        sort_keys=True, default=str).encode())
    print(TAG + json.dumps({"rank": rank, "world": world, "seconds": seconds, "hash": h.hexdigest()}), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def run(name: str, args, procs: int) -> dict:
    """The recipe in a child process (procs 2: under torchrun), one thread per process."""
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, str(SCRIPT), "--child", name, "--model", args.model, "--nsamples", str(args.nsamples),
           "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           *(["--data-dir", args.data_dir] if args.data_dir else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ranks = [json.loads(line.split(TAG, 1)[1]) for line in done.stdout.splitlines() if TAG in line]
    if done.returncode != 0 or len(ranks) != procs:
        said = [line for line in done.stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
        return {"error": " ".join((said or [f"exit {done.returncode}"])[-1].split())[:200].replace("|", "/")}
    if any(r["world"] != procs for r in ranks):
        return {"error": f"the ranks did not join one process group (world {ranks[0]['world']})"}
    return {"seconds": max(r["seconds"] for r in ranks), "hashes": {r["hash"] for r in ranks}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.set_defaults(nsamples=16)
    p.add_argument("--recipes", default=None, help="comma-separated, of: " + ", ".join(recipes()))
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per batch (default 4): the "
                   "ranks share whole batches")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    names = args.recipes.split(",") if args.recipes else list(recipes())
    unknown = [n for n in names if n not in recipes()]
    if unknown:
        p.error(f"--recipes: no recipe {unknown[0]!r}; choose from {', '.join(recipes())}")
    lines = ["| recipe | where the time goes | 1 process x 1 thread s | 2 processes x 1 thread s | speedup "
             "| identical |", "| --- | --- | ---: | ---: | ---: | --- |"]
    print("\n" + "\n".join(lines), flush=True)
    for name in names:
        one, two = run(name, args, 1), run(name, args, 2)
        what = recipes()[name][0]
        if "error" in one or "error" in two:
            cell = [r["error"] if "error" in r else f"{r['seconds']:.1f}" for r in (one, two)]
            lines.append(f"| {name} | {what} | {cell[0]} | {cell[1]} | - | - |")
        else:
            same = "yes" if one["hashes"] == two["hashes"] and len(two["hashes"]) == 1 else "no"
            lines.append(f"| {name} | {what} | {one['seconds']:.1f} | {two['seconds']:.1f} | "
                         f"{one['seconds'] / two['seconds']:.2f}x | {same} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    intro = (f"`sparsify_` on the `{args.model}` zoo model with {args.nsamples} calibration windows (seed "
             f"{args.seed}) in batches of {args.batch_size}, in one process with one thread and under `torchrun --nproc_per_node=2` (gloo) with "
             "one thread per rank: seconds of sparsify_ alone (the slowest rank). Identical: the sha256 of every "
             "tensor of the pruned model and of the report's rows equal to the one-process run's, on both ranks.")
    report("distributed", "Calibration over 2 processes (torch.distributed, gloo)", intro, text,
           f"python benchmarks/distributed.py --model {args.model} --nsamples {args.nsamples} --batch-size {args.batch_size}"
           f"{' --recipes ' + args.recipes if args.recipes else ''} --write-results",
           args.write_results, shown=len(text.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

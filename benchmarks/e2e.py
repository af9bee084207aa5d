"""End to end, the user's path: sparsify_ (then pack_), save_pruned, torch.compile(backend="sparsecc")
and transformers' generate, per technique on two models: prefill and decode speed, peak memory,
checkpoint bytes and perplexity.

    python benchmarks/e2e.py [--quick] [--rows dense,wanda50,...] [--models ref,random] [--write-results]

Models: the `ref` zoo model (trained on WikiText-2: quality and speed; `--quick`: the `tiny` one) and
a random-weight Llama with the layer shapes of Llama-3.2-1B (hidden 2048, intermediate 8192, 32
query / 8 key-value heads of 64, vocabulary 32000, tied embeddings) but only `--layers` (2) of its
16 layers (`--layers`), so that the run fits 2 CPU cores in minutes (16 min with --threads 1 on a
shared machine); layer drop removes 1 of them (a quarter of 4 with --layers 4); its perplexity would mean nothing and
is not measured, and it is calibrated on random token windows. Every row is prepared first
(sparsify_, checkpoint, perplexity, pack_, compile), then the rows' timed runs alternate, one of
each row per round, and each figure is the median over `--reps` rounds, so that the machine
slowing down (other jobs) hits every row alike.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import difflib
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sparsecc
from sparsecc.tools.evaluate import perplexity
from sparsecc.tools.cli import at_least

try:
    from results import RESULTS, add_device_args, device_dtype, device_name, report
except ImportError:  # run as a module
    from benchmarks.results import RESULTS, add_device_args, device_dtype, device_name, report

ROWS = ("dense", "dense-compiled", "dense-inductor", "wanda50", "wanda24", "csr90", "gptq4", "rtn8", "sgpt50q4",
        "cats50", "cats70", "mlp25", "mlp50", "heads25", "both", "layerdrop")
DEFAULT_ROWS = [r for r in ROWS if r != "dense-inductor"]  # that one only on request (--rows)
MODELS = ("ref", "random")
SPEED = ("prefill", "decode1", "decode8")  # the three timed calls of every row


def row_specs(model, drop: int) -> dict:
    """{row: (label, recipe or None, after)}; `after` is None, "nm", "csr" or "quant" (pack_ after saving).
    A row's recipe is built here, so a config that does not exist yet fails only its own row."""
    S = sparsecc.StructuredConfig
    per_group = model.config.num_attention_heads // model.config.num_key_value_heads
    # 25% of the heads in every kv group needs >= 4 heads a group; otherwise whole groups go (25% of them)
    heads = dict(score="flap", update="refit", **({} if per_group >= 4 else {"unit": "kv_group"}))
    mlp = lambda s: {"re:.*mlp": S(s, score="flap", update="refit")}  # noqa: E731
    specs = {
        "dense": ("dense", lambda: None, None),
        "dense-compiled": ("dense", lambda: None, None),
        "dense-inductor": ("dense (backend inductor)", lambda: None, None),
        "wanda50": ("Wanda 50%", lambda: {"default": sparsecc.WandaConfig(0.5), "lm_head": None}, None),
        "wanda24": ("Wanda 2:4, packed N:M", lambda: {"default": sparsecc.WandaConfig(pattern="2:4"), "lm_head": None}, "nm"),
        "csr90": ("magnitude 90%, packed CSR", lambda: {"default": sparsecc.MagnitudeConfig(0.9), "lm_head": None}, "csr"),
        "gptq4": ("GPTQ int4 g128, packed", lambda: {"default": sparsecc.GPTQConfig(bits=4), "lm_head": None}, "quant"),
        "rtn8": ("RTN int8 per row (sym), packed",
                 lambda: {"default": sparsecc.RTNConfig(bits=8, group_size=None, sym=True), "lm_head": None}, "quant"),
        "sgpt50q4": ("SparseGPT 50% + int4 g128, packed",
                     lambda: {"default": sparsecc.SparseGPTConfig(0.5, bits=4), "lm_head": None}, "quant"),
        "cats50": ("CATS 50%", lambda: {"re:.*mlp": sparsecc.CATSConfig(0.5)}, None),
        "cats70": ("CATS 70%", lambda: {"re:.*mlp": sparsecc.CATSConfig(0.7)}, None),
        "mlp25": ("structured 25% MLP (FLAP+refit)", lambda: mlp(0.25), None),
        "mlp50": ("structured 50% MLP (FLAP+refit)", lambda: mlp(0.5), None),
        "heads25": (f"structured 25% heads{' (kv groups)' if 'unit' in heads else ''}",
                    lambda: {"re:.*self_attn": S(0.25, **heads)}, None),
        "both": ("50% MLP + 25% heads", lambda: {**mlp(0.5), "re:.*self_attn": S(0.25, **heads)}, None),
        "layerdrop": (f"layer drop {drop}/{model.config.num_hidden_layers} (BI)",
                      lambda: {"model.layers": sparsecc.LayerDropConfig(n=drop, score="bi")}, None),
    }
    return specs


def random_llama(quick: bool, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                 vocab_size=2048) if quick else \
        dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             vocab_size=32000)
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def checkpoint_bytes(model, report, compress: bool) -> int:
    """Sum of the file sizes of the saved folder: save_pruned for a sparsified model (compress=True: pruned
    and quantized weights stored compressed), save_pretrained (safetensors) for the dense one."""
    with tempfile.TemporaryDirectory(prefix="e2e-ckpt-") as d:
        out = Path(d) / "model"
        if report is None:
            model.save_pretrained(out)
        else:
            sparsecc.save_pruned(model, out, report, compress=compress)
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def _kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory a stretch of calls adds above what was allocated when it began, in bytes (None where
    it cannot be read). CUDA: max_memory_allocated minus memory_allocated at the start. CPU (Linux):
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set at the
    start, freed heap pages first returned to the system (malloc_trim) so that they are not reused unseen."""

    def __init__(self, device: str):
        self.device, self.base = device, None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _kib("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = None if self.base is None else max(0, _kib("VmHWM") - self.base) * 1024


class Row:
    def __init__(self, name, label):
        self.name, self.label, self.error = name, label, None
        self.compiled = False
        self.sparsify_s = self.compile_s = self.ppl = self.ckpt = self.mem = self.graphs = None
        self.times = {k: [] for k in SPEED}

    def median(self, kind):
        return statistics.median(self.times[kind]) if self.times[kind] else None


def prepare(base, name, spec, args, setup, device) -> tuple[Row, object]:
    """The row's model: sparsified, checkpoint saved (and measured), perplexity, packed, compiled."""
    label, recipe_fn, pack = spec
    row = Row(name, label)
    try:
        model = copy.deepcopy(base)
        recipe = recipe_fn()
        report_ = None
        if recipe is not None:
            t0 = time.perf_counter()
            report_ = sparsecc.sparsify_(model, recipe, setup["batches"], progress=False)
            row.sparsify_s = time.perf_counter() - t0
        # the dense checkpoint (and perplexity) are the same for the compiled rows: measured once
        if not name.startswith("dense-"):
            row.ckpt = checkpoint_bytes(model, report_, compress=True)
            if setup["test_ids"] is not None:
                row.ppl = perplexity(model, setup["test_ids"], setup["seqlen"], max_windows=args.eval_windows)
        if pack:  # after saving: checkpoints hold nn.Linear weights
            t0 = time.perf_counter()
            pruned = [r["param"] for r in report_.rows if r.get("param")]
            # magnitude 90% leaves floor(0.9 n) zeros, a hair under pack_'s default min_sparsity=0.9
            forms = sparsecc.pack_(model, pack, **({"min_sparsity": 0.89} if pack == "csr" else {}))
            if len(forms) != len(pruned):
                raise RuntimeError(f"pack_ packed {len(forms)} of the {len(pruned)} pruned linears")
            row.sparsify_s += time.perf_counter() - t0
        if name.startswith("dense-") or (name != "dense" and args.compile == "all"):
            # in place: generate's self(...) calls go through the compiled module (torch.compile(model) returns a
            # wrapper whose .generate would run the eager model)
            model.compile(backend="inductor" if name == "dense-inductor" else "sparsecc")
            row.compiled = True
        return row, model
    except Exception as e:  # a row that fails (an API still being built, say) is reported, not fatal
        row.error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        return row, None


def calls(model, setup, new: int):
    """The three timed calls: prefill (one forward with use_cache=True, as generate's first step),
    and greedy generate at batch 1 and 8 with exactly `new` new tokens."""
    def prefill():
        model(setup["prefill_ids"], use_cache=True)

    def gen(ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=setup["pad"])
        assert out.shape[1] == ids.shape[1] + new, out.shape
    return {"prefill": prefill, "decode1": lambda: gen(setup["prompts"][:1]), "decode8": lambda: gen(setup["prompts"])}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(rows_models, setup, args, device) -> None:
    """Compile the compiled rows (their first calls), then `reps` interleaved timed rounds, the first also
    reading each row's peak memory."""
    from torch._dynamo.utils import counters
    fns = {row.name: calls(m, setup, args.new_tokens) for row, m in rows_models if m is not None}
    for row, _ in rows_models:
        if row.name in fns and row.compiled:
            graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    for fn in fns[row.name].values():
                        fn()
                sync(device)
            except Exception as e:
                row.error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                del fns[row.name]
                continue
            row.compile_s = time.perf_counter() - t0
            row.graphs = counters["stats"]["unique_graphs"] - graphs
    by_name = {row.name: row for row, _ in rows_models}
    models = {row.name: m for row, m in rows_models}
    with torch.no_grad():
        for rnd in range(args.reps):
            for name, kinds in list(fns.items()):
                row = by_name[name]
                try:
                    with PeakMemory(device) as mem:  # round 1 also reads the peak memory of the three calls
                        for kind, fn in kinds.items():
                            sync(device)
                            t0 = time.perf_counter()
                            fn()
                            sync(device)
                            row.times[kind].append(time.perf_counter() - t0)
                except Exception as e:
                    row.error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                    del fns[name]
                    continue
                if rnd == 0 and mem.peak is not None:
                    row.mem = tensor_bytes(models[name]) + mem.peak


def table(title: str, rows: list[Row], setup, args) -> str:
    tokens = {"prefill": setup["prefill_ids"].numel(), "decode1": args.new_tokens, "decode8": 8 * args.new_tokens}
    rate = {r.name: {k: tokens[k] / r.median(k) for k in SPEED if r.median(k)} for r in rows}
    base = rate.get("dense", {})
    dense_ckpt = next((r.ckpt for r in rows if r.name == "dense"), None)
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    ratio = lambda v, b: "-" if v is None or not b else f"{v / b:.2f}x"  # noqa: E731
    lines = [f"**{title}**", "",
             "| technique | run | prepare s | compile s (graphs) | prefill tok/s | vs dense | decode b1 tok/s | vs dense "
             "| decode b8 tok/s | vs dense | peak MB | checkpoint MB | vs dense | perplexity |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense_row = next((r for r in rows if r.name == "dense"), None)
    for r in rows:
        run = "compiled" if r.compiled else "eager"
        if r.error:
            lines.append(f"| {r.label} | {run} | error: {r.error.replace('|', '/')} |" + " |" * 11)
            continue
        ckpt, ppl = (dense_row.ckpt, dense_row.ppl) if r.name.startswith("dense-") and dense_row else (r.ckpt, r.ppl)
        cells = [r.label, run, f(r.sparsify_s, ".1f"),
                 "-" if r.compile_s is None else f"{r.compile_s:.0f} ({r.graphs})"]
        for k in SPEED:
            v = rate[r.name].get(k)
            cells += [f(v, ".1f" if v is not None and v < 100 else ".0f"), ratio(v, base.get(k))]
        cells += [f(r.mem and r.mem / 2**20, ".0f"), f(ckpt and ckpt / 2**20, ".1f"), ratio(ckpt, dense_ckpt),
                  f(ppl, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_setup(which: str, args, device, dtype) -> tuple[object, dict, int, str]:
    """(base model, setup: batches, test ids, prompts ..., layers to drop, description)."""
    g = torch.Generator().manual_seed(args.seed)
    if which == "ref":
        from sparsecc.zoo import load_model, load_tokens
        name = "tiny" if args.quick else "ref"
        model, _, info = load_model(name)
        tokens = load_tokens()
        ctx = model.config.max_position_embeddings
        batches = sparsecc.sample_batches(tokens.train, args.nsamples, ctx, seed=args.seed, batch_size=8,
                                          source={"corpus": tokens.source})
        test = tokens.test
        prompts = test[:8 * args.prompt].view(8, args.prompt)  # eight consecutive stretches of test text
        prefill = test[None, : min(args.prefill, ctx)]
        drop = max(1, model.config.num_hidden_layers // 2)
        desc = (f"`{name}` zoo model ({info['params'] / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, "
                f"context {ctx}), calibrated on {args.nsamples} windows of {ctx} tokens of its training text")
        setup = dict(test_ids=test, seqlen=ctx)
    else:
        model = random_llama(args.quick, args.layers, args.seed)
        c, v = model.config, model.config.vocab_size
        seqlen, n = (64 if args.quick else 256), 8  # speed only: the fewest windows that fill a batch
        stream = torch.randint(0, v, (n * seqlen * 4,), generator=g)
        batches = sparsecc.sample_batches(stream, n, seqlen, seed=args.seed, batch_size=8,
                                          source={"corpus": "random tokens"})
        prompts = torch.randint(0, v, (8, args.prompt), generator=g)
        prefill = torch.randint(0, v, (1, args.prefill), generator=g)
        drop = max(1, c.num_hidden_layers // 4)
        params = sum(p.numel() for p in model.parameters())
        desc = (f"random Llama ({params / 1e6:.0f}M parameters: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"intermediate {c.intermediate_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads of "
                f"{c.head_dim}, vocabulary {v}, tied), calibrated on {n} random-token windows of {seqlen}; "
                "no perplexity (untrained)")
        setup = dict(test_ids=None, seqlen=seqlen)
    model = model.to(device, dtype).eval()
    setup.update(batches=batches, prompts=prompts.to(device), prefill_ids=prefill.to(device),
                 pad=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id)
    if device != "cpu":
        setup["batches"] = sparsecc.CalibrationSet([b.to(device) for b in batches], batches.setup)
    return model, setup, drop, desc


def plot(results: dict, path: Path) -> str:
    """Decode speed-up (batch 1) vs perplexity for the ref model; decode speed-up vs checkpoint size
    for the random one. Returns what was done."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (which, (rows, _)) in zip(axes[0], results.items()):
        dense = next((r for r in rows if r.name == "dense" and r.median("decode1")), None)
        if dense is None:
            continue
        for r in rows:
            if r.error or not r.median("decode1"):
                continue
            speed = dense.median("decode1") / r.median("decode1")
            ckpt = (dense.ckpt if r.name.startswith("dense-") else r.ckpt) / dense.ckpt
            ppl = dense.ppl if r.name.startswith("dense-") else r.ppl
            xy = (speed, ppl) if which == "ref" else (ckpt, speed)
            if None in xy:
                continue
            ax.scatter(*xy, color="tab:red" if r.name.startswith("dense") else "tab:blue")
            ax.annotate(r.label + (" (compiled)" if r.compiled else ""), xy, fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if which == "ref":
            ax.set(xlabel="decode speed-up vs dense eager (batch 1)", ylabel="WikiText-2 test perplexity",
                   title="ref model: speed vs quality")
        else:
            ax.set(xlabel="checkpoint bytes vs dense", ylabel="decode speed-up vs dense eager (batch 1)",
                   title="random Llama: speed vs checkpoint size")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage first
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _names(allowed):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in allowed:
                near = difflib.get_close_matches(n, allowed, n=1)
                raise argparse.ArgumentTypeError(f"no row or model {n!r}{f'; did you mean {near[0]!r}?' if near else ''} "
                                                 f"(choose from {','.join(allowed)})")
        if not names:
            raise argparse.ArgumentTypeError("give at least one name")
        return names
    return parse


def main(argv=None) -> int:
    p = _Parser(prog="e2e.py", description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.set_defaults(reps=None)
    p.add_argument("--quick", action="store_true", help="the tiny zoo model and a small random Llama (about a minute)")
    p.add_argument("--rows", type=_names(ROWS), default=DEFAULT_ROWS,
                   help=f"comma-separated, of {','.join(ROWS)} (default: all but dense-inductor)")
    p.add_argument("--models", type=_names(MODELS), default=list(MODELS), help="ref,random (default both)")
    p.add_argument("--compile", default="dense", choices=["dense", "all"],
                   help="compile only the dense-compiled row (default) or every sparsified row too")
    p.add_argument("--layers", type=at_least(1), default=2, help="layers of the random Llama (default 2)")
    p.add_argument("--prefill", type=at_least(2), default=None, help="prefill tokens (default 512; ref: its context)")
    p.add_argument("--prompt", type=at_least(1), default=16, help="prompt tokens for generate (default 16)")
    p.add_argument("--new-tokens", type=at_least(2), default=None, help="tokens generate makes (default 16)")
    p.add_argument("--nsamples", type=at_least(1), default=None, help="calibration windows of the ref model (default 16; quick 8; the random one: 8)")
    p.add_argument("--eval-windows", type=at_least(1), default=None, help="test windows for perplexity (default 256)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    q = args.quick
    args.reps = args.reps or (2 if q else 3)
    args.prefill = args.prefill or (128 if q else 512)
    args.new_tokens = args.new_tokens or (8 if q else 16)
    args.nsamples = args.nsamples or (8 if q else 16)
    args.eval_windows = args.eval_windows or (16 if q else 256)
    device, dtype = device_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # several compiled rows share the model's code objects
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    results, texts = {}, []
    for which in args.models:
        base, setup, drop, desc = model_setup(which, args, device, dtype)
        specs = row_specs(base, drop)
        print(f"\n{which}: {desc}", flush=True)
        rows_models = []
        for name in args.rows:
            row, model = prepare(base, name, specs[name], args, setup, device)
            rows_models.append((row, model))
            print(f"  prepared {name}: " + (f"error: {row.error}" if row.error else "the dense model, compiled on first call"
                  if name.startswith("dense-") else f"prepare {row.sparsify_s or 0:.1f} s, checkpoint "
                  f"{(row.ckpt or 0) / 2**20:.1f} MB" + (f", perplexity {row.ppl:.2f}" if row.ppl else "")), flush=True)
        measure(rows_models, setup, args, device)
        rows = [r for r, _ in rows_models]
        results[which] = (rows, setup)
        texts.append(table(desc[0].upper() + desc[1:], rows, setup, args))
        print("\n" + texts[-1], flush=True)
        del rows_models, base
        gc.collect()
    total = time.perf_counter() - t_start

    compiled = "every row" if args.compile == "all" else "the dense rows only (on CPU the sparsecc ops run the " \
        "same code eager or compiled, and each compile costs minutes here; `--compile all` compiles every row)"
    intro = (
        "Per row: `sparsify_` with the recipe (data rows: calibration batches of 8 windows), `save_pruned` with "
        "`compress=True` (pruned weights as kept values + bitmask or N:M positions, quantized ones as packed codes + "
        "scales; the dense model: `save_pretrained`), perplexity, then `pack_` where named (CSR with "
        "`min_sparsity=0.89`: magnitude 90% leaves floor(0.9 n) zeros, just under pack_'s default 0.9), then "
        f"`model.compile(backend=\"sparsecc\")` for {compiled}; in place, so that `generate` runs the compiled "
        "module. The dense compiled row has nothing sparse: sparsecc's backend lowers it through Inductor. Heads: 25% "
        "of the query heads of every key/value group, or whole groups where a group has fewer than 4 heads. "
        "**prepare s**: sparsify_ + pack_. **compile s**: the first call of each timed run, compilation included, "
        "and the graphs dynamo made; compiled rows go in the order listed and share Inductor's caches, so a later "
        f"row compiles faster. **prefill**: one forward of 1 x {args.prefill} tokens (the ref model: its "
        "context) with `use_cache=True`, as generate's first step. **decode b1 / b8**: one whole greedy `generate` "
        f"call, a prompt of {args.prompt} tokens per sequence (its prefill included) and exactly {args.new_tokens} "
        "new tokens per sequence (`min_new_tokens` = `max_new_tokens`), KV cache on: new tokens / seconds. **vs "
        "dense**: the rate (or the checkpoint's bytes) over the dense eager row's. Medians of "
        f"{args.reps} rounds, the rows alternating within each round. **peak MB**: the bytes of the model's "
        "parameters and buffers plus the peak memory its three timed calls add in the first round "
        + ("(`torch.cuda.max_memory_allocated` minus what was allocated before)"
           if device == "cuda" else "(peak resident set, VmHWM reset through /proc/self/clear_refs, minus the "
                                    "resident set before, freed heap first returned with malloc_trim)")
        + ". **checkpoint MB**: all files of the saved folder. **perplexity**: WikiText-2 test, the first "
        f"{args.eval_windows} windows of the context length, eager (compiling does not change the weights). "
        f"Whole run {total / 60:.1f} min; 1-minute load average {load:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores (above {os.cpu_count()}: other jobs "
        "shared the cores and the rates are low and noisy; the ratios are the figures to read)."
        + (f" torch ran {args.threads} thread(s) (`--threads`): with 2 threads while another job kept a core busy, "
           "OpenMP's threads waited on each other and one ref-model prefill took 1.0 s instead of 35 ms with 1 "
           "thread (measured once on this machine)." if args.threads else ""))
    text = "\n\n".join(texts)
    section = "e2e" + ("-cuda" if device == "cuda" else "")
    flags = [("--quick", q), ("--device cuda", device == "cuda"), (f"--threads {args.threads}", args.threads),
             (f"--rows {','.join(args.rows)}", args.rows != DEFAULT_ROWS),
             (f"--models {','.join(args.models)}", args.models != list(MODELS)), ("--compile all", args.compile == "all")]
    command = " ".join(["python benchmarks/e2e.py", *(f for f, on in flags if on), "--write-results"])
    report(section, f"End to end: the user's path on {device_name(device)}", intro, text, command,
           args.write_results, f", {device_name(device)}" if device == "cuda" else "", shown=len(text.splitlines()))
    if args.write_results:
        print(plot(results, RESULTS.parent / f"{section}.png"))
    print(f"total {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

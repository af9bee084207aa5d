"""Streaming past the trained context (seed 001, StreamingLLM): perplexity per position bucket for
dense attention, a window alone, and sinks + window; the sink/position ablation; the KV cache
held while streaming token by token; recompilations of the compiled model as the stream grows.

    python benchmarks/streaming.py [--model ref|tiny] [--factor 8] [--streams 4] [--write-results]

Streams are consecutive stretches of `factor` x context tokens of the WikiText-2 test split. The
cache size is the trained context (sinks + window = context), as StreamingLLM sizes it. The
perplexities come from one masked forward per stream, which equals streaming the tokens one by
one through the rolling cache (tests/techniques/test_attention.py); the token-by-token run below
checks that again on the first stream and measures the cache.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import sparsecc

try:
    from results import machine, quality_setup, write_section
except ImportError:  # run as a module
    from benchmarks.results import machine, quality_setup, write_section

# Vicuna-13B, public measurement quoted by issue 4 (positions within the cache vs not)
PUBLIC = {"4 sinks, positions in cache": 7.36, "no sinks (window)": 8.90, "1 sink, absolute positions": 29.67}


def rewritten(model, config):
    m = copy.deepcopy(model)
    if config is not None:
        sparsecc.sparsify_(m, {"re:.*self_attn": config}, progress=False)
    return m.eval()


@torch.no_grad()
def token_nll(model, streams: torch.Tensor) -> torch.Tensor:
    """[streams, length - 1] next-token NLL from one forward per stream."""
    out = []
    for ids in streams:
        logits = model(ids[None], use_cache=False).logits[0, :-1].float()
        out.append(F.cross_entropy(logits, ids[1:], reduction="none"))
    return torch.stack(out)


@torch.no_grad()
def stream_one(model, ids: torch.Tensor, compiled: bool = False):
    """Token-by-token run through the model's cache: NLL, cache lengths at checkpoints, graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(model, backend="sparsecc") if compiled else model
    cache, nll, lengths, graphs = DynamicCache(), [], {}, {}
    by = sparsecc.cache_kwargs(cache, model)  # {keyword: cache}, the same cache object every step
    n = ids.numel()
    marks = {n // 8, n // 2, n - 1}
    for t in range(n - 1):
        if t == n // 2:  # time the second half: the cache is full and compilation done
            t0 = time.perf_counter()
        logits = run(ids[None, t:t + 1], **by, use_cache=True).logits[0, -1].float()
        nll.append(F.cross_entropy(logits[None], ids[t + 1:t + 2]))
        if t + 1 in marks or t == n - 2:
            lengths[t + 1] = max(sparsecc.kv_cache_lengths(cache))
            graphs[t + 1] = counters["stats"]["unique_graphs"]
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return torch.stack(nll), lengths, graphs, kv_bytes, (time.perf_counter() - t0) / (n - 1 - n // 2)


@torch.no_grad()
def first_token_share(model, ids: torch.Tensor) -> tuple[list[float], float]:
    """Per layer, the mean attention probability that queries 32.. put on token 0 (dense model,
    eager attention), and what uniform attention over the causal prefix would put there."""
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    attentions = m(ids[None], output_attentions=True).attentions
    uniform = float((1.0 / torch.arange(33, ids.numel() + 1, dtype=torch.float64)).mean())
    return [float(a[0, :, 32:, 0].mean()) for a in attentions], uniform


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ref", choices=["ref", "tiny"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--factor", type=int, default=8, help="stream length in trained contexts")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled streaming run")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)

    model, corpus, ctx, _, test_ids = quality_setup(args.model, args.data_dir, 1, 0)
    length = args.factor * ctx
    if test_ids.numel() < length * args.streams:
        raise SystemExit(f"the test split has {test_ids.numel()} tokens, fewer than {args.streams} x {length}")
    streams = test_ids[: length * args.streams].reshape(args.streams, length)
    s, w = args.sinks, ctx - args.sinks
    settings = {
        f"dense (grows to {length})": None,
        f"window {ctx}": sparsecc.SlidingWindowConfig(window=ctx),
        f"{s} sinks + window {w}": sparsecc.AttentionSinkConfig(sinks=s, window=w),
    }
    ablation = {
        f"{s} sinks, positions in cache": sparsecc.AttentionSinkConfig(sinks=s, window=w),
        f"{s} sinks, absolute positions": sparsecc.AttentionSinkConfig(sinks=s, window=w, shift_positions=False),
        "1 sink, positions in cache": sparsecc.AttentionSinkConfig(sinks=1, window=ctx - 1),
        "1 sink, absolute positions": sparsecc.AttentionSinkConfig(sinks=1, window=ctx - 1, shift_positions=False),
        "no sinks (window)": sparsecc.SlidingWindowConfig(window=ctx),
    }
    buckets = [(i * ctx, (i + 1) * ctx) for i in range(args.factor)]
    head = "| attention | " + " | ".join(f"{a}-{b}" for a, b in buckets) + " |"
    lines = ["Perplexity per position bucket (tokens), mean over streams:", "", head,
             "|" + " --- |" + " ---: |" * len(buckets)]
    nlls = {}
    for name, cfg in settings.items():
        nll = token_nll(rewritten(model, cfg), streams)
        nlls[name] = nll
        cells = [math.exp(float(nll[:, max(a - 1, 0):b - 1].mean())) for a, b in buckets]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        print(lines[-1], flush=True)

    abl = ["", f"Ablation (perplexity on positions {ctx}-{length}, after the first eviction; cache {ctx}):", "",
           "| setting | perplexity | public: Vicuna-13B |", "| --- | ---: | ---: |"]
    for name, cfg in ablation.items():
        nll = token_nll(rewritten(model, cfg), streams)[:, ctx - 1:]
        pub = next((f"{v:.2f}" for k, v in PUBLIC.items() if name.endswith(k) or name == k), "-")
        abl.append(f"| {name} | {math.exp(float(nll.mean())):.2f} | {pub} |")
        print(abl[-1], flush=True)

    sink_model = rewritten(model, settings[f"{s} sinks + window {w}"])
    live = ["", f"Streaming stream 1 token by token through the model's own cache ({length} tokens):", "",
            "| run | max positions cached at " + " / ".join(str(t) for t in sorted({length // 8, length // 2, length - 1}))
            + " tokens | KV cache bytes at the end | distinct compiled graphs at those points | ms/token "
            "(second half) | perplexity vs masked forward |", "| --- | --- | ---: | --- | ---: | --- |"]
    runs = [("dense, eager", rewritten(model, None), False), (f"{s} sinks + window {w}, eager", sink_model, False)]
    if not args.no_compile:
        runs.append((f"{s} sinks + window {w}, torch.compile(backend='sparsecc')", sink_model, True))
    for name, m, compiled in runs:
        nll, lengths, graphs, kv_bytes, sec = stream_one(m, streams[0], compiled)
        ref = nlls[f"dense (grows to {length})" if name.startswith("dense") else f"{s} sinks + window {w}"][0]
        ppl, ref_ppl = math.exp(float(nll.mean())), math.exp(float(ref.mean()))
        live.append(f"| {name} | {' / '.join(str(v) for v in lengths.values())} | {kv_bytes:,} | "
                    f"{' / '.join(str(v) for v in graphs.values()) if compiled else '-'} | {1e3 * sec:.1f} | "
                    f"{ppl:.3f} vs {ref_ppl:.3f} |")
        print(live[-1], flush=True)

    shares, uniform = first_token_share(model, streams[0, :ctx])
    sink = ["", "Attention on the first token (dense model, queries 32.." + str(ctx - 1) + " of stream 1; StreamingLLM's "
            "attention sinks show as a share far above uniform): per layer " + ", ".join(f"{v:.3f}" for v in shares)
            + f"; uniform attention would give {uniform:.3f}."]
    print(sink[-1], flush=True)
    text = "\n".join(lines + abl + live + sink)
    if args.write_results:
        write_section("streaming", "\n".join([
            "## Streaming beyond the trained context (attention sinks, sliding window)", "",
            f"The `{args.model}` zoo model (trained on {ctx}-token windows); {args.streams} streams of {length} "
            f"consecutive WikiText-2 test tokens ({args.factor}x the context).", "", text, "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()}. Produced by "
            f"`python benchmarks/streaming.py --model {args.model} --write-results`."]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

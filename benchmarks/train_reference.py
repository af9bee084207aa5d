"""Train (or load from the cache) the zoo's reference model and report it.

    python benchmarks/train_reference.py [--variant ref [tiny ...]] [--data-dir D] [--cache-dir C]
                                         [--force] [--write-results]

Prints a markdown table (variant, parameters, context, training time, dense test perplexity,
corpus). With --write-results it replaces the "Reference model" section of
benchmarks/RESULTS.md, between its markers, and leaves the rest of the file alone.
"""
from __future__ import annotations

import argparse
import sys

from sparsecc.zoo import VARIANTS, load_model

try:
    from results import RESULTS, write_section
except ImportError:  # run as a module
    from benchmarks.results import RESULTS, write_section


def table(infos: list[dict]) -> str:
    rows = ["| variant | params | layers × hidden (heads / kv heads) | context | train steps × tokens | train time "
            "| final train loss | dense test perplexity | corpus (train → test) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for info in infos:
        s, c = info["spec"], info["corpus"]
        split = f"{c.get('train_split', 'train')} → {c.get('test_split', 'test')}"
        rows.append(f"| {info['variant']} | {info['params'] / 1e6:.2f}M | {s['num_layers']} × {s['hidden_size']} "
                    f"({s['num_heads']} / {s['num_kv_heads']}) | {s['context']} | {info['steps']} × "
                    f"{s['batch_size'] * s['context']} | {info['train_wall_s'] / 60:.1f} min | "
                    f"{info['final_train_loss']:.3f} | {info['test_ppl']:.2f} | {c['name']} ({split}, "
                    f"sha256 {c['train_sha256'][:8]} → {c['test_sha256'][:8]}) |")
    return "\n".join(rows)


def section(infos: list[dict]) -> str:
    first = infos[0]
    return "\n".join([
        "## Reference model", "",
        "Small Llama-architecture models (SwiGLU, RoPE, grouped-query attention, untied head, byte-level BPE "
        f"with {first['spec']['vocab_size']} tokens) trained from scratch by `sparsecc.zoo` with AdamW, fp32. "
        "WikiText-2's train split is not available offline, so they train on its validation split and are "
        "evaluated on its test split: non-overlapping windows of the context length, mean NLL over all "
        "predicted tokens, exp (`sparsecc.evaluate.perplexity`).", "",
        table(infos), "",
        f"Measured {first['date']} on a {first['machine']}, {first['threads']} torch threads, torch {first['torch']}, "
        f"transformers {first['transformers']}. Produced by `python benchmarks/train_reference.py "
        f"--variant {' '.join(i['variant'] for i in infos)} --write-results`.",
        ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", default=["ref"], choices=sorted(VARIANTS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--write-results", action="store_true", help=f"update the section in {RESULTS}")
    args = p.parse_args(argv)
    infos = [load_model(v, data_dir=args.data_dir, cache_dir=args.cache_dir, force=args.force)[2]
             for v in args.variant]
    print(table(infos))
    if args.write_results:
        write_section("reference-model", section(infos))
        print(f"\nupdated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

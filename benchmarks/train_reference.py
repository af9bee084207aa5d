"""Train (or load from the cache) the zoo's reference models, compare them with the shipped
copies, and ship them.

    python benchmarks/train_reference.py [--variant ref [tiny ...]] [--data-dir D] [--cache-dir C]
                                         [--force] [--ship] [--write-results]

Prints a markdown table (variant, parameters, context, training time, dense test perplexity,
corpus) and, per variant, how far the trained weights are from the copy shipped in
sparsecc/zoo/shipped. --ship replaces the shipped copies (and the shipped token streams) with
the trained ones; it needs WikiText-2. With --write-results it replaces the "Reference model"
section of benchmarks/RESULTS.md, between its markers, and leaves the rest of the file alone.
"""
from __future__ import annotations

import argparse
import sys

from sparsecc.zoo import VARIANTS, load_corpus, shipped_variants, train_model
from sparsecc.zoo.shipped import load_model as load_shipped
from sparsecc.zoo.shipped import ship

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
        "predicted tokens, exp (`sparsecc.tools.evaluate.perplexity`).", "",
        table(infos), "",
        f"Measured {first['date']} on a {first['machine']}, {first['threads']} torch threads, torch {first['torch']}, "
        f"transformers {first['transformers']}. Produced by `python benchmarks/train_reference.py "
        f"--variant {' '.join(i['variant'] for i in infos)} --ship --write-results`; these are the models "
        "shipped in `sparsecc/zoo/shipped/` with the two splits as token ids, which the demo, the tests and "
        "the benchmarks use.",
        ])


def distance_to_shipped(variant: str, model) -> str:
    """How far `model`'s weights are from the shipped copy of `variant` (max |difference|)."""
    if variant not in shipped_variants():
        return "not shipped"
    shipped = load_shipped(variant)[0].state_dict()
    diff = max((v - shipped[k]).abs().max().item() for k, v in model.state_dict().items())
    return "identical" if diff == 0 else f"max |Δw| = {diff:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", default=["ref"], choices=sorted(VARIANTS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--ship", action="store_true", help="replace the copies shipped in sparsecc/zoo/shipped")
    p.add_argument("--write-results", action="store_true", help=f"update the section in {RESULTS}")
    args = p.parse_args(argv)
    corpus = load_corpus(args.data_dir)
    if args.ship and corpus.source.get("name") != "wikitext-2":
        p.error("--ship needs WikiText-2 (../shared/data, --data-dir or $SPARSECC_DATA): the shipped models "
                "and token streams are WikiText-2's")
    trained = {v: train_model(v, data_dir=args.data_dir, cache_dir=args.cache_dir, force=args.force)
               for v in args.variant}
    infos = [info for _, _, info in trained.values()]
    print(table(infos))
    for v, (model, _, _) in trained.items():
        print(f"{v}: trained vs shipped: {distance_to_shipped(v, model)}")
    if args.ship:
        ship(trained, corpus)
        print(f"shipped {', '.join(trained)} and the token streams")
    if args.write_results:
        write_section("reference-model", section(infos))
        print(f"\nupdated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

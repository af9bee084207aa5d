"""The zoo's small Llama-architecture reference models: definition, training, cache.

`sparsecc.zoo.load_model(variant)` returns the copy trained on WikiText-2 that ships with the
package (shipped.py): nothing trains at run time. `train_model(variant)` trains one on the corpus (see
corpus.py) on first use and caches it under `<cache>/zoo/<variant>-<hash>/` (model safetensors,
tokenizer, info.json). The hash covers the variant's architecture and training hyperparameters,
the corpus hashes and the vocabulary size, so any change trains a fresh model.

    python -m sparsecc.zoo.train --variant ref [--data-dir D] [--cache-dir C] [--force]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..tools.evaluate import perplexity
from .corpus import Corpus, load_corpus
from .tokenizer import encode_text, train_tokenizer

ENV_CACHE = "SPARSECC_CACHE"
FORMAT_VERSION = 1  # bump when training code changes in a way the hyperparameters do not show


@dataclass(frozen=True)
class Variant:
    """Architecture (all linear input widths divisible by 64) and training recipe of one model."""
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: grouped-query attention
    context: int  # max_position_embeddings and training window length
    vocab_size: int = 2048
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def llama_config(self, eos_token_id: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           max_position_embeddings=self.context, hidden_act="silu", tie_word_embeddings=False,
                           bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None)


VARIANTS = {
    "tiny": Variant("tiny", hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
                    context=128, steps=400, batch_size=32, lr=3e-3, warmup_steps=30),
    # ref: 1500 steps (17 passes over the 354k training tokens) overfit to a test perplexity of 126;
    # a run holding out the last 10% of the training split bottomed out near step 500 (dev ppl 68 at
    # a still-high learning rate, 70 at step 600), so the cosine schedule ends there.
    "ref": Variant("ref", hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
                   context=256, steps=500, batch_size=16, lr=2e-3, warmup_steps=50),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir`, else `$SPARSECC_CACHE`, else ~/.cache/sparsecc."""
    root = cache_dir if cache_dir is not None else (os.environ.get(ENV_CACHE) or "~/.cache/sparsecc")
    return Path(root).expanduser()


def model_key(variant: Variant, corpus: Corpus) -> str:
    """Short hash naming one trained model: variant, hyperparameters, corpus, vocabulary size."""
    payload = {"format": FORMAT_VERSION, "variant": dataclasses.asdict(variant),
               "corpus": [corpus.source.get("train_sha256"), corpus.source.get("test_sha256")]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def train_model(variant: str | Variant = "tiny", data_dir=None, cache_dir=None, train_if_missing: bool = True,
                progress: bool = True, force: bool = False):
    """Return `(model, tokenizer, info)` for a zoo variant (a name or a `Variant`) trained on the
    corpus of `data_dir` (see `load_corpus`), training and caching it if needed.

    The model is in eval mode; `info` is the cached info.json plus `path`. Raises
    FileNotFoundError if it is not cached and `train_if_missing` is False. `force` retrains."""
    if isinstance(variant, str) and variant not in VARIANTS:
        raise ValueError(f"unknown zoo variant {variant!r}; choose one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant] if isinstance(variant, str) else variant
    variant = spec.name
    corpus = load_corpus(data_dir)
    path = cache_root(cache_dir) / "zoo" / f"{variant}-{model_key(spec, corpus)}"
    if (path / "info.json").is_file() and not force:
        return _load_cached(path)
    if not train_if_missing:
        raise FileNotFoundError(f"zoo model {variant!r} is not cached at {path}; train it with "
                                f"`python -m sparsecc.zoo.train --variant {variant}` (same --data-dir/--cache-dir)")
    model, tokenizer, info = train_variant(spec, corpus, progress=progress)
    info = json.loads(json.dumps(info, default=str))  # exactly what info.json will hold
    _save(path, model, tokenizer, info, overwrite=force)
    return model, tokenizer, {**info, "path": str(path)}


def train_variant(spec: Variant, corpus: Corpus, progress: bool = True):
    """Train tokenizer and model for `spec` on `corpus`; evaluate dense test perplexity.

    Returns `(model, tokenizer, info)` with the model in eval mode. Nothing is saved."""
    tokenizer = train_tokenizer(corpus.train_text, spec.vocab_size)
    tokenizer.model_max_length = spec.context
    train_ids = encode_text(tokenizer, corpus.train_text)
    test_ids = encode_text(tokenizer, corpus.test_text)

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(spec.llama_config(tokenizer.eos_token_id))
    t0 = time.perf_counter()
    losses = _train_loop(model, train_ids, spec, progress)
    train_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    test_ppl = perplexity(model, test_ids, spec.context, progress=progress)
    info = {"variant": spec.name, "spec": dataclasses.asdict(spec), "config": model.config.to_dict(),
            "params": sum(p.numel() for p in model.parameters()),
            "corpus": corpus.source, "train_tokens": train_ids.numel(), "test_tokens": test_ids.numel(),
            "steps": spec.steps, "tokens_seen": spec.steps * spec.batch_size * spec.context,
            "train_wall_s": round(train_s, 1), "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "test_ppl": test_ppl, "test_eval_s": round(time.perf_counter() - t0, 1),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})"}
    return model, tokenizer, info


def _lr_factor(step: int, spec: Variant) -> float:
    """Linear warmup, then cosine decay from 1 to `min_lr_ratio`."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _train_loop(model, train_ids: torch.Tensor, spec: Variant, progress: bool) -> list[float]:
    """AdamW on random `context`-token windows of the train stream; returns the per-step losses."""
    if train_ids.numel() <= spec.context:
        raise ValueError(f"train text too short: {train_ids.numel()} tokens for windows of {spec.context}")
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    gen = torch.Generator().manual_seed(spec.seed)
    offsets = torch.arange(spec.context)
    steps = range(spec.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"training {spec.name}", unit="step")
    model.train()
    losses = []
    for step in steps:
        starts = torch.randint(0, train_ids.numel() - spec.context + 1, (spec.batch_size, 1), generator=gen)
        batch = train_ids[starts + offsets]
        logits = model(batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and step % 10 == 0:
            steps.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def _load_cached(path: Path):
    info = json.loads((path / "info.json").read_text())
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, {**info, "path": str(path)}


def _save(path: Path, model, tokenizer, info: dict, overwrite: bool = False) -> None:
    """Write model, tokenizer and info.json to a temp folder beside `path`, then move it in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():
            if (path / "info.json").is_file() and not overwrite:
                return  # a concurrent run finished first: keep its copy
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)  # a forced retrain, or a folder left incomplete by hand
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "info.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecc.zoo.train",
                                description="Train (or load from the cache) a sparsecc zoo model and print its info. "
                                "The package ships both variants trained on WikiText-2; this reproduces them or "
                                "trains on other text.")
    p.add_argument("--variant", default="tiny", choices=sorted(VARIANTS))
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2/ (default: $SPARSECC_DATA, "
                   "../shared/data, else Python's own stdlib sources)")
    p.add_argument("--cache-dir", default=None, help="default: $SPARSECC_CACHE, else ~/.cache/sparsecc")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    _, _, info = train_model(args.variant, data_dir=args.data_dir, cache_dir=args.cache_dir,
                             progress=not args.quiet, force=args.force)
    info = {k: v for k, v in info.items() if k != "config"}  # the full HF config is in config.json
    print(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

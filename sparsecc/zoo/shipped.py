"""The trained zoo models and the text they are measured on, shipped inside the package.

Nothing trains or downloads at run time: `sparsecc demo`, the quality tests and the benchmarks
use these files on every machine, with or without WikiText-2 beside the checkout.

    zoo/shipped/<variant>/           config.json, model.safetensors (fp32), tokenizer files, info.json
                                     (training setup, corpus hashes, dense test perplexity)
    zoo/shipped/wikitext-2.safetensors
                                     WikiText-2's validation split (trained and calibrated on) and
                                     test split (reported on), encoded with the zoo tokenizer (int16);
                                     metadata: the source files' and the tokenizer's sha256

`python benchmarks/train_reference.py --variant tiny ref --ship` trains them with
`sparsecc.zoo.train` on `../shared/data` and writes them here. WikiText-2 is CC BY-SA 3.0
(Merity et al., 2016); the token streams decode back to its text exactly (byte-level BPE).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
TOKENS_NAME = "wikitext-2.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenStreams:
    """The shipped corpus as token ids: `train` (calibration/training split), `test` (held out)."""
    train: torch.Tensor = field(repr=False)
    test: torch.Tensor = field(repr=False)
    source: dict = field(default_factory=dict)


def shipped_variants(root: Path = SHIPPED_DIR) -> list[str]:
    """Names of the variants whose trained copy ships in `root`."""
    return sorted(p.name for p in root.iterdir() if (p / "info.json").is_file()) if root.is_dir() else []


def tokenizer_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / TOKENIZER_FILE).read_bytes()).hexdigest()


def load_model(variant: str = "tiny", root: Path = SHIPPED_DIR):
    """`(model, tokenizer, info)` of the shipped, trained `variant`: the model in eval mode, fp32;
    `info` its info.json (training setup, corpus hashes, dense test perplexity) plus `path`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ..io.checkpoint import quiet_loading

    path = root / variant
    if not (path / "info.json").is_file():
        raise ValueError(f"unknown zoo variant {variant!r}; the package ships {shipped_variants(root)} "
                         "(sparsecc.zoo.train_model trains others)")
    info = json.loads((path / "info.json").read_text())
    with quiet_loading():  # a few MB from the package: no "Loading weights" bar
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, {**info, "path": str(path)}


def load_tokens(root: Path = SHIPPED_DIR) -> TokenStreams:
    """The shipped WikiText-2 splits, encoded with the zoo tokenizer, as 1-D LongTensors."""
    from safetensors import safe_open

    path = root / TOKENS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall sparsecc, or rebuild it with "
                                "`python benchmarks/train_reference.py --ship`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        train, test = f.get_tensor("train").long(), f.get_tensor("test").long()
    return TokenStreams(train, test, json.loads(meta["source"]))


def ship(models: dict, corpus, root: Path = SHIPPED_DIR) -> None:
    """Write `{variant: (model, tokenizer, info)}` and `corpus` (train/test text) encoded with
    their tokenizer into `root`, replacing what is there. All variants must share one tokenizer."""
    from safetensors.torch import save_file

    from .tokenizer import encode_text

    source = {k: v for k, v in corpus.source.items() if not k.endswith("_file")}  # no paths of this machine
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=root))
    try:
        for variant, (model, tokenizer, info) in models.items():
            model.save_pretrained(tmp / variant)
            tokenizer.save_pretrained(tmp / variant)
            info = {**{k: v for k, v in info.items() if k != "path"}, "corpus": source}
            (tmp / variant / "info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        hashes = {tokenizer_sha256(tmp / v) for v in models}
        if len(hashes) != 1:
            raise ValueError(f"the variants {sorted(models)} were trained with different tokenizers; "
                             "ship variants trained on one corpus with one vocabulary size")
        tokenizer = next(iter(models.values()))[1]
        train, test = encode_text(tokenizer, corpus.train_text), encode_text(tokenizer, corpus.test_text)
        if max(int(train.max()), int(test.max())) >= 2 ** 15:
            raise ValueError("the shipped streams are int16: ship variants with a vocabulary under 32768 tokens")
        meta = {**source, "tokenizer_sha256": hashes.pop(), "train_tokens": train.numel(), "test_tokens": test.numel()}
        save_file({"train": train.to(torch.int16), "test": test.to(torch.int16)}, str(tmp / TOKENS_NAME),
                  metadata={"source": json.dumps(meta, sort_keys=True)})
        for name in [*models, TOKENS_NAME]:  # replace entry by entry; other variants stay
            dest = root / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

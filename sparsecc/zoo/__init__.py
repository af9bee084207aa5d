"""The project's own small reference language models, the text they are trained on, and their
tokenizer. Nothing is downloaded: see corpus.py for where the text comes from.

    model, tokenizer, info = sparsecc.zoo.load_model("tiny")   # shipped, trained on WikiText-2
    tokens = sparsecc.zoo.load_tokens()                          # its train/test splits as token ids
    model, tokenizer, info = sparsecc.zoo.train_model("tiny", data_dir="my-data")  # train on other text
"""
from .corpus import Corpus, corpus_sha256, load_corpus
from .shipped import TokenStreams, load_model, load_tokens, shipped_variants
from .tokenizer import encode_text, train_tokenizer

_TRAIN_NAMES = ("VARIANTS", "Variant", "cache_root", "model_key", "train_model", "train_variant")


def __getattr__(name):
    # train.py is imported on first use, so `python -m sparsecc.zoo.train` runs it fresh
    if name in _TRAIN_NAMES:
        from . import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Corpus", "TokenStreams", "corpus_sha256", "encode_text", "load_corpus", "load_model", "load_tokens", "shipped_variants",
           "train_tokenizer", *_TRAIN_NAMES]

"""The project's own small reference language models, the text they are trained on, and their
tokenizer. Nothing is downloaded: see corpus.py for where the text comes from.

    model, tokenizer, info = sparsecc.zoo.load_model("tiny")   # trains once, then cached
    corpus = sparsecc.zoo.load_corpus()
    test_ids = sparsecc.zoo.encode_text(tokenizer, corpus.test_text)
"""
from .corpus import Corpus, corpus_sha256, load_corpus
from .tokenizer import encode_text, train_tokenizer

_TRAIN_NAMES = ("VARIANTS", "Variant", "cache_root", "load_model", "model_key", "train_variant")


def __getattr__(name):
    # train.py is imported on first use, so `python -m sparsecc.zoo.train` runs it fresh
    if name in _TRAIN_NAMES:
        from . import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Corpus", "corpus_sha256", "encode_text", "load_corpus", "train_tokenizer", *_TRAIN_NAMES]

"""A byte-level BPE tokenizer trained on the corpus, wrapped for transformers.

Byte-level means every string round-trips exactly and nothing is ever unknown. The result is a
`transformers.PreTrainedTokenizerFast`, so `save_pretrained(dir)` puts it next to the model and
`AutoTokenizer.from_pretrained(dir)` loads it back offline.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 2048
_ENCODE_CHUNK_LINES = 256  # lines per chunk handed to the (parallel) batch encoder


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (eos included) on `text`. Deterministic."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + eos), got {vocab_size}")
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Encode `text` into one 1-D LongTensor token stream (no special tokens added).

    The text is cut at line ends into chunks encoded in parallel; decoding the stream gives
    back `text` exactly."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a transformers wrapper or a raw Tokenizer
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + _ENCODE_CHUNK_LINES]) for i in range(0, len(lines), _ENCODE_CHUNK_LINES)]
    ids = [i for enc in backend.encode_batch(chunks, add_special_tokens=False) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)

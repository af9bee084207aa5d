"""Calibration batches: sampling them from a token stream, validating them against a model,
and the record of how they were made (corpus, hash, seed, count, length) that every report
and plan carries, since most reproduction complaints trace back to exactly these.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CalibrationError


class CalibrationSet(list):
    """A list of batches plus `setup`: how they were produced."""

    def __init__(self, batches, setup: dict | None = None):
        super().__init__(batches)
        self.setup = dict(setup or {})


def sample_batches(tokens: torch.Tensor, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                   batch_size: int = 1, source: dict | None = None) -> CalibrationSet:
    """Random windows of `seqlen` tokens from a 1-D stream (the SparseGPT/Wanda setup:
    128 segments of 2048 tokens from the training text), grouped into batches."""
    if tokens.dim() != 1 or tokens.dtype not in (torch.int32, torch.int64):
        raise CalibrationError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
    if nsamples < 1 or batch_size < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples, seqlen and batch_size must be at least 1, got {nsamples}, {seqlen} and "
                               f"{batch_size} (seqlen: the model's context, e.g. 2048)")
    if tokens.numel() <= seqlen:
        raise CalibrationError(f"calibration text too short: {tokens.numel()} tokens, need more than one "
                               f"window of {seqlen}; give more text or a smaller seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    windows = torch.stack([tokens[s:s + seqlen] for s in starts.tolist()]).long()
    batches = list(windows.split(batch_size))
    setup = {"seed": seed, "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size,
             "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    setup.update(source or {})
    return CalibrationSet(batches, setup)


def _main_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if "input_ids" in batch:
        return batch["input_ids"]
    return next(v for v in batch.values() if isinstance(v, torch.Tensor))


def token_mask(batch) -> torch.Tensor | None:
    """[B, T] bool of real (non-padding) tokens, when the batch carries an attention_mask."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        m = batch["attention_mask"]
        if m.dim() == 2:
            return m.bool()
    return None


def validate_batches(model: nn.Module, batches) -> list:
    """Check batches against the model; return them as a list. Raises CalibrationError naming the fix."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise CalibrationError("batches must be a list of batches; wrap a single batch as [batch] "
                               "(or split a [N, T] tensor with list(t.split(1)))")
    try:
        batches = list(batches)
    except TypeError:
        raise CalibrationError(f"batches must be a list of token tensors or of dicts of model inputs, "
                               f"got {type(batches).__name__}") from None
    if not batches:
        raise CalibrationError("no calibration batches: pass at least one (e.g. sparsecc.sample_batches(tokens, 128, 2048))")
    param = next((p for p in model.parameters() if not p.is_meta), None)  # meta: a block not loaded yet (onloading)
    device = param.device if param is not None else torch.device("cpu")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else None
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, b in enumerate(batches):
        if not isinstance(b, (torch.Tensor, Mapping)):
            raise CalibrationError(f"calibration batch {i} is a {type(b).__name__}; use a tensor or a dict of tensors")
        if isinstance(b, Mapping) and not any(isinstance(v, torch.Tensor) for v in b.values()):
            raise CalibrationError(f"calibration batch {i} holds no tensor")
        tensors = [b] if isinstance(b, torch.Tensor) else [v for v in b.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.device != device:
                raise CalibrationError(f"calibration batch {i} is on {t.device} but the model is on {device}; "
                                       f"move it with batch.to({str(device)!r})")
        x = _main_tensor(b)
        if x.numel() == 0:
            raise CalibrationError(f"calibration batch {i} is empty (shape {tuple(x.shape)})")
        if vocab is not None:
            if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
                raise CalibrationError(f"calibration batch {i} has dtype {x.dtype}, but this model takes token ids: "
                                       "use an integer tensor (batch.long())")
            if x.dim() != 2:
                hint = " (add the batch dimension with .unsqueeze(0))" if x.dim() == 1 else ""
                raise CalibrationError(f"calibration batch {i} has shape {tuple(x.shape)}; token ids must be "
                                       f"[batch, seq_len]{hint}")
            if isinstance(context, int) and x.shape[1] > context:  # positions past it: garbage, or an index error
                raise CalibrationError(f"calibration batch {i} has sequences of {x.shape[1]} tokens, longer than the "
                                       f"model's context of {context} (config.max_position_embeddings); sample "
                                       f"shorter windows, e.g. sparsecc.sample_batches(tokens, seqlen={context})")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= vocab:
                raise CalibrationError(f"calibration batch {i} has token ids in [{lo}, {hi}] but the model's "
                                       f"vocabulary is [0, {vocab}); was it tokenised with another tokenizer?")
            m = token_mask(b)
            if m is not None and m.shape != x.shape:
                raise CalibrationError(f"calibration batch {i}: attention_mask shape {tuple(m.shape)} differs "
                                       f"from input_ids shape {tuple(x.shape)}")
        elif param is not None and x.is_floating_point() and x.dtype != param.dtype:
            raise CalibrationError(f"calibration batch {i} has dtype {x.dtype} but the model's parameters are "
                                   f"{param.dtype}; convert with batch.to({param.dtype})")
    return batches


def describe(batches: list, setup: dict | None = None) -> dict:
    """The calibration record: the given setup plus what can be read off the batches themselves."""
    h = hashlib.sha256()
    tokens = 0
    shapes = set()
    for b in batches:
        x = _main_tensor(b)
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
        m = token_mask(b)
        tokens += int(m.sum()) if m is not None else (x.numel() if x.dim() <= 2 else x[..., 0].numel())
        shapes.add(tuple(x.shape))
    rec = {"num_batches": len(batches), "num_tokens": tokens, "shapes": sorted(shapes),
           "batches_sha256": h.hexdigest()}
    rec.update(setup or getattr(batches, "setup", {}) or {})
    return rec


def batch_loss(model: nn.Module, batch, needed_by: str) -> tuple[float, int]:
    """(sum, count) of the next-token cross-entropy over the batch's real tokens (a target counts
    when it and the token before it are not padding); `needed_by` names the caller in errors."""
    total, count = token_loss(model, batch, needed_by)
    return float(total), count


def token_loss(model: nn.Module, batch, needed_by: str) -> tuple[torch.Tensor, int]:
    """`batch_loss` as a tensor (the sum, in the autograd graph when gradients are on), and the count."""
    import torch.nn.functional as F

    from .capture import forward_model

    ids = batch if torch.is_tensor(batch) else batch.get("input_ids")
    logits = logits_of(forward_model(model, batch), ids, needed_by)
    mask = token_mask(batch)
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:] & mask[:, :-1]
    ce = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")
    return ce, int(keep.sum())


def logits_of(out, ids, needed_by: str) -> torch.Tensor:
    """The logits [batch, seq, vocab] of a causal LM's output (a tensor, a tuple starting with them,
    or an output with .logits), checked against the token ids [batch, seq] it was run on."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) and out else out
    if not torch.is_tensor(logits) or not torch.is_tensor(ids) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        got = f"logits of shape {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise CalibrationError(f"{needed_by} needs a causal LM returning logits [batch, seq, vocab] on batches of "
                               f"token ids ([batch, seq], or a dict with input_ids); got {got}")
    return logits


def mean_loss(parts: list[tuple[float, int]], needed_by: str) -> float:
    """The mean of `batch_loss` results."""
    total, count = map(sum, zip(*parts)) if parts else (0.0, 0)
    if count == 0:
        raise CalibrationError(f"{needed_by} needs sequences of 2 real tokens at least (a next-token loss)")
    return total / count

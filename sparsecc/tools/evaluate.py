"""Perplexity the way SparseGPT and Wanda report it.

The 1-D token stream is cut into non-overlapping windows of `seqlen` tokens (the remainder is
dropped); each window is run on its own, every token but the first is predicted from the ones
before it in the same window, and the perplexity is exp of the mean NLL over all predictions.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.calibration import logits_of


def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = False) -> float:
    """exp(mean next-token NLL) of `model` over non-overlapping `seqlen` windows of `token_ids`.

    `model` is any causal LM: a transformers model, or a module whose output has `.logits` or is
    the logits tensor [batch, seqlen, vocab]. It runs on the device of its parameters, in eval
    mode and without gradients; its train/eval mode is restored afterwards.
    `max_windows` evaluates only the first that many windows."""
    windows = _windows(token_ids, seqlen, batch_size, max_windows)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}

    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="perplexity", unit="batch")
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                logits = logits_of(model(batch, **kwargs), batch, "perplexity")
                targets = batch[:, 1:]
                nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count) if math.isfinite(nll) else float("nan")
    if not math.isfinite(ppl):
        raise FloatingPointError(f"perplexity is not finite (mean NLL {nll / count}): the model produced "
                                 f"NaN/Inf logits or a probability of zero for a true token")
    return ppl


def _windows(token_ids, seqlen: int, batch_size: int, max_windows: int | None) -> torch.Tensor:
    """Validate the inputs; return the [n_windows, seqlen] LongTensor of windows."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.is_floating_point() \
            or token_ids.is_complex() or token_ids.dtype == torch.bool:
        what = f"{token_ids.dtype} tensor of shape {tuple(token_ids.shape)}" \
            if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise TypeError(f"token_ids must be a 1-D integer tensor (e.g. encode_text(tokenizer, text)), got {what}")
    for name, value in (("seqlen", seqlen), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one token predicts the next), got {seqlen}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    n = token_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"text too short for one window of {seqlen} tokens (got {token_ids.numel()})")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[:n * seqlen].long().view(n, seqlen)


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward takes keyword `name` (looking through torch.compile wrappers)."""
    inner = getattr(model, "_orig_mod", model)
    try:
        params = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)



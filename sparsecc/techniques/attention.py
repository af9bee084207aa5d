"""Attention rewrites: sliding window (Longformer) and attention sinks (StreamingLLM), seed 001.

    sparsecc.sparsify_(model, {"re:.*self_attn": AttentionSinkConfig(sinks=4, window=1020)})

targets the modules that call scaled_dot_product_attention in the captured graph. The model keeps
its own attention modules and projections; sparsecc registers an attention function with
transformers' AttentionInterface ("sparsecc") that computes `torch.ops.sparsecc.window_attention`
(codegen/window_attention.py) for the rewritten modules, and a forward pre-hook that gives the
cache the model is called with (any DynamicCache: the one `generate` makes, or one the user
passes) a `RollingLayer` for each rewritten layer. That layer keeps the first `sinks` tokens and
the last window, so the ordinary loop — `model.generate(...)`, or
`model(ids, **sparsecc.cache_kwargs(cache, model), use_cache=True)` token by token — streams text of any length
with at most sinks + window cached positions per layer.

- `SlidingWindowConfig(window, dilation=1, global_tokens=0)`: each token attends the last `window`
  tokens, every `dilation`-th one (Longformer §3.1), plus the first `global_tokens` tokens (in a
  causal model Longformer's global tokens are attended by all later tokens, i.e. sinks without a
  position change). Positions stay absolute.
- `AttentionSinkConfig(sinks=4, window=1020)`, or `cache_size=1024` for window = cache_size - sinks:
  the StreamingLLM form. With `shift_positions=True` (default) positions are assigned within the
  cache (StreamingLLM §3.2), for RoPE models; `False` keeps absolute positions (the ablation).

Batches must be unpadded (one sequence per row, no zeros in attention_mask): positions are token
indices. Dropout inside attention is not applied (inference rewrites).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .. import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.window_attention)
from ..codegen.window_attention import allowed
from .configs import SparsityConfig, register_technique
from ..errors import RecipeError
from .rewrites import ModuleRewrite
from .transaction import Transaction

IMPL = "sparsecc"


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RecipeError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SlidingWindowConfig(SparsityConfig):
    """Longformer attention: the last `window` tokens (every `dilation`-th) plus `global_tokens`."""

    TARGET = "attention"
    window: int = 256
    dilation: int = 1
    global_tokens: int = 0

    def validate(self) -> None:
        _check_int("SlidingWindowConfig.window", self.window, 1)
        _check_int("SlidingWindowConfig.dilation", self.dilation, 1)
        _check_int("SlidingWindowConfig.global_tokens", self.global_tokens, 0)

    def form(self) -> tuple[int, int, int, bool]:
        """(window, dilation, sinks, shift positions)"""
        return self.window, self.dilation, self.global_tokens, False


@dataclass(frozen=True)
class AttentionSinkConfig(SparsityConfig):
    """StreamingLLM attention: `sinks` first tokens plus a rolling window of recent tokens."""

    TARGET = "attention"
    sinks: int = 4
    window: int | None = None
    cache_size: int | None = None   # alternative to window: window = cache_size - sinks
    shift_positions: bool = True

    def validate(self) -> None:
        _check_int("AttentionSinkConfig.sinks", self.sinks, 0)
        if (self.window is None) == (self.cache_size is None):
            raise RecipeError("AttentionSinkConfig needs exactly one of window= (recent tokens kept) or cache_size= "
                              "(sinks + window), e.g. AttentionSinkConfig(sinks=4, window=1020)")
        if self.window is not None:
            _check_int("AttentionSinkConfig.window", self.window, 1)
        else:
            _check_int("AttentionSinkConfig.cache_size", self.cache_size, 1)
            if self.sinks >= self.cache_size:
                raise RecipeError(f"AttentionSinkConfig: {self.sinks} sinks do not fit a cache of {self.cache_size} "
                                  "positions with room for a window; use fewer sinks or a larger cache_size")
        if not isinstance(self.shift_positions, bool):
            raise RecipeError(f"AttentionSinkConfig.shift_positions must be True or False, got {self.shift_positions!r}")

    def form(self) -> tuple[int, int, int, bool]:
        window = self.window if self.window is not None else self.cache_size - self.sinks
        return window, 1, self.sinks, self.shift_positions


@dataclass(frozen=True)
class _Form:
    """What a rewritten attention module computes (stored on it as `sparsecc_attention`)."""

    window: int | None
    dilation: int
    sinks: int
    rotary: object = None  # the module holding RoPE's inv_freq when positions shift, else None

    @property
    def span(self) -> int | None:
        """How far back the window reaches (in tokens, the query included)."""
        return None if self.window is None else (self.window - 1) * self.dilation + 1


_CAUSAL = _Form(None, 1, 0)


class RollingLayer(DynamicLayer):
    """A cache layer that keeps the first `sinks` tokens and the `keep` most recent ones.

    `update` returns the kept tokens plus the new ones (what the new queries may see) and then
    evicts; `get_seq_length` counts every token seen, so the model keeps assigning absolute
    positions (the attention function turns them into positions within the cache)."""

    def __init__(self, sinks: int, keep: int):
        super().__init__()
        self.sinks, self.keep, self.cumulative_length = sinks, keep, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        n = keys.shape[-2]
        if n > self.sinks + self.keep:  # evict the oldest tokens between the sinks and the window
            self.keys = torch.cat([keys[:, :, :self.sinks], keys[:, :, n - self.keep:]], -2)
            self.values = torch.cat([values[:, :, :self.sinks], values[:, :, n - self.keep:]], -2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.keys.shape[-2] if self.is_initialized else 0) + query_length, 0

    def get_max_length(self) -> int:
        return self.sinks + self.keep + 1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a rolling KV cache cannot be cropped (its evicted tokens are gone)")

    def __repr__(self) -> str:
        return f"RollingLayer(sinks={self.sinks}, window={self.keep + 1}, seen={self.cumulative_length})"


def _rolling_layer(module: nn.Module, form: _Form):
    def hook(mod, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
        if cache is None or not hasattr(cache, "layers"):
            return None
        idx = mod.layer_idx
        if getattr(cache, "layer_class_to_replicate", None) is not None:
            while len(cache.layers) <= idx:
                cache.layers.append(cache.layer_class_to_replicate())
        layer = cache.layers[idx]
        if isinstance(layer, RollingLayer):
            return None
        if not isinstance(layer, DynamicLayer):
            raise ValueError(f"{type(cache).__name__} layer {idx} is a {type(layer).__name__}; the sparsecc attention "
                             "forms roll their own cache: pass a DynamicCache (or none)")
        if layer.get_seq_length() > 0:
            raise ValueError(f"the cache already holds {layer.get_seq_length()} tokens for layer {idx}, cached before "
                             "the attention rewrite: start a new cache")
        cache.layers[idx] = RollingLayer(form.sinks, form.span - 1)
        return None
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def sparsecc_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (AttentionInterface "sparsecc"): the module's form, or
    causal attention for modules that were not rewritten."""
    form = getattr(module, "sparsecc_attention", None)
    if form is None and not getattr(module, "is_causal", True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    form = form or _CAUSAL
    t, n_keys = query.shape[2], key.shape[2]
    pos = kwargs.get("position_ids")
    q_pos = pos[0, -t:].to(query.device) if pos is not None else torch.arange(n_keys - t, n_keys, device=query.device)
    seen = q_pos[-1:] + 1
    j = torch.arange(n_keys, device=query.device)
    k_pos = torch.where(j < form.sinks, j, j + (seen - n_keys))  # kept sinks, then a contiguous run ending at seen-1
    inv_freq = form.rotary.inv_freq.to(query.device) if form.rotary is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.sparsecc.window_attention(query, key, value, q_pos, k_pos, None, form.window, form.dilation,
                                              form.sinks, float(scale), inv_freq)
    return out.transpose(1, 2).contiguous(), None


def _refuse_padding(model: nn.Module, tx) -> None:
    """transformers hands a custom attention function no mask, so padded rows would attend their
    padding: refuse padded batches at the model's entry instead (checked outside compiled code)."""
    if getattr(model, "_sparsecc_padding_hook", None) is not None:
        return

    def hook(mod, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and not torch.compiler.is_compiling() and not bool(mask.bool().all()):
            raise ValueError("padded batches are not supported by the sparsecc attention forms (positions are "
                             "token indices): run one sequence per row, without padding")

    def undo():
        model._sparsecc_padding_hook.remove()
        del model._sparsecc_padding_hook
    tx.on_undo(undo)
    model._sparsecc_padding_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def _register_impl() -> None:
    from transformers import AttentionInterface
    if IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL, sparsecc_attention)


def _rotary(model: nn.Module, name: str):
    for mod in model.modules():
        if isinstance(getattr(mod, "inv_freq", None), torch.Tensor):
            return mod
    raise RecipeError(f"{name}: {type(model).__name__} has no rotary position embedding (inv_freq), so positions "
                      "within the cache cannot be assigned; use AttentionSinkConfig(..., shift_positions=False)")


def _check_module(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise RecipeError(f"{name!r}: the model has no such attention module") from None
    if not (hasattr(module, "layer_idx") and hasattr(getattr(module, "config", None), "_attn_implementation")):
        raise RecipeError(f"{name} ({type(module).__name__}) is not a transformers attention module (with layer_idx "
                          "and a config selecting its attention function); sparsecc rewrites those")
    return module


def _pair_share(form: _Form, length: int) -> float:
    """Share of the causal (query, key) pairs the form drops on a sequence of `length` tokens."""
    p = torch.arange(length)
    kept = int(allowed(p, p, form.window, form.dilation, form.sinks).sum())
    return 1.0 - kept / (length * (length + 1) / 2)


def apply_form(model: nn.Module, name: str, config, tx) -> dict:
    """Rewrite attention module `name` to `config`'s form, each change recorded in `tx` first."""
    module = _check_module(model, name)
    window, dilation, sinks, shift = config.form()
    form = _Form(window, dilation, sinks, _rotary(model, name) if shift and sinks > 0 else None)
    if form.rotary is not None:
        head_dim = getattr(module, "head_dim", None)
        if head_dim is not None and 2 * form.rotary.inv_freq.numel() > head_dim:
            raise RecipeError(f"{name}: rotary dims {2 * form.rotary.inv_freq.numel()} exceed head_dim {head_dim}")
    _register_impl()
    _refuse_padding(model, tx)
    old_impl, old_form = module.config._attn_implementation, getattr(module, "sparsecc_attention", None)
    handle = None

    def undo():
        if handle is not None:
            handle.remove()
        module.sparsecc_attention = old_form
        if old_form is None:
            del module.sparsecc_attention
        module.config._attn_implementation = old_impl
    tx.on_undo(undo)
    module.sparsecc_attention = form
    module.config._attn_implementation = IMPL
    handle = _rolling_layer(module, form)
    length = getattr(module.config, "max_position_embeddings", None) or 1024
    return {"module": name, "param": None, "technique": type(config).__name__, "config": config.to_dict(),
            "shape": None, "sparsity": _pair_share(form, min(int(length), 4096)), "context": int(min(length, 4096)),
            "label": f"w={window}" + (f" d={dilation}" if dilation > 1 else "") + (f" s={sinks}" if sinks else ""),
            "error": None, "error_kind": None, "seconds": 0.0}


class _AttentionRewrite(ModuleRewrite):
    what = "attention module calling scaled_dot_product_attention (load the model with attn_implementation='sdpa')"
    first = True  # data-free, at the start of its block: the block's statistics then see the final attention

    def compile_error(self, config) -> str | None:
        """The graph lowering has no rolling cache: positions within the cache need sparsify_."""
        _, _, sinks, shift = config.form()
        if shift and sinks > 0:
            return ("positions within the cache (shift_positions=True) and the rolling KV cache come from "
                    "sparsecc.sparsify_(model, recipe); at compile time use shift_positions=False or SlidingWindowConfig")
        return None

    def candidates(self, captured) -> dict[str, str]:
        return {name: name for name in captured.attention}

    def apply(self, config, model, name, spec, decision, tx):
        return apply_form(model, name, config, tx)

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        from .configs import config_from_dict

        tx = Transaction(model)
        try:
            for row in rows:
                apply_form(model, row["module"], config_from_dict(row["config"]), tx)
        except BaseException:
            tx.rollback()
            raise
        return [row["module"] for row in rows]


@register_technique(SlidingWindowConfig)
class SlidingWindowTechnique(_AttentionRewrite):
    pass


@register_technique(AttentionSinkConfig)
class AttentionSinkTechnique(_AttentionRewrite):
    pass


def cache_kwargs(cache, model=None) -> dict:
    """The keyword `model`'s forward takes its key-value cache by: {"cache": cache} or
    {"past_key_values": cache}, whichever its signature names (torch.compile's and PEFT's wrappers
    looked through); otherwise, and without a model, the installed transformers' convention, read
    from LlamaModel.forward (the later 5.x releases take `cache=`; the earlier ones, 5.17 among them,
    `past_key_values=`, and would take a `cache=` silently into **kwargs and run without the cache):
    `model(ids, **sparsecc.cache_kwargs(cache, model), use_cache=True)`."""
    import inspect

    inner = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PEFT model
    named = inspect.signature(inner.forward).parameters if inner is not None else {}
    for name in ("cache", "past_key_values"):
        if name in named:
            return {name: cache}
    from transformers import LlamaModel
    return {"cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values": cache}


def kv_cache_lengths(cache) -> list[int]:
    """Positions held per layer of a transformers cache (what the rolling forms keep bounded)."""
    cache = getattr(cache, "self_attention_cache", cache)
    return [int(layer.keys.shape[-2]) if getattr(layer, "is_initialized", False) else 0 for layer in cache.layers]


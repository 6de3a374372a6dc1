"""Cached generation for X-LoRA: a KV cache for the scaling pass beside the main one, and prompt-level scalings.

Every part of X-LoRA is causal: the scaling pass is a causal decoder, the classifier and the gate act on each token
alone, and the main pass is a causal decoder again. So a new token's scalings depend only on the tokens before it, and
both passes can be cached exactly. `XLoraCache` is the main pass's `DynamicCache` that also carries the scaling pass's
cache; it overrides the methods transformers' generation utilities call to rearrange a cache (beam reordering,
cropping, batch selection) so that both caches, and the held prompt scalings, always describe the same sequences.

Two granularities (`XLoraConfig.scalings_mode`, or `generate(..., scalings_mode=...)` per call):

* ``"token"``: every token gets its own scalings; each decoding step runs the scaling pass and the main pass on the
  new token, both against their caches. Exactly equal (within float tolerance) to the uncached forward.
* ``"prompt"``: the prompt is routed per token as in token mode; the last prompt token's scalings are then held for
  every later token of the cache, and decoding steps run the main pass only. In `generate`, the prompt is the input of
  the call (however transformers splits it into forwards); in a hand-written loop, everything the cache receives
  before its first one-token step. The scaling pass's cache is dropped once the prompt is complete. Without a cache,
  `generate` holds the scalings of the last token of its input, which gives the same tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from .config import ScalingsMode

SCALINGS_MODES: tuple[str, ...] = ("token", "prompt")

# Names a transformers forward may use for its KV cache: `cache` in transformers >= 5.2x, `past_key_values` before
# (still accepted, deprecated).
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")


def check_scalings_mode(mode: str) -> str:
    """Returns `mode` if it is a known scalings mode, otherwise raises a `ValueError` listing them."""
    if mode not in SCALINGS_MODES:
        raise ValueError(f"`scalings_mode` must be one of {list(SCALINGS_MODES)}, got {mode!r}.")
    return mode


def sync_scaling_cache(main: Any, scaling: Any) -> None:
    """Brings the scaling pass's cache `scaling` to the length of the main cache `main` before a forward.

    The scaling pass runs first; if the main pass then failed, the scaling cache is ahead and is cropped back. A
    scaling cache that is behind missed tokens (they ran with static scalings or with the adapter disabled), which
    cannot be recovered.
    """
    ahead = scaling.get_seq_length() - main.get_seq_length()
    if ahead > 0:
        scaling.crop(-ahead)
    elif ahead < 0:
        raise RuntimeError(
            f"The X-LoRA scaling pass's cache holds {main.get_seq_length() + ahead} tokens but the main cache "
            f"holds {main.get_seq_length()}: some tokens were processed with static scalings or with the adapter "
            "disabled, so their routing was never computed. Start from a new cache (or none)."
        )


class XLoraCache(DynamicCache):
    """A `DynamicCache` for the main pass that also holds the scaling pass's cache and the held prompt scalings.

    The X-LoRA model creates it (or turns an empty `DynamicCache` it is given into one, in place), so users normally
    never build it; passing `XLoraCache(config=model.config)` as `cache` works too.

    Args:
        *args: Passed to `DynamicCache`.
        scalings_mode: ``"token"`` or ``"prompt"`` (see the module docstring).
        **kwargs: Passed to `DynamicCache` (e.g. `config`); the scaling pass's cache is built with the same `config`.

    Attributes:
        scalings_mode: The granularity this cache is used with.
        scaling_cache: The scaling pass's `DynamicCache`, the same length as this one; None once prompt mode holds its
            scalings (its keys and values are no longer needed).
        held_scalings: In prompt mode, (batch, 1, n_layers|1, n_experts) scalings of the last prompt token; None
            before the prompt or in token mode.
    """

    def __init__(self, *args: Any, scalings_mode: ScalingsMode = "token", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_xlora(scalings_mode, kwargs.get("config"))

    def _init_xlora(self, scalings_mode: str, config: Any) -> None:
        self.scalings_mode = check_scalings_mode(scalings_mode)
        self._model_config = config
        self.scaling_cache: DynamicCache | None = DynamicCache(config=config)
        self.held_scalings: torch.Tensor | None = None

    @classmethod
    def upgrade(cls, cache: DynamicCache, scalings_mode: str, config: Any = None) -> XLoraCache:
        """Turns an empty plain `DynamicCache` into an `XLoraCache`, in place, so the caller's reference stays valid.

        Changing the class of a live object is what FSDP2's `fully_shard` does to modules; it is safe here because
        `XLoraCache` only adds attributes and extends methods of `DynamicCache`.
        """
        if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
            raise TypeError("Only an empty, plain DynamicCache can become an XLoraCache.")
        cache.__class__ = cls
        cache._init_xlora(scalings_mode, config)
        return cache

    @property
    def holds_scalings(self) -> bool:
        """True once prompt mode has dropped the scaling pass's cache and holds the prompt's scalings."""
        return self.scaling_cache is None

    def set_scalings_mode(self, mode: str) -> None:
        """Switches granularity; a cache that holds prompt scalings cannot go back to token mode."""
        check_scalings_mode(mode)
        if mode == self.scalings_mode:
            return
        if mode == "token" and self.holds_scalings:
            raise ValueError(
                "This cache was generated with scalings_mode='prompt': the scaling pass has no cache for its "
                "generated tokens, so it cannot continue in token mode. Start from a new cache (or none)."
            )
        self.scalings_mode = mode
        self.held_scalings = None

    def needs_scaling_pass(self, n_new_tokens: int) -> bool:
        """Whether the next forward (of `n_new_tokens` tokens) runs the scaling pass; in prompt mode, may hold.

        Called before the forward, while this cache still has its old length. In prompt mode, the prompt ends where
        the running `generate` call's input ends (so candidate-verifying steps of assisted decoding hold too);
        outside `generate`, at the first one-token step.
        """
        if self.scalings_mode == "token":
            return True
        if self.holds_scalings:
            return False
        past = self.get_seq_length()
        scope = _SCOPE.get()
        if scope is not None and scope.prompt_length is not None:
            generated = past >= scope.prompt_length
        else:
            generated = n_new_tokens == 1 and past > 0
        if generated and self.held_scalings is not None:
            self.scaling_cache = None  # the prompt is complete: its keys and values are no longer needed
            return False
        return True

    def sync_scaling_cache(self) -> None:
        """Brings the scaling pass's cache to this cache's length before a forward that extends both."""
        if self.scaling_cache is not None:
            sync_scaling_cache(self, self.scaling_cache)

    def record(self, scalings: torch.Tensor) -> torch.Tensor:
        """In prompt mode, holds the last prompt token's scalings; returns the scalings this forward uses.

        Called before the forward (this cache still has its old length). A forward can reach past the end of the
        `generate` call's prompt (assisted decoding prefills the prompt with candidate tokens): its positions from
        the prompt's end on already use the held scalings.

        Args:
            scalings: (batch, seq, n_layers|1, n_experts) from the scaling pass over this forward's tokens.

        Returns:
            The same shape: unchanged in token mode or within the prompt.
        """
        if self.scalings_mode != "prompt":
            return scalings
        past = self.get_seq_length()
        scope = _SCOPE.get()
        prompt_length = scope.prompt_length if scope is not None else None
        if prompt_length is not None and past < prompt_length < past + scalings.shape[1]:
            scalings = hold_after(scalings, prompt_length - past)
            self.held_scalings = scalings[:, prompt_length - past - 1 : prompt_length - past].detach()
        else:
            self.held_scalings = scalings[:, -1:].detach()  # (batch, 1, n_layers|1, n_experts)
        return scalings

    # transformers' generation utilities rearrange caches through these methods: both caches and the held scalings
    # follow, so every row of each always belongs to the same sequence.

    def reset(self) -> None:
        """Empties both caches and forgets the held scalings."""
        super().reset()
        if self.scaling_cache is not None:
            self.scaling_cache.reset()
        else:
            self.scaling_cache = DynamicCache(config=self._model_config)
        self.held_scalings = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders both caches (and the held scalings) along the batch for beam search."""
        super().reorder_cache(beam_idx)
        if self.scaling_cache is not None:
            self.scaling_cache.reorder_cache(beam_idx)
        if self.held_scalings is not None:
            self.held_scalings = self.held_scalings.index_select(0, beam_idx.to(self.held_scalings.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` tokens from both caches."""
        super().crop(tokens_to_remove)
        if self.scaling_cache is not None:
            self.scaling_cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every row `repeats` times in both caches and the held scalings."""
        super().batch_repeat_interleave(repeats)
        if self.scaling_cache is not None:
            self.scaling_cache.batch_repeat_interleave(repeats)
        if self.held_scalings is not None:
            self.held_scalings = self.held_scalings.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the rows `indices` in both caches and the held scalings."""
        super().batch_select_indices(indices)
        if self.scaling_cache is not None:
            self.scaling_cache.batch_select_indices(indices)
        if self.held_scalings is not None:
            self.held_scalings = self.held_scalings[indices.to(self.held_scalings.device)]


@dataclass(frozen=True)
class GenerationScope:
    """What `XLoraModel.generate` tells the forwards it makes.

    Attributes:
        scalings_mode: The granularity asked for in this call, or None to keep the cache's (or the config's).
        prompt_length: Length of the `generate` input; without a cache, prompt mode holds that position's scalings.
    """

    scalings_mode: str | None
    prompt_length: int | None


_SCOPE: ContextVar[GenerationScope | None] = ContextVar("peft_xlora_generation", default=None)


@contextlib.contextmanager
def generation_scope(scalings_mode: str | None, prompt_length: int | None) -> Iterator[None]:
    """Makes a `GenerationScope` current for the enclosed `generate` call."""
    if scalings_mode is not None:
        check_scalings_mode(scalings_mode)
    token = _SCOPE.set(GenerationScope(scalings_mode, prompt_length))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def input_length(args: tuple, kwargs: dict) -> int | None:
    """Number of tokens of a forward's (or `generate`'s) input, from its ids or embeddings; None if not found."""
    for key in ("input_ids", "inputs_embeds", "inputs"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[1] if value.dim() > 1 else None
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
        return args[0].shape[1]
    return None


def hold_after(scalings: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Replaces the scalings of positions >= `prompt_length` by those of position `prompt_length - 1`.

    Args:
        scalings: (batch, seq, n_layers|1, n_experts), seq > prompt_length.
        prompt_length: Number of prompt tokens (>= 1).

    Returns:
        (batch, seq, n_layers|1, n_experts): the prompt routed per token, everything after held.
    """
    held = scalings[:, prompt_length - 1 : prompt_length]  # (batch, 1, n_layers|1, n_experts)
    tail = held.expand(-1, scalings.shape[1] - prompt_length, -1, -1)
    return torch.cat([scalings[:, :prompt_length], tail], dim=1)


def _cache_kwarg_name(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache under."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins or odd wrappers
        return CACHE_KWARGS[0]
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[0])


def _decoder_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def _creates_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether this forward of `model` builds and returns a KV cache of its own (a decoder with `use_cache` on).

    Not in training mode: a cache returned there is not extended, and the scaling pass's keys and values would only
    add memory to the training step.
    """
    if model.training:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(_decoder_config(model), "use_cache", False)
    return bool(use_cache)


def prepare_cache(model: nn.Module, kwargs: dict, default_mode: str) -> tuple[XLoraCache | None, str | None]:
    """Finds or makes the `XLoraCache` of a forward of `model`, before its scaling pass.

    A forward that will return a cache gets an `XLoraCache` (written into `kwargs`, which the forward then uses), so
    the cache it returns can be extended exactly. An empty plain `DynamicCache` given by the caller (transformers'
    `generate` makes one) becomes an `XLoraCache` in place. A new cache takes the mode of the running `generate` call,
    else `default_mode`; an existing `XLoraCache` keeps its own unless the `generate` call asks for another.

    Args:
        model: The transformers model whose forward is about to run.
        kwargs: That forward's keyword arguments; may be modified.
        default_mode: The config's `scalings_mode`.

    Returns:
        (the cache, or None when the forward runs without one; the keyword it is passed under).

    Raises:
        ValueError: The caller passed a cache X-LoRA cannot extend: not a dynamic cache, or a plain one already filled
            without the scaling pass.
    """
    requested = requested_scalings_mode()
    scalings_mode = requested or default_mode
    name = next((key for key in CACHE_KWARGS if kwargs.get(key) is not None), None)
    if name is None:
        if not _creates_cache(model, kwargs):
            return None, None
        name = _cache_kwarg_name(model)
        kwargs[name] = XLoraCache(config=_decoder_config(model), scalings_mode=scalings_mode)
        return kwargs[name], name
    cache = kwargs[name]
    if isinstance(cache, XLoraCache):
        if requested is not None:
            cache.set_scalings_mode(requested)
        cache.sync_scaling_cache()
        return cache, name
    if type(cache) is not DynamicCache:
        raise ValueError(
            f"X-LoRA cannot cache with a {type(cache).__name__}: its scaling pass keeps a second cache, which only "
            "the dynamic cache (transformers' default) carries. Leave `cache_implementation` unset (or 'dynamic'), "
            "or generate with use_cache=False."
        )
    if cache.get_seq_length() == 0:
        return XLoraCache.upgrade(cache, scalings_mode, _decoder_config(model)), name
    raise ValueError(
        "X-LoRA cannot extend this DynamicCache: it was filled without X-LoRA's scaling pass (e.g. by the plain model "
        "or under `disable_adapter()`), whose own cache of the same tokens is missing. Pass no cache or an empty "
        "DynamicCache to the first forward (or `generate`) and reuse the XLoraCache it returns."
    )


def requested_scalings_mode() -> str | None:
    """The scalings mode the running `generate` call asked for, or None (outside one, or none asked)."""
    scope = _SCOPE.get()
    return scope.scalings_mode if scope is not None else None


def hold_uncached(scalings: torch.Tensor, default_mode: str) -> torch.Tensor:
    """Prompt mode without a cache: inside `generate`, holds the last prompt token's scalings for later positions.

    Each uncached step sees the whole sequence; holding position `prompt_length - 1` gives every generated token the
    scalings the cached path holds, so both paths produce the same tokens.

    Args:
        scalings: (batch, seq, n_layers|1, n_experts) of one forward.
        default_mode: The config's `scalings_mode`, used unless the `generate` call asked for one.

    Returns:
        The same shape; unchanged outside a prompt-mode `generate` call or when seq does not extend the prompt.
    """
    scope = _SCOPE.get()
    if scope is None or (scope.scalings_mode or default_mode) != "prompt" or not scope.prompt_length:
        return scalings
    if scalings.shape[1] <= scope.prompt_length:
        return scalings
    return hold_after(scalings, scope.prompt_length)

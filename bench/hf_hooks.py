"""Counting transformers' verification passes from outside `generate()`.

transformers reports no per-pass statistics for its assisted modes. A forward pre-hook on the
model sees every call; the full-depth ones are the verification passes (early-exit draft calls run
with `config.num_hidden_layers` lowered and are skipped). From each pass's input width and cache
length, `pass_statistics` reads how many tokens it committed and how many it was given as drafts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullDepthCall:
    """One full-depth forward call: how many input ids it got and how long the cache was before it
    (None where the call did not show them)."""

    input_width: int | None
    cache_length: int | None


@dataclass(frozen=True)
class PassStatistics:
    """What the calls say about one generation. Whatever cannot be read from them is None."""

    accept_lengths: tuple[int, ...] | None  # per verification pass, the full model's token counted
    passes: int | None
    drafted: int | None


class FullDepthCallRecorder:
    """Context manager: records a `FullDepthCall` for every full-depth forward call of `model`
    while it is open, and removes its hook on the way out."""

    def __init__(self, model):
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        self.calls: list[FullDepthCall] = []
        self._handle = None

    def __enter__(self) -> FullDepthCallRecorder:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        return False

    def _hook(self, module, args, kwargs):
        if int(module.config.num_hidden_layers) != self.num_layers:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        length = None
        if cache is not None and hasattr(cache, "get_seq_length"):
            length = int(cache.get_seq_length())
        self.calls.append(FullDepthCall(None if ids is None else int(ids.shape[-1]), length))
        return None


def pass_statistics(calls: list[FullDepthCall], prompt_len: int, new_tokens: int) -> PassStatistics:
    """Accept lengths, passes and drafted tokens from the recorded full-depth calls.

    Before pass i > 0 the cache holds every committed token but the last, which is the call's
    first input; so the tokens committed before pass i are cache length + 1 (the prompt before
    pass 0), and the rest of a call's inputs are drafts."""
    if not calls:
        return PassStatistics(None, None, None)
    passes = len(calls)
    try:
        bounds = [prompt_len] + [c.cache_length + 1 for c in calls[1:]] + [prompt_len + new_tokens]
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        drafted = [calls[0].input_width - prompt_len] + [c.input_width - 1 for c in calls[1:]]
    except TypeError:  # a call without input ids or cache length
        return PassStatistics(None, passes, None)
    if sum(lengths) != new_tokens or min(lengths) < 1 or min(drafted) < 0:
        return PassStatistics(None, passes, None)
    return PassStatistics(lengths, passes, sum(drafted))

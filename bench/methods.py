"""The decoding methods a bench compares, and how each one generates an answer.

Nothing here times anything: the harness (`harness.py`) puts one clock around
`MethodRunner.generate`, the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from specbound_runtime.policy import default_check_layers

from .hf_hooks import FullDepthCallRecorder, pass_statistics

METHODS = ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound", "oracle")
REFERENCE = "hf-greedy"
NEEDS_ARTIFACT = ("specbound", "oracle")
PROMPT_LOOKUP_GRID = (3, 10)


def early_exit_layers(num_layers: int) -> tuple[int, ...]:
    """hf-early-exit's grid: the layers our runtime checks by default (the paper's), so the
    baseline drafts from the same depths as `specbound-paper`. SmolLM2 (30 layers): 15, 19, 22, 26."""
    return default_check_layers(num_layers)


@dataclass(frozen=True)
class Variant:
    """A runnable configuration: a method and its grid value, if it has a grid."""

    method: str
    value: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.method == "oracle":
            raise ValueError(f"not a runnable method: {self.method!r}")
        if (self.value is not None) != (self.method in ("hf-prompt-lookup", "hf-early-exit")):
            raise ValueError(f"{self.method} takes {'a' if self.value is None else 'no'} grid value")

    @property
    def name(self) -> str:
        if self.method == "hf-prompt-lookup":
            return f"hf-prompt-lookup(k={self.value})"
        if self.method == "hf-early-exit":
            return f"hf-early-exit(layer={self.value})"
        return self.method


@dataclass(frozen=True)
class Generation:
    """What one method generated for one answer, untimed. Statistics it cannot report are None."""

    token_ids: tuple[int, ...]
    accept_lengths: tuple[int, ...] | None  # per verification pass, the full model's token counted
    passes: int | None
    drafted: int | None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def accepted(self) -> int | None:
        return None if self.passes is None else self.new_tokens - self.passes


def _hf_generate(model, prompt_ids, max_new_tokens: int, eos, count_passes: bool, **kwargs) -> Generation:
    from specbound_runtime.exactness import reference_greedy

    if not count_passes:  # plain greedy: one pass per token, no drafts
        tokens = tuple(reference_greedy(model, list(prompt_ids), max_new_tokens, eos, **kwargs))
        return Generation(tokens, (1,) * len(tokens), len(tokens), 0)
    with FullDepthCallRecorder(model) as recorder:
        tokens = tuple(reference_greedy(model, list(prompt_ids), max_new_tokens, eos, **kwargs))
    stats = pass_statistics(recorder.calls, len(prompt_ids), len(tokens))
    return Generation(tokens, stats.accept_lengths, stats.passes, stats.drafted)


def _engine_generate(decoder, encoded, speculation: bool) -> Generation:
    r = decoder.generate(encoded, speculation=speculation)
    return Generation(tuple(r.token_ids), tuple(r.accept_lengths), r.verify_passes, r.drafted)


class MethodRunner:
    """Runs any `Variant` on an encoded prompt. `decoders` holds our engine: "specbound-paper"
    (no artifact; also runs `ar`) and, with an artifact, "specbound"."""

    def __init__(self, model, eos, decoders: dict):
        self.model = model
        self.eos = tuple(eos)
        self.decoders = decoders

    def generate(self, variant: Variant, encoded, max_new_tokens: int | None = None) -> Generation:
        n = encoded.max_new_tokens if max_new_tokens is None else min(max_new_tokens, encoded.max_new_tokens)
        if n != encoded.max_new_tokens:
            encoded = type(encoded)(ids=encoded.ids, max_new_tokens=n, clamped=encoded.clamped)
        m = variant.method
        if m == "hf-greedy":
            return _hf_generate(self.model, encoded.ids, n, self.eos, False)
        if m == "hf-prompt-lookup":
            return _hf_generate(self.model, encoded.ids, n, self.eos, True, prompt_lookup_num_tokens=variant.value)
        if m == "hf-early-exit":
            return _hf_generate(self.model, encoded.ids, n, self.eos, True, assistant_early_exit=variant.value)
        if m == "ar":
            return _engine_generate(self.decoders["specbound-paper"], encoded, speculation=False)
        return _engine_generate(self.decoders[m], encoded, speculation=True)

"""Sampling as pure math: the decoding mode, draws from a distribution by uniform numbers, and the
draft distribution q of the early-exit drafter.

Randomness enters in one place, `Sampler.uniforms`: uniform numbers in [0, 1) from an
explicit `torch.Generator` (a run's prompt `index` gets one seeded from (seed, index):
`PromptSampling`), or from torch's global generator when none is given (so
`torch.manual_seed` works as it does with transformers' `generate(do_sample=True)`). Everything
else is a deterministic function of those numbers, so the same seed gives the same output.
Probabilities, cumulative sums and uniforms are float64 (`exact_dtype`), except on MPS, which
has no float64: there float32.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

# Warpers whose output depends only on the multiset of scores, and on which a token scored -inf
# has no effect: applied to the exit head's short-list scores they give exactly what they give on
# the full vocabulary with -inf outside the short-list (and are ~10x cheaper there).
VALUE_ONLY_WARPERS = frozenset({"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"})


@dataclass(frozen=True)
class DecodingMode:
    """How the next token is chosen: greedy (do_sample=False), or sampling after the warpers
    transformers builds from temperature, top_k, top_p and min_p.

    As requested (`generate_kwargs`), a None field means "transformers' default"; as resolved from
    the generation config that generate() prepared (`resolved`), every field is explicit: top_k 0,
    top_p 1.0 and min_p None mean "off"."""

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not (0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if not self.do_sample and any(v is not None for v in (self.temperature, self.top_k, self.top_p, self.min_p)):
            raise ValueError("temperature, top_k, top_p and min_p apply to sampling (do_sample=True) only")

    @classmethod
    def sampling(cls, temperature=None, top_k=None, top_p=None, min_p=None) -> "DecodingMode":
        """Sampling when any setting is given (temperature 0 means greedy, as in most CLIs)."""
        if temperature == 0:
            if any(v is not None for v in (top_k, top_p, min_p)):
                raise ValueError("temperature 0 means greedy decoding; top_k, top_p and min_p need sampling")
            return cls()
        if all(v is None for v in (temperature, top_k, top_p, min_p)):
            return cls()
        return cls(True, temperature, top_k, top_p, min_p)

    @classmethod
    def resolved(cls, generation_config) -> "DecodingMode":
        """The mode generate() decodes in, read from the generation config it prepared."""
        if not getattr(generation_config, "do_sample", False):
            return cls()
        t = getattr(generation_config, "temperature", None)
        k = getattr(generation_config, "top_k", None)
        p = getattr(generation_config, "top_p", None)
        m = getattr(generation_config, "min_p", None)
        return cls(
            True,
            1.0 if t is None else float(t),
            0 if k is None else int(k),
            1.0 if p is None else float(p),
            None if m is None else float(m),
        )

    def generate_kwargs(self) -> dict:
        """The arguments of `generate()` that select this mode (None fields left out)."""
        out = {"do_sample": self.do_sample}
        for name in ("temperature", "top_k", "top_p", "min_p"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DecodingMode":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a decoding mode is a JSON object")
        return cls(**{k: data.get(k) for k in ("temperature", "top_k", "top_p", "min_p")}, do_sample=bool(data.get("do_sample")))

    def describe(self) -> str:
        if not self.do_sample:
            return "greedy"
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k != "do_sample" and v is not None]
        return "sampling" + (f" ({', '.join(parts)})" if parts else "")


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for sampling arithmetic, float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` under a run seed: each output reproducible on its own, repeated
    prompts still independent samples."""
    digest = hashlib.sha256(f"specbound-seed:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class PromptSampling:
    """How prompt `index` of a run is decoded: the run's mode and, when sampling under a run seed,
    the prompt's own seed (`prompt_seed(seed, index)`) and a generator seeded with it. Without a
    seed the generator is None: torch's global generator, unseeded, so a fresh sample each run.
    Turns of one prompt share its generator."""

    mode: DecodingMode
    generator: torch.Generator | None = None
    seed: int | None = None

    @classmethod
    def of(cls, mode: DecodingMode, seed: int | None, index: int) -> "PromptSampling":
        if not mode.do_sample or seed is None:
            return cls(mode)
        s = prompt_seed(seed, index)
        return cls(mode, torch.Generator().manual_seed(s), s)


class Sampler:
    """The run's source of randomness: an explicit generator, or torch's global one (None)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device | str = "cpu"):
        self.generator = generator
        self.device = torch.device(device)

    def uniforms(self, n: int) -> torch.Tensor:
        """n uniform numbers in [0, 1) (float64 but on MPS), on the decoding device (no host read)."""
        source = self.generator.device if self.generator is not None else self.device
        u = torch.rand(n, dtype=exact_dtype(source), device=source, generator=self.generator)
        return u if u.device == self.device else u.to(self.device)


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    """softmax of processed scores, in float32, as transformers' sampling step computes it."""
    return torch.softmax(scores.float(), dim=-1)


def sample_index(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first index whose cumulative probability exceeds u * total.

    probs [V] (need not sum to 1; zeros are never drawn), u a 0-d uniform in [0, 1). Returns a 0-d
    long tensor on probs' device; nothing is read on the host."""
    dtype = exact_dtype(probs.device)
    cdf = torch.cumsum(probs.to(dtype), dim=-1)
    target = (u.to(dtype) * cdf[-1]).reshape(1)
    index = torch.searchsorted(cdf, target, right=True)[0]
    return index.clamp(max=probs.shape[-1] - 1)


def draft_probabilities(
    logits: torch.Tensor,
    processors,
    prefix: torch.Tensor,
    column_tokens: torch.Tensor | None,
    vocab_size: int,
) -> torch.Tensor:
    """q: the distribution the early-exit drafter draws from, over the exit head's columns.

    The exit head's logits ([S], column i stands for token column_tokens[i], or token i without a
    short-list) go through the same processors and warpers as the full model's row at this
    position (prefix [1, n]: the tokens before it), then softmax. Value-only warpers run on the
    S columns; any other processor runs on the full vocabulary with -inf outside the short-list.
    A row that processing leaves without finite scores gives NaN: such a token is never drafted.
    Returned in float64 ([S]; float32 on MPS)."""
    scores = logits.float()
    if processors:
        if column_tokens is None or all(type(p).__name__ in VALUE_ONLY_WARPERS for p in processors):
            scores = processors(prefix, scores[None].clone())[0]
        else:
            full = torch.full((vocab_size,), float("-inf"), device=scores.device)
            full[column_tokens] = scores
            scores = processors(prefix, full[None])[0][column_tokens]
    # float64, so that q sums to 1 to double precision: the acceptance ratio uses q as drawn
    return torch.softmax(scores.to(exact_dtype(scores.device)), dim=-1)


def full_vocabulary(probs: torch.Tensor, column_tokens: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """A distribution over the exit head's columns as one over the whole vocabulary ([V])."""
    if column_tokens is None:
        return probs
    out = torch.zeros(vocab_size, dtype=probs.dtype, device=probs.device)
    out[column_tokens] = probs
    return out

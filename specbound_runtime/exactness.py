"""The ground truth: transformers' own decoding (greedy, or sampling for the bench's baselines),
and where another output departs from greedy's."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .generation import generate_arguments
from .sampling import DecodingMode


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=(), **generate_kwargs) -> list[int]:
    """`model.generate(do_sample=False)`: the tokens SpecBound must reproduce exactly, with the
    model's own generation config. Extra keyword arguments go to `generate` (the benchmark
    passes transformers' assisted modes)."""
    return reference_generate(model, prompt_ids, max_new_tokens, eos_token_ids, None, **generate_kwargs)


def reference_generate(
    model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=(), mode: DecodingMode | None = None, **generate_kwargs
) -> list[int]:
    """`model.generate(...)` in a decoding mode (greedy by default; under sampling its randomness
    is torch's global generator, as transformers has it)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **generate_arguments(max_new_tokens, eos_token_ids, mode),
            **generate_kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


@dataclass(frozen=True)
class Divergence:
    """First position where two generations differ, and how close the call was there."""

    position: int
    ours: int | None
    reference: int | None
    margin: float | None  # reference token's logit minus ours, under the full model

    def describe(self) -> str:
        margin = "n/a" if self.margin is None else f"{self.margin:.3g}"
        return (
            f"first divergence at generated position {self.position}: ours {self.ours}, "
            f"reference {self.reference}, logit margin {margin}"
        )


def first_divergence(ours: list[int], reference: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    if len(ours) != len(reference):
        return min(len(ours), len(reference))
    return None


def divergence(model, prompt_ids: list[int], ours: list[int], reference: list[int]) -> Divergence | None:
    """None when identical; otherwise the first divergent position and the logit margin there."""
    pos = first_divergence(ours, reference)
    if pos is None:
        return None
    a = ours[pos] if pos < len(ours) else None
    b = reference[pos] if pos < len(reference) else None
    margin = None
    if a is not None and b is not None:
        ids = torch.tensor([list(prompt_ids) + list(reference[:pos])], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1]
        margin = float(logits[b] - logits[a])
    return Divergence(position=pos, ours=a, reference=b, margin=margin)


def against_generate(model, prompt_ids: list[int], ours: list[int], max_new_tokens: int, eos_token_ids, call_s: float) -> dict:
    """Greedy `generate()` on the same prompt, timed: its wall time, the speedup of our call that
    took `call_s` seconds, whether our tokens are exactly its, and where they first differ if not
    (what `specbound decode --check-exact` adds to a turn's record)."""
    started = time.perf_counter()
    reference = reference_greedy(model, prompt_ids, max_new_tokens, eos_token_ids)
    generate_s = time.perf_counter() - started
    found = divergence(model, prompt_ids, ours, reference)
    checked = {"generate_wall_time_s": round(generate_s, 4), "speedup_vs_generate": round(generate_s / call_s, 3), "exact": found is None}
    if found is not None:
        checked["divergence"] = found.describe()
    return checked

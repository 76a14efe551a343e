"""Speculative sampling as a pure function, proved by enumerating every outcome.

`speculative_accept` is a deterministic function of (drafts, q, p, uniform numbers), piecewise
constant in the uniforms. For small vocabularies every draft sequence is enumerated with its
probability under q, and the uniforms' unit cube is cut at every point where the output can change
(the acceptance ratios p/q, and the cumulative sums of every distribution a token can be drawn
from); the output is checked to be constant inside each cell (evaluated at two interior points)
and weighted by the cell's volume. That gives the exact distribution of what one speculative step
emits; completed token by token from the target, it must equal the target's own distribution of
k + 1 tokens, to rounding, for drafts that are always right, always wrong, random, one-hot, and
with top-k / top-p / min-p warping.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specbound_runtime.acceptance import speculative_accept
from specbound_runtime.policy import decide_exit
from specbound_runtime.sampling import DecodingMode, draft_probabilities, full_vocabulary, prompt_seed, sample_index

V = 4
PREFIX = (1, 2)


def _logits(prefix: tuple, salt: int, width: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((salt,) + prefix) % (2**31))
    return torch.randn(width, generator=g, dtype=torch.float64) * 1.5


def _warped(logits: torch.Tensor, warpers, prefix) -> torch.Tensor:
    scores = logits.float()[None]
    if warpers:
        scores = LogitsProcessorList(warpers)(torch.tensor([list(prefix)]), scores)
    return torch.softmax(scores[0].double(), -1)


class Toy:
    """A target p(. | prefix) and a drafter q(. | prefix) over V tokens."""

    def __init__(self, kind: str, warpers=()):
        self.kind = kind
        self.warpers = list(warpers)

    def p(self, prefix) -> torch.Tensor:
        return _warped(_logits(prefix, 0), self.warpers, prefix)

    def q(self, prefix) -> torch.Tensor:
        p = self.p(prefix)
        if self.kind == "always-right":
            return p.clone()
        if self.kind == "always-wrong":  # all of q's mass where p has none (needs a warped p)
            q = (p == 0).double()
            return q / q.sum()
        if self.kind == "one-hot":  # a deterministic proposal (prompt lookup): here p's least likely token
            token = torch.where(p > 0, p, torch.tensor(2.0, dtype=p.dtype)).argmin()
            return torch.nn.functional.one_hot(token, V).double()
        if self.kind == "random":
            return _warped(_logits(prefix, 1), (), prefix)
        if self.kind == "shortlist":  # the exit head's path: short-list logits, the same warpers
            columns = torch.tensor([0, 1, 3])
            processors = LogitsProcessorList(self.warpers)
            q = draft_probabilities(_logits(prefix, 2, 3).float(), processors, torch.tensor([list(prefix)]), columns, V)
            return full_vocabulary(q, columns, V).double()
        raise ValueError(self.kind)


def _cells(points) -> list[tuple[float, float]]:
    edges = np.unique(np.clip(np.concatenate([[0.0, 1.0], np.asarray(points, dtype=np.float64)]), 0.0, 1.0))
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b - a > 1e-12]


def _cdf_points(row: torch.Tensor) -> list[float]:
    total = float(row.sum())
    return [] if total <= 0 else (torch.cumsum(row, 0) / total).tolist()


def step_distribution(toy: Toy, k: int, accept_fn=speculative_accept) -> dict[tuple, float]:
    """The exact distribution of the tokens one speculative step emits after PREFIX."""
    out: dict[tuple, float] = defaultdict(float)
    for drafts in itertools.product(range(V), repeat=k):
        q_rows = [toy.q(PREFIX + drafts[:i]) for i in range(k)]
        weight = float(np.prod([float(q_rows[i][drafts[i]]) for i in range(k)]))
        if weight == 0.0:
            continue
        p_rows = torch.stack([toy.p(PREFIX + drafts[:i]) for i in range(k + 1)])
        q = torch.stack(q_rows) if k else torch.zeros(0, V, dtype=torch.float64)
        ratios = [float(p_rows[i, drafts[i]] / q[i, drafts[i]]) for i in range(k)]
        final_points = [x for i in range(k + 1) for x in _cdf_points(p_rows[i])]
        final_points += [x for i in range(k) for x in _cdf_points((p_rows[i] - q[i]).clamp(min=0))]
        for accept_cells in itertools.product(*[_cells([r]) for r in ratios]):
            for cell in _cells(final_points):
                outcomes = []
                for f in (1 / 3, 2 / 3):
                    u = [a + f * (b - a) for a, b in accept_cells] + [cell[0] + f * (cell[1] - cell[0])]
                    acc = accept_fn(torch.tensor(drafts, dtype=torch.long), q, p_rows, torch.tensor(u, dtype=torch.float64))
                    outcomes.append(tuple(drafts[: acc.accepted_length]) + (acc.next_token,))
                assert outcomes[0] == outcomes[1], "the output changes inside a cell: the enumeration would be inexact"
                volume = float(np.prod([b - a for a, b in accept_cells])) * (cell[1] - cell[0])
                out[outcomes[0]] += weight * volume
    return dict(out)


def completed(toy: Toy, emitted: dict[tuple, float], length: int) -> dict[tuple, float]:
    """Continue every emitted sequence token by token from the target up to `length` tokens."""
    out: dict[tuple, float] = defaultdict(float)
    frontier = list(emitted.items())
    while frontier:
        seq, prob = frontier.pop()
        if len(seq) == length:
            out[seq] += prob
            continue
        p = toy.p(PREFIX + seq)
        frontier += [(seq + (t,), prob * float(p[t])) for t in range(V) if p[t] > 0]
    return dict(out)


def target_distribution(toy: Toy, length: int) -> dict[tuple, float]:
    return completed(toy, {(): 1.0}, length)


def _assert_same(a: dict, b: dict, tol: float = 1e-9) -> None:
    keys = set(a) | set(b)
    worst = max(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in keys)
    assert worst < tol, f"largest probability difference {worst:.3g}"


WARPINGS = {
    "plain": (),
    "top-k": (TemperatureLogitsWarper(0.7), TopKLogitsWarper(2)),
    "top-p": (TopPLogitsWarper(0.8),),
    "min-p": (TemperatureLogitsWarper(1.3), MinPLogitsWarper(0.3)),
}


@pytest.mark.parametrize(
    "kind,warping,k",
    [
        ("always-right", "plain", 2),
        ("always-right", "top-p", 3),
        ("always-wrong", "top-k", 2),
        ("random", "plain", 2),
        ("random", "top-k", 2),
        ("random", "top-p", 3),
        ("random", "min-p", 2),
        ("one-hot", "plain", 2),
        ("one-hot", "top-p", 2),
        ("shortlist", "top-k", 2),
        ("shortlist", "top-p", 2),
        ("random", "plain", 0),
    ],
)
def test_one_speculative_step_emits_exactly_the_target_distribution(kind, warping, k):
    toy = Toy(kind, WARPINGS[warping])
    emitted = step_distribution(toy, k)
    assert sum(emitted.values()) == pytest.approx(1.0, abs=1e-9)
    _assert_same(completed(toy, emitted, k + 1), target_distribution(toy, k + 1))
    lengths = defaultdict(float)
    for seq, prob in emitted.items():
        lengths[len(seq) - 1] += prob
    if kind == "always-right":  # q = p: every draft is accepted
        assert lengths[k] == pytest.approx(1.0)
    if kind == "always-wrong":  # q has no mass where p has any: nothing is accepted
        assert lengths[0] == pytest.approx(1.0)
    if kind in ("random", "one-hot", "shortlist") and k:
        assert 0.0 < lengths[0] < 1.0  # some drafts accepted, some rejected: the residual path is exercised


def test_acceptance_rate_of_one_draft_is_one_minus_total_variation():
    toy = Toy("random", WARPINGS["top-p"])
    emitted = step_distribution(toy, 1)
    accepted = sum(prob for seq, prob in emitted.items() if len(seq) == 2)
    p, q = toy.p(PREFIX), toy.q(PREFIX)
    assert accepted == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-12)


def _draw_from_p_on_rejection(draft_tokens, q, p, u):
    from specbound_runtime.acceptance import Acceptance

    k = len(draft_tokens)
    n = 0
    while n < k and u[n] * q[n, draft_tokens[n]] < p[n, draft_tokens[n]]:
        n += 1
    return Acceptance(n, int(sample_index(p[n], u[k])), k)


def test_the_enumeration_sees_a_biased_rule():
    toy = Toy("random", ())
    emitted = step_distribution(toy, 2, accept_fn=_draw_from_p_on_rejection)
    assert sum(emitted.values()) == pytest.approx(1.0, abs=1e-9)
    want = target_distribution(toy, 3)
    got = completed(toy, emitted, 3)
    assert max(abs(got.get(s, 0) - want.get(s, 0)) for s in want) > 1e-3


def test_sample_index_draws_each_index_with_its_probability_and_never_a_zero():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    mass = defaultdict(float)
    for a, b in _cells(_cdf_points(probs.double())):
        i, j = (int(sample_index(probs, torch.tensor(a + f * (b - a), dtype=torch.float64))) for f in (1 / 3, 2 / 3))
        assert i == j
        mass[i] += b - a
    assert dict(mass) == pytest.approx({1: 0.2, 3: 0.5, 4: 0.3})
    # unnormalised weights work the same; the top of [0, 1) stays inside
    assert int(sample_index(probs * 7, torch.tensor(1 - 2**-53, dtype=torch.float64))) == 4
    assert int(sample_index(probs, torch.tensor(0.0, dtype=torch.float64))) == 1


def test_one_host_read_per_verification(monkeypatch):
    from specbound_runtime import acceptance

    reads = []
    real = acceptance.read
    monkeypatch.setattr(acceptance, "read", lambda t: reads.append(1) or real(t))
    toy = Toy("random", ())
    p = torch.stack([toy.p(PREFIX), toy.p(PREFIX + (0,)), toy.p(PREFIX + (0, 1))])
    q = torch.stack([toy.q(PREFIX), toy.q(PREFIX + (0,))])
    out = speculative_accept(torch.tensor([0, 1]), q, p, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert len(reads) == 1 and 0 <= out.accepted_length <= 2 and out.trusted
    with pytest.raises(ValueError, match="2 draft rows"):
        speculative_accept(torch.tensor([0, 1]), q[:1], p, torch.tensor([0.1, 0.2, 0.3]))


def test_non_finite_target_rows_are_not_trusted():
    p = torch.tensor([[0.5, 0.5, 0, 0], [float("nan")] * 4])
    q = torch.tensor([[1.0, 0, 0, 0]])
    out = speculative_accept(torch.tensor([0]), q, p, torch.tensor([0.1, 0.5], dtype=torch.float64), torch.tensor([True, False]))
    assert out.accepted_length == 1 and not out.trusted


def test_sampled_exit_decision_keeps_the_confidence_rule_and_draws_from_q():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    q = torch.softmax(logits / 0.7, -1)
    for threshold in (0.3, 0.9):
        greedy = decide_exit(logits, 1.0, threshold)
        drawn = [decide_exit(logits, 1.0, threshold, q, torch.tensor(u, dtype=torch.float64)) for u in (0.0, 0.8, 0.995)]
        assert all(d.exits == greedy.exits and d.confidence == greedy.confidence for d in drawn)
        assert [d.token for d in drawn] == [0, 1, 3]
    broken = decide_exit(logits, 1.0, 0.0, torch.full((4,), float("nan")), torch.tensor(0.5, dtype=torch.float64))
    assert not broken.exits  # a q without mass never drafts


def test_decoding_mode_requests_resolves_and_round_trips():
    from transformers import GenerationConfig

    assert DecodingMode.sampling() == DecodingMode() and not DecodingMode.sampling(temperature=0).do_sample
    mode = DecodingMode.sampling(temperature=0.7, top_p=0.9)
    assert mode.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert DecodingMode.from_json(mode.to_json()) == mode
    resolved = DecodingMode.resolved(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50))
    assert (resolved.temperature, resolved.top_k, resolved.top_p, resolved.min_p) == (0.7, 50, 0.9, None)
    assert DecodingMode.resolved(GenerationConfig(do_sample=False, temperature=0.7)) == DecodingMode()
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5)):
        with pytest.raises(ValueError):
            DecodingMode.sampling(**bad)
    with pytest.raises(ValueError, match="greedy"):
        DecodingMode.sampling(temperature=0, top_p=0.9)
    assert prompt_seed(3, 0) == prompt_seed(3, 0) != prompt_seed(3, 1) != prompt_seed(4, 1)

"""Losslessness at the extremes, on token ids, against transformers' own greedy decoding."""

from __future__ import annotations

import random

import pytest
import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.policy import ExitPolicy
from tiny_models import ARCHITECTURES, ScriptedDrafter, greedy_reference, tiny_model

PROMPTS = ([7], [5, 9, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12])
NEW_TOKENS = 40


def _policy(num_layers, threshold, d_max, w_max, temperatures=None, lookup=(0, 0)):
    layers = tuple(range(1, num_layers))
    temps = temperatures or (1.0,) * len(layers)
    return ExitPolicy(num_layers, layers, temps, (threshold,) * len(layers), d_max, w_max, *lookup)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    model = tiny_model(request.param)
    refs = {tuple(p): greedy_reference(model, p, NEW_TOKENS, eos_token_id=None) for p in PROMPTS}
    return model, HFCausalLM(model), refs


@pytest.mark.parametrize("prompt", PROMPTS, ids=["one-token", "twelve-tokens"])
def test_plain_decoding_through_engine_matches_generate(arch, prompt):
    model, lm, refs = arch
    result = generate(lm, prompt, NEW_TOKENS, NoDrafter())
    assert list(result.token_ids) == refs[tuple(prompt)]
    assert result.mean_accepted_length == 1.0
    assert result.verify_passes == NEW_TOKENS


@pytest.mark.parametrize("prompt", PROMPTS, ids=["one-token", "twelve-tokens"])
@pytest.mark.parametrize(
    "threshold,d_max,w_max",
    [(0.0, 1, 1), (0.0, 3, 4), (0.0, 5, 8), (1.0, 5, 4), (0.2, 2, 3), (0.2, 5, 2), (0.5, 4, 16)],
    ids=["first-check-w1", "first-check-w4", "first-check-w8", "never-exit", "t.2-d2", "t.2-w2", "t.5-w16"],
)
def test_early_exit_policies_match_generate(arch, prompt, threshold, d_max, w_max):
    model, lm, refs = arch
    policy = _policy(lm.num_layers, threshold, d_max, w_max)
    result = generate(lm, prompt, NEW_TOKENS, Speculator.for_policy(policy))
    assert list(result.token_ids) == refs[tuple(prompt)]
    if threshold == 0.0:
        # every draft exits at the first check layer
        assert result.drafted > 0 and set(result.exit_layers) == {1}
    if threshold == 1.0:
        # nothing is confident enough to exit: no drafts, one token per verification pass
        assert result.drafted == 0 and result.exit_layers == ()
        assert set(result.accept_lengths) == {1}
    assert all(a <= w_max + 1 for a in result.accept_lengths)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["one-token", "twelve-tokens"])
@pytest.mark.parametrize("right_rate", [1.0, 0.0, 0.7], ids=["always-right", "always-wrong", "random"])
@pytest.mark.parametrize("width", [1, 3, 7])
def test_scripted_drafts_at_random_depths_match_generate(arch, prompt, right_rate, width):
    model, lm, refs = arch
    ref = refs[tuple(prompt)]
    drafter = ScriptedDrafter(ref, len(prompt), right_rate, width, seed=width)
    result = generate(lm, prompt, NEW_TOKENS, drafter)
    assert list(result.token_ids) == ref
    if right_rate == 1.0:
        assert result.accepted == result.drafted > 0
        assert result.mean_accepted_length > 1.0
    if right_rate == 0.0:
        assert result.accepted == 0 and result.drafted > 0


@pytest.mark.parametrize("lookup", [(1, 3), (2, 8), (3, 1)], ids=["n1-m3", "n2-m8", "n3-m1"])
@pytest.mark.parametrize("threshold", [0.0, 1.0, 0.3])
def test_prompt_lookup_with_early_exit_matches_generate(arch, lookup, threshold):
    model, lm, refs = arch
    policy = _policy(lm.num_layers, threshold, 4, 8, lookup=lookup)
    looked_up = 0
    repetitive = [9, 10, 11, 12, 13, 9, 10, 11]  # "9 10 11" recurs: lookup proposes 12 13 ...
    for prompt in (*PROMPTS, repetitive):
        ref = refs.get(tuple(prompt)) or greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=None)
        result = generate(lm, prompt, NEW_TOKENS, Speculator.for_policy(policy))
        assert list(result.token_ids) == ref
        looked_up += result.exit_layers.count(0)
    if lookup[0] == 1:  # any repeated token triggers a unigram lookup
        assert looked_up > 0


def test_random_temperatures_and_thresholds_match_generate(arch):
    model, lm, refs = arch
    rng = random.Random(0)
    for trial in range(4):
        temps = tuple(rng.uniform(0.2, 5.0) for _ in range(lm.num_layers - 1))
        policy = _policy(lm.num_layers, rng.uniform(0.0, 0.6), rng.randrange(1, 6), rng.randrange(1, 6), temps)
        for prompt in PROMPTS:
            result = generate(lm, prompt, NEW_TOKENS, Speculator.for_policy(policy))
            assert list(result.token_ids) == refs[tuple(prompt)]


@pytest.mark.parametrize("stop_at", [0, 6])
def test_generation_that_hits_eos_stops_like_generate(arch, stop_at):
    model, lm, refs = arch
    prompt = list(PROMPTS[1])
    eos = refs[tuple(prompt)][stop_at]
    ref = greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=eos)
    assert ref[-1] == eos and len(ref) <= stop_at + 1
    for drafter in (
        NoDrafter(),
        Speculator.for_policy(_policy(lm.num_layers, 0.0, 3, 4), eos_token_ids=frozenset({eos})),
        ScriptedDrafter(refs[tuple(prompt)], len(prompt), 1.0, 5, seed=1),
    ):
        result = generate(lm, prompt, NEW_TOKENS, drafter, eos_token_ids=[eos])
        assert list(result.token_ids) == ref


def test_max_new_tokens_is_respected_with_wide_drafts(arch):
    model, lm, refs = arch
    prompt = list(PROMPTS[1])
    for n in (1, 2, 5):
        drafter = ScriptedDrafter(refs[tuple(prompt)], len(prompt), 1.0, 16, seed=0)
        result = generate(lm, prompt, n, drafter)
        assert list(result.token_ids) == refs[tuple(prompt)][:n]


def test_shallow_work_is_never_redone():
    """Verification runs each pending position only through the layers it has not yet seen."""
    model = tiny_model("llama")
    calls = []

    class CountingLM(HFCausalLM):
        def run_layer(self, layer, hidden, start, cache):
            calls.append((layer, start, hidden.shape[1]))
            return super().run_layer(layer, hidden, start, cache)

    lm = CountingLM(model)
    prompt = [5, 6, 7]
    ref = greedy_reference(model, prompt, 12, eos_token_id=None)
    result = generate(lm, prompt, 12, ScriptedDrafter(ref, len(prompt), 1.0, 3, seed=0))
    assert list(result.token_ids) == ref
    # every (layer, position) pair is computed exactly once: nothing is recomputed, and since
    # every draft is right, nothing is thrown away either
    seen = [(layer, start + i) for layer, start, k in calls for i in range(k)]
    assert len(seen) == len(set(seen))
    positions = len(prompt) + len(ref) - 1
    assert len(seen) == lm.num_layers * positions

"""Per-token draft sources: the engine reports which drafter proposed every drafted and every
accepted token, on a tiny in-process model."""

from __future__ import annotations

import pytest

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.policy import ExitPolicy
from tiny_models import ScriptedDrafter, greedy_reference, tiny_model

NEW_TOKENS = 30
PROMPT = [5, 9, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12]


@pytest.fixture(scope="module")
def tiny(one_thread):
    model = tiny_model("llama")
    return model, HFCausalLM(model), greedy_reference(model, PROMPT, NEW_TOKENS, eos_token_id=None)


class LabelledDrafter(ScriptedDrafter):
    """ScriptedDrafter that names each draft "right" or "wrong" by whether it is the reference's
    token at its place: only "right" drafts can ever be accepted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pushed: list[str] = []  # every label pushed, in order

    def draft(self, seq, budget: int) -> None:
        push = seq.push_draft

        def labelled(token, exit_layer, probs=None, source=None):
            index = len(seq.tokens) - self.prompt_len + len(seq.drafts)
            label = "right" if token == self.continuation[index] else "wrong"
            self.pushed.append(label)
            push(token, exit_layer, probs, source=label)

        seq.push_draft = labelled
        try:
            super().draft(seq, budget)
        finally:
            del seq.push_draft


@pytest.mark.parametrize("right_rate", [1.0, 0.0, 0.6], ids=["always-right", "always-wrong", "random"])
def test_every_drafted_and_accepted_token_carries_its_drafters_label(tiny, right_rate):
    model, lm, ref = tiny
    drafter = LabelledDrafter(ref, len(PROMPT), right_rate, 4, seed=3)
    result = generate(lm, PROMPT, NEW_TOKENS, drafter)
    assert list(result.token_ids) == ref
    assert result.drafted_sources == tuple(drafter.pushed)  # one label per drafted token, in order
    assert len(result.accepted_sources) == result.accepted
    assert set(result.accepted_sources) <= {"right"}  # a wrong draft is never accepted
    if right_rate == 1.0:
        assert result.accepted_sources == result.drafted_sources and result.accepted > 0
    if right_rate == 0.0:
        assert result.accepted_sources == () and "wrong" in result.drafted_sources
    if right_rate == 0.6:  # some right drafts follow a wrong one in their pass: rejected with it
        assert 0 < result.accepted < result.drafted_sources.count("right")


def test_the_paper_drafter_labels_lookup_and_early_exit_drafts(tiny):
    model, lm, _ = tiny
    repetitive = [9, 10, 11, 12, 13, 9, 10, 11, 12, 13, 9, 10, 11]
    ref = greedy_reference(model, repetitive, NEW_TOKENS, eos_token_id=None)
    # unigram lookup (up to 3 tokens), then an exit at layer 1 for every other draft
    policy = ExitPolicy(6, (1,), (1.0,), (0.0,), 3, 6, 1, 3)
    result = generate(lm, repetitive, NEW_TOKENS, Speculator.for_policy(policy))
    assert list(result.token_ids) == ref
    assert len(result.drafted_sources) == result.drafted == len(result.exit_layers)
    expected = tuple("lookup" if layer == 0 else "early-exit" for layer in result.exit_layers)
    assert result.drafted_sources == expected
    assert {"lookup", "early-exit"} <= set(result.drafted_sources)
    assert len(result.accepted_sources) == result.accepted

"""Drafters as parts: a new draft source is one class, composed with the others without editing
them, and replayed by the same simulator; verification takes chains and refuses trees."""

from __future__ import annotations

import numpy as np
import pytest

from specbound.calibrate.simulate import CostModel, Exits, Replay, simulate
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.drafters import EarlyExit, Proposal, PromptLookup, Speculator
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.policy import ExitPolicy
from tiny_models import greedy_reference, tiny_model

NEW_TOKENS = 30
PROMPT = [5, 9, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12]
COST = CostModel(num_layers=6, layer_base=1.0, layer_extra=0.1, head_base=1.0, head_extra=0.1, check=0.1, round_overhead=0.2)


class RepeatLast:
    """A source no one wrote the engine for: it proposes the last committed token, `width` times."""

    source = "repeat"

    def __init__(self, width: int) -> None:
        self.width = width

    def propose(self, state, limit):
        return Proposal.chain([state.tokens[-1]] * min(self.width, limit), self.source)


def repeat_replay(ids: list[int], start: int, width: int) -> Replay:
    """RepeatLast replayed over a recorded sequence: row p is a round that starts after ids[start + p]."""
    rows = len(ids) - start
    proposed = np.full(rows, width)
    right = np.zeros(rows, np.int64)
    for p in range(rows):
        last, k = ids[start + p], 0
        while k < width and start + p + 1 + k < len(ids) and ids[start + p + 1 + k] == last:
            k += 1
        right[p] = k
    return Replay("repeat", proposed, right)


@pytest.fixture(scope="module")
def tiny(one_thread):
    model = tiny_model("llama", seed=5)
    return model, HFCausalLM(model)


@pytest.mark.parametrize("prompt", [PROMPT, [7, 7, 7, 7, 8, 8, 8, 8, 7, 7]], ids=["varied", "repetitive"])
def test_a_new_source_plugs_in_and_the_simulator_replays_it_unchanged(tiny, prompt):
    model, lm = tiny
    ref = greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=None)
    result = generate(lm, prompt, NEW_TOKENS, Speculator((RepeatLast(3),), None, w_max=3))
    assert list(result.token_ids) == ref  # any source: verification keeps the output exact
    assert set(result.drafted_sources) == {"repeat"} and result.drafted > 0
    ids = prompt + ref
    n = len(ref) + 1  # rows: the prompt's last token, then each generated one
    none = Exits(layer=np.full(n, -1), right=np.zeros(n, bool), checks=np.zeros(n, np.int64))
    sim = simulate(none, [(0, n - 1)], COST, 6, 3, [repeat_replay(ids, len(prompt) - 1, 3)])
    assert (sim.rounds, sim.drafted, sim.accepted) == (result.verify_passes, result.drafted, result.accepted)


def test_sources_open_a_round_in_order_and_early_exit_drafts_on(tiny):
    """The first no-layer source that proposes opens the round; the one after it is not asked;
    early exit fills the round up to the width bound."""
    model, lm = tiny
    asked = []

    class Asked(RepeatLast):
        def propose(self, state, limit):
            asked.append(len(state.drafts))
            return super().propose(state, limit)

    policy = ExitPolicy(6, (2,), (1.0,), (0.0,), 2, 4, lookup_ngram=1, lookup_max=1)  # exits at layer 2 always
    prompt = [5, 9, 5, 9, 5, 20, 30, 5, 9]
    ref = greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=None)
    speculator = Speculator((PromptLookup(policy), Asked(1)), EarlyExit(policy), w_max=4)
    result = generate(lm, prompt, NEW_TOKENS, speculator)
    assert list(result.token_ids) == ref
    lookups = result.drafted_sources.count("lookup")
    assert lookups > 0 and asked and all(d == 0 for d in asked)  # asked only in rounds lookup left empty
    # every round after the prefill has one opener (a last round with no room drafts nothing)
    assert result.verify_passes - 2 <= len(asked) + lookups <= result.verify_passes - 1
    assert result.drafted_sources.count("early-exit") > 0


def test_a_tree_proposal_is_refused_clearly(tiny):
    _, lm = tiny

    class Branching:
        source = "tree"

        def propose(self, state, limit):
            return Proposal((3, 4), (-1, -1), self.source, (0, 0))  # two children of the root

    with pytest.raises(ValueError, match="tree proposed a tree .*chains only"):
        generate(lm, PROMPT, 5, Speculator((Branching(),), None, w_max=2))
    assert Proposal.chain([3, 4, 5], "x").is_chain and not Proposal((3, 4), (-1, -1), "x", (0, 0)).is_chain


def test_a_policy_composes_the_sources_it_names(tiny):
    model, lm = tiny
    policy = ExitPolicy(6, (3,), (1.0,), (0.5,), 3, 3, lookup_ngram=2, lookup_max=2)
    speculator = Speculator.for_policy(policy)
    assert [s.source for s in speculator.opening] == ["lookup"] and speculator.extending.source == "early-exit"
    plain = Speculator.for_policy(ExitPolicy(6, (), (), (), 6, 1))
    assert plain.opening == () and plain.extending is None
    ref = list(generate(lm, PROMPT, NEW_TOKENS, NoDrafter()).token_ids)
    assert list(generate(lm, PROMPT, NEW_TOKENS, plain).token_ids) == ref

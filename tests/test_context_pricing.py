"""Per-context pricing: each round's layer calls, and each plain step they stand for, priced at the
context the round reads (a long prompt makes every layer call dearer through attention)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specbound.calibrate import collect as C
from specbound.calibrate.simulate import CostModel, Exits, simulate

L = 6
COST = CostModel(L, layer_base=1.0, layer_extra=0.15, head_base=2.0, head_extra=0.3, check=0.1, round_overhead=0.5)


def _replay(n: int = 300, seed: int = 4) -> tuple[Exits, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    exits = Exits(layer=rng.choice([-1, 2, 3], n), right=rng.random(n) < 0.7, checks=rng.integers(1, 3, n))
    return exits, [(0, 150), (150, n)]


def test_without_slopes_or_contexts_a_replay_is_priced_as_before():
    exits, bounds = _replay()
    before = simulate(exits, bounds, COST, 3, 4)
    contexts = np.arange(len(exits.layer)) + 900
    assert simulate(exits, bounds, COST, 3, 4, contexts=contexts) == before  # the cost model prices no contexts
    flat = COST.with_context(256, (0.0,) * 4)
    priced = simulate(exits, bounds, flat, 3, 4, contexts=contexts)
    assert priced.speedup == pytest.approx(before.speedup, rel=1e-12)
    assert "call_contexts" not in before.to_dict() and "call_contexts" in priced.to_dict()


def test_only_the_context_priced_gives_layer_calls_per_token():
    """A cost model where nothing costs but context (1 ms per token of context per layer call, at
    any width), every round at the same context: plain decoding makes L calls a token, the replay
    layer_calls in all, so the speedup is L * tokens / layer_calls whatever the context."""
    exits, bounds = _replay()
    only = CostModel(L, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, context=1, context_slopes=(1.0,) * 4)
    for c in (10, 1000):
        r = simulate(exits, bounds, only, 3, 4, contexts=np.full(len(exits.layer), c + 1))
        assert r.speedup == pytest.approx(L * r.tokens / r.layer_calls, rel=1e-12)
        assert r.cost_ms == pytest.approx(c * r.layer_calls, rel=1e-12)


def test_a_long_context_prices_a_replay_by_its_layer_calls():
    """At a long context attention dominates every layer call, so a replay's speedup tends to
    L * tokens / layer_calls: drafts that cost no layers (always right here) gain, early exit
    that climbs layers for its drafts gains less; plain decoding stays exactly 1.0."""
    from specbound.calibrate.simulate import Replay

    exits, bounds = _replay()
    n = len(exits.layer)
    priced = COST.with_context(256, (0.002,) * 4)
    none = Exits(np.full(n, -1), np.zeros(n, bool), np.zeros(n, np.int64))
    free = [Replay("lookup", np.full(n, 3), np.full(n, 3))]
    for drafts, extra in ((exits, []), (none, free)):
        short, long = (simulate(drafts, bounds, priced, 3, 4, extra, contexts=np.full(n, c)) for c in (256, 20000))
        assert short.speedup == pytest.approx(simulate(drafts, bounds, COST, 3, 4, extra).speedup, rel=1e-12)
        limit = L * long.tokens / long.layer_calls
        assert abs(long.speedup - limit) < abs(short.speedup - limit)
        # repriced under another cost model, the counted contexts go with it
        assert long.speedup_under(priced) == pytest.approx(long.speedup, rel=1e-12)
        assert long.speedup_under(COST) == pytest.approx(short.speedup, rel=1e-12)
    assert long.speedup > short.speedup > 1.0  # free drafts: a long prompt makes them pay more
    assert simulate(none, bounds, priced, 3, 4, contexts=np.full(n, 4096)).speedup == pytest.approx(1.0, rel=1e-12)


def test_records_know_each_positions_context():
    seqs = [C.RecordedSequence("a", False, True, tuple(range(10)), 4), C.RecordedSequence("b", False, True, tuple(range(7)), 2)]
    k = [6, 5]  # rows: from the prompt's last token to the end
    n = sum(k)
    records = C.Records(
        np.repeat([0, 1], k).astype(np.int32), np.zeros(n, bool), np.ones(n, bool), np.zeros(n, np.int32),
        np.zeros((n, 1, 0), bool), np.zeros((n, 1, 0, 1), np.float32), (),
    )
    assert C.with_contexts(records, seqs).context.tolist() == [4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6]
    assert C.with_contexts(records, seqs).select(np.arange(n) >= 6).context.tolist() == [2, 3, 4, 5, 6]


def test_a_cost_model_with_slopes_round_trips_and_is_checked():
    priced = COST.with_context(256, (0.001, 0.002))
    assert CostModel(**priced.to_dict()) == dataclasses.replace(priced, context_slopes=(0.001, 0.002))
    assert "context" not in COST.to_dict()  # a cost model without them is written as before
    assert priced.pass_ms(1, 1256) == pytest.approx(priced.pass_ms(1) + L * 0.001 * 1000)
    with pytest.raises(ValueError, match="context_slopes"):
        CostModel(L, 1, 0, 1, 0, 0, 0, context_slopes=(0.1,))  # slopes without the context they start from


def test_measured_costs_price_contexts_on_a_tiny_model(one_thread):
    """The measurement times each width again at a longer context (as long as the model holds)."""
    from specbound.calibrate.costs import measure_costs
    from specbound_runtime.adapter import HFCausalLM
    from tiny_models import tiny_model

    model = tiny_model("llama")
    cost = measure_costs(HFCausalLM(model), 16, context=64, repeats=1, rounds=1)
    assert cost.context == 64 and len(cost.context_slopes) == len(cost.layer_widths)
    assert all(s >= 0 for s in cost.context_slopes)
    assert measure_costs(HFCausalLM(model), 16, context=64, repeats=1, rounds=1, far=None).context_slopes == ()

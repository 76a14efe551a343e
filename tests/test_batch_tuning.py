"""Batches in calibration: what a shared pass costs by rows and positions (measured, and priced
from the measurement), the batch simulator against the batch engine, and the tuner's draft bound
for 1, 4 and 16 rows with the rule the runtime applies between and beyond them."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from specbound.calibrate import costs as costs_module
from specbound.calibrate.batches import tune_batches
from specbound.calibrate.simulate import Replay, simulate_batch
from specbound.calibrate.space import no_exit_candidate
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.batch import generate_batch
from specbound_runtime.batch_policy import BatchPolicy, PassPrices, predicted_speedup, round_width
from specbound_runtime.engine import NoDrafter
from test_batch import ScriptedRows, _prompts
from test_never_slower import COST, L, SCHEDULES, _records
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# a knee: one layer whose call costs the same up to 8 positions, then grows linearly
KNEE = PassPrices(num_layers=1, layer_widths=(10.0,) * 8, head_widths=(0.0,), layer=(10.0, 10 / 8), head=(0.0, 0.0))
FLAT = ((10.0,) * 4, (12.0,) * 4, (20.0,) * 4)  # 1, 4 and 16 rows: extra positions a row cost nothing
DEAR = ((10.0,) * 4, (12.0, 24.0, 36.0, 48.0), (20.0, 40.0, 60.0, 80.0))  # each position a row costs a whole pass


def _lookup_policy(w_max: int = 3):
    return no_exit_candidate(L, w_max=w_max, lookup_ngram=2, lookup_max=3).policy(SCHEDULES, COST)


def test_measured_batch_prices_are_used_where_measured_and_interpolated_between():
    measured = PassPrices(KNEE.num_layers, KNEE.layer_widths, KNEE.head_widths, KNEE.layer, KNEE.head, (1, 4, 16), DEAR)
    assert measured.batch_ms(4, 3) == 36.0 and measured.batch_ms(16, 2) == 40.0
    assert measured.batch_ms(8, 2) == pytest.approx(24.0 + (40.0 - 24.0) * 4 / 12)  # linear in rows between sizes
    assert measured.batch_ms(32, 1) == pytest.approx(40.0)  # beyond the largest: proportional to rows
    assert measured.batch_ms(4, 6) == pytest.approx(72.0)  # wider than measured: the last step per position
    # without measured batches: rows x positions through one sequence's widths (the knee)
    assert KNEE.batch_ms(4, 2) == KNEE.pass_ms(8) == 10.0 and KNEE.batch_ms(4, 3) == KNEE.pass_ms(12)
    # the round's width follows what was measured, not the rows x positions guess
    assert round_width([3] * 4, 0.9, KNEE) == 2  # 4 x 2 positions look free under the knee
    assert round_width([3] * 4, 0.9, measured) == 1  # measured: each position a row doubles the pass
    with pytest.raises(ValueError, match="batch"):
        PassPrices(1, (), (), (1.0, 0.0), (0.0, 0.0), (4, 1), ((1.0,), (1.0,)))


def test_the_rule_between_tuned_sizes_interpolates_on_log_rows_and_never_exceeds_its_neighbours():
    rule = BatchPolicy((1, 4, 16), (8, 4, 0))
    assert [rule.width(r) for r in (1, 4, 16, 64)] == [8, 4, 0, 0]
    assert rule.width(2) == 6 and rule.width(8) == 2  # halfway on log2(rows)
    widths = [rule.width(r) for r in range(1, 40)]
    assert widths == sorted(widths, reverse=True)
    assert BatchPolicy.from_metadata({}) is None
    with pytest.raises(ValueError, match="batch sizes"):
        BatchPolicy((4, 16), (1, 0))


def test_the_tuner_drafts_in_batches_where_shared_passes_stay_cheap_and_not_where_they_do_not():
    always_right = _records(lookup_right=3)  # prompt lookup proposes 3 tokens everywhere, all right
    policy = _lookup_policy()
    cheap = tune_batches(always_right, policy, COST.with_batch_passes((1, 4, 16), FLAT))
    assert [t["rows"] for t in cheap["tuned"]] == [1, 4, 16] and cheap["priced_by"] == "measured batch passes"
    assert [t["width"] for t in cheap["tuned"]] == [3, 3, 3]
    assert all(t["predicted_speedup"] > 2.0 for t in cheap["tuned"])  # ~4 tokens a pass for one pass's price
    dear = tune_batches(always_right, policy, COST.with_batch_passes((1, 4, 16), DEAR))
    assert [t["width"] for t in dear["tuned"]] == [3, 0, 0]
    rule = BatchPolicy.from_metadata({"batch_policy": json.dumps(dear)})
    assert (rule.width(1), rule.width(4), rule.width(16)) == (3, 0, 0)
    assert [(c["rows"], c["rule_width"]) for c in dear["checked"]] == [(2, rule.width(2)), (8, 0)]
    assert predicted_speedup({"batch_policy": json.dumps(dear)}, 16) == 1.0
    assert predicted_speedup({"batch_policy": json.dumps(dear), "predicted_speedup": "1.5"}, 1) == 1.5  # one row: the one-sequence engine
    # drafts that are never right do not pay even where width is free
    never_right = tune_batches(_records(lookup_right=0), policy, COST.with_batch_passes((1, 4, 16), FLAT))
    assert [t["width"] for t in never_right["tuned"]] == [0, 0, 0]


@pytest.mark.parametrize("right_rate", [1.0, 0.0])
def test_the_batch_simulator_replays_the_engines_rounds(right_rate):
    """The same drafts (always right, always wrong) through the batch engine on a tiny model and
    through the simulator: the same shared passes, rows per pass, drafts and accepted drafts."""
    model = tiny_model("llama")
    lm = HFCausalLM(model)
    prompts, new = _prompts(4, 5), 20
    plain = generate_batch(lm, prompts, new, NoDrafter, ())
    continuations = [list(r.token_ids) for r in plain.rows]
    flat = PassPrices(1, (1.0,) * 64, (0.0,), (1.0, 0.0), (0.0, 0.0))
    ran = generate_batch(lm, prompts, new, lambda: ScriptedRows(continuations, right_rate, 3, 0), (), prices=flat, adaptive=False)
    assert [list(r.token_ids) for r in ran.rows] == continuations
    positions = len(prompts) * 100
    drafts = Replay("lookup", np.full(positions, 3), np.full(positions, 3 if right_rate else 0))
    sim = simulate_batch([drafts], [(i * 100, i * 100 + new) for i in range(len(prompts))], flat, len(prompts), 3)
    assert (sim.passes, sim.drafted, sim.accepted) == (ran.verify_passes, ran.drafted, ran.accepted)
    assert sim.tokens == sum(r.new_tokens for r in ran.rows)
    assert sim.cost_ms == pytest.approx(sum(flat.batch_ms(rows, 1) for rows in ran.pass_rows))
    still = simulate_batch([drafts], [(i * 100, i * 100 + new) for i in range(len(prompts))], flat, len(prompts), 0)
    assert still.speedup == 1.0 and still.passes == new - 1  # width 0: plain batched decoding


def test_batch_passes_are_measured_and_added_once_to_a_cached_cost_model(tmp_path, monkeypatch):
    from specbound_runtime.fingerprints import fingerprint_model

    model = tiny_model("llama")
    lm = HFCausalLM(model)
    rows, passes = costs_module.batch_passes(lm, context=32, repeats=1, rows=(1, 4), widths=3)
    assert rows == (1, 4) and all(len(p) == 3 and list(p) == sorted(p) for p in passes)
    # a cost model cached before batches were measured keeps its costs and gains the batch passes
    monkeypatch.setattr(costs_module, "measure_costs", lambda *a, **k: COST)
    fp = fingerprint_model(model)
    old = costs_module.cached_costs(lm, fp, 16, tmp_path)
    assert old.batch_rows == ()
    upgraded = costs_module.cached_costs(lm, fp, 16, tmp_path)
    assert upgraded.batch_rows == costs_module.BATCH_ROWS and upgraded.layer_base == COST.layer_base
    monkeypatch.setattr(costs_module, "batch_passes", lambda *a, **k: pytest.fail("measured twice"))
    assert costs_module.cached_costs(lm, fp, 16, tmp_path) == upgraded


@pytest.mark.parametrize("right", [1.0, 0.0])
def test_early_exit_as_a_batch_source_is_priced_and_judged(right):
    """Exits that are always confident: where their drafts are right, early exit in batches
    (partial passes of the drafting rows, then the full shared pass) beats plain batched decoding
    under cheap shared passes; where they are wrong it never pays, and the document says so."""
    from specbound.calibrate.space import Candidate, candidate_exits

    records = _records(right=right)
    candidate = Candidate("plain", "paper", 0.5, (2, 3), 3, 3)
    policy = candidate.policy(SCHEDULES, COST)
    exits = candidate_exits(records, candidate, SCHEDULES, COST)
    doc = tune_batches(records, policy, COST.with_batch_passes((1, 4, 16), FLAT), exits=exits)["early_exit"]
    assert [c["rows"] for c in doc["by_size"]] == [1, 4, 16]
    if right:
        assert doc["pays_at"] == [1, 4, 16] and all(c["with_early_exit"] > 1.5 for c in doc["by_size"])
    else:
        assert doc["pays_at"] == [] and all(c["with_early_exit"] == 1.0 for c in doc["by_size"])
    # where a partial pass costs what a full one does, early exit's drafts cost more than they save
    dear = tune_batches(records, policy, COST.with_batch_passes((1, 4, 16), DEAR), exits=exits)["early_exit"]
    assert 4 not in dear["pays_at"] and 16 not in dear["pays_at"]


@pytest.mark.parametrize("kernels", ["eager", "onednn"])
def test_the_simulator_prices_padded_and_packed_passes_as_the_engine_runs_them(kernels):
    """Rows that draft 0, 1, 2 or 3 tokens a round (always right) under prices where each
    position a row costs: on the fast kernels the engine packs a pass (a row's drafts do not
    widen the others) and keeps drafts that padding would trim; the simulator, told which, makes
    the same rounds."""
    from specbound_runtime.kernels import Kernels

    model = tiny_model("llama")
    lm = HFCausalLM(model, kernels=Kernels(model, kernels))
    assert lm.packs_batches == (kernels == "onednn")
    prompts, new = _prompts(7, 5), 24
    continuations = [list(r.token_ids) for r in generate_batch(lm, prompts, new, NoDrafter, ()).rows]
    widths = [0, 3, 1, 2, 3]
    prices = PassPrices(1, (10.0,), (0.0,), (10.0, 0.0), (0.0, 0.0), (1, 5), ((10.0,) * 6, (20.0, 25.0, 30.0, 35.0, 40.0, 45.0)))
    made = iter(range(len(prompts)))
    ran = generate_batch(
        lm, prompts, new, lambda: ScriptedRows(continuations, 1.0, widths[next(made)], 0), (), prices=prices, adaptive=False
    )
    assert [list(r.token_ids) for r in ran.rows] == continuations
    positions = 100 * len(prompts)
    proposed = np.repeat(np.asarray(widths), 100)
    drafts = Replay("lookup", proposed, proposed)
    bounds = [(i * 100, i * 100 + new) for i in range(len(prompts))]
    sims = {p: simulate_batch([drafts], bounds, prices, len(prompts), 3, packed=p) for p in (False, True)}
    assert sims[True].cost_ms < sims[False].cost_ms and sims[True].drafted > 0  # packed: the positions the rows run
    sim = sims[lm.packs_batches]
    assert (sim.passes, sim.drafted, sim.accepted) == (ran.verify_passes, ran.drafted, ran.accepted)
    assert positions == len(proposed)


def test_a_packed_batch_pass_gives_the_padded_passes_states_on_every_real_position():
    from specbound_runtime.batch import BatchKVCache
    from specbound_runtime.kernels import Kernels

    model = tiny_model("llama")
    lm = HFCausalLM(model, kernels=Kernels(model, "onednn"))
    prompts = _prompts(8, 4)
    lengths = [1, 3, 2, 4]
    ids = torch.randint(4, 100, (4, 4))
    out = {}
    with torch.inference_mode():
        for packed in (False, True):
            cache = BatchKVCache(lm.num_layers, 4, 32)
            width = max(len(p) for p in prompts)
            first = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts])
            lm.batch_pass(lm.embed_rows(first), [0] * 4, cache)
            out[packed] = lm.batch_pass(lm.embed_rows(ids), [width] * 4, cache, lengths if packed else None)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[True][b, :n], out[False][b, :n], rtol=1e-5, atol=1e-5)
        assert (out[True][b, n:] == 0).all()


def test_a_packed_round_keeps_a_lone_rows_drafts_that_a_padded_round_trims():
    prices = PassPrices(1, (10.0,), (0.0,), (10.0, 0.0), (0.0, 0.0), (1, 4), ((10.0,) * 4, (12.0, 16.0, 20.0, 24.0)))
    assert round_width([3, 0, 0, 0], 0.9, prices) == 1  # padded: 4 x 4 positions for 2.4 more tokens
    assert round_width([3, 0, 0, 0], 0.9, prices, packed=True) == 4  # packed: 7 positions
    assert prices.packed_ms(4, 7) == pytest.approx(15.0) and prices.packed_ms(4, 8) == 16.0


def test_one_noisy_timing_is_averaged_with_its_neighbours_not_carried_to_every_wider_width():
    from specbound.calibrate.costs import _monotone

    assert _monotone([10.0, 20.0, 12.0, 13.0]) == pytest.approx([10.0, 15.0, 15.0, 15.0])  # a spike at W=2 is pooled
    assert _monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert _monotone([3.0, 1.0]) == [2.0, 2.0]


@pytest.mark.parametrize("kernels", ["eager", "onednn"])
def test_the_tuner_replays_batch_passes_packed_only_where_the_measuring_engine_packs_them(kernels):
    """The cost model records whether the engine that measured the batch passes packs them (the
    fast kernels) or pads every row to the round's width, and the batch tuner replays the passes
    that way: rows whose drafts differ in length cost less packed, so the two predictions differ,
    and the tuner's is the one of the engine that will run the artifact."""
    from specbound.calibrate.replay import replays
    from specbound.calibrate.simulate import CostModel
    from specbound_runtime.kernels import Kernels

    model = tiny_model("llama")
    lm = HFCausalLM(model, kernels=Kernels(model, kernels))
    measured = costs_module.with_batch_passes(lm, COST, context=16, repeats=1, rows=(1, 4))
    assert measured.batch_packed == lm.packs_batches == (kernels == "onednn")
    assert CostModel(**json.loads(json.dumps(measured.to_dict()))).batch_packed == measured.batch_packed  # kept in the cache file
    records = _records(lookup_right=3)
    records.lookup_proposed[records.seq == 3] = 1  # one row of four drafts 1 token a round, the others 3
    records.lookup_right[records.seq == 3] = 1
    policy = _lookup_policy()
    cost = COST.with_batch_passes((1, 4, 16), ((10.0,) * 4, (12.0, 16.0, 20.0, 24.0), (20.0, 40.0, 60.0, 80.0)), packed=measured.batch_packed)
    tuned = {t["rows"]: t["by_width"] for t in tune_batches(records, policy, cost)["tuned"]}
    free, bounds, prices = replays(records, policy), records.bounds(), cost.pass_prices()
    by_mode = {
        p: round(simulate_batch(free, bounds, prices, 4, 3, policy.guard_costs, cost.check, cost.round_overhead, packed=p).speedup, 4)
        for p in (False, True)
    }
    assert by_mode[True] > by_mode[False]
    assert tuned[4]["3"] == by_mode[lm.packs_batches]

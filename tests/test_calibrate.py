"""Calibration: fitting math by properties, the simulator against the real engine, and the whole
pipeline on a tiny model (byte-identical artifacts, resume after interruption)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import socket

import numpy as np
import pytest
import torch

from specbound.calibrate import collect as C
from specbound.calibrate.fit import (
    TEMPERATURE_GRID, binary_nll, confidence_at, expected_calibration_error, fit_temperature, metrics, ridge_lens,
)
from specbound.calibrate.replay import replays
from specbound.calibrate.simulate import CostModel, Exits, decide_exits, simulate

COST = CostModel(num_layers=6, layer_base=1.0, layer_extra=0.1, head_base=2.0, head_extra=0.2, check=0.3, round_overhead=0.5)


def _grid_conf(logits: torch.Tensor) -> np.ndarray:
    return C._confidences(logits).numpy()


def test_confidence_interpolation_is_exact_on_the_grid_and_monotone():
    torch.manual_seed(0)
    grid = _grid_conf(torch.randn(200, 50) * 3)
    for i, t in enumerate(TEMPERATURE_GRID):
        assert np.allclose(confidence_at(grid, float(t)), grid[:, i], rtol=1e-5)
    values = [confidence_at(grid, t).mean() for t in np.geomspace(0.06, 19, 40)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_fitted_temperature_recovers_the_one_that_generated_the_labels():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    logits = torch.randn(6000, 40) * 2.5
    grid = _grid_conf(logits)
    true_t = 2.7
    y = rng.random(6000) < confidence_at(grid, true_t)
    fitted = fit_temperature(grid, y)
    assert fitted > 0
    assert abs(np.log(fitted) - np.log(true_t)) < 0.15
    # no worse than T = 1 on the data it was fitted to, and better calibrated
    assert binary_nll(confidence_at(grid, fitted), y) <= binary_nll(confidence_at(grid, 1.0), y)
    assert expected_calibration_error(confidence_at(grid, fitted), y) < expected_calibration_error(confidence_at(grid, 1.0), y)


def _sharpen(p: np.ndarray, factor: float) -> np.ndarray:
    """Scale the log-odds: factor > 1 makes confidences overconfident, < 1 underconfident."""
    return 1.0 / (1.0 + np.exp(-factor * np.log(p / (1 - p))))


def test_report_metrics_behave_as_calibration_metrics():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.02, 0.98, 5000)
    y = rng.random(5000) < p  # calibrated by construction
    m = metrics(p, y)
    assert m.count == 5000 and m.agreement == pytest.approx(y.mean())
    assert 0.5 < m.auroc < 1.0 and 0.0 < m.brier < 0.25 and 0.0 < m.nll < np.log(2) and m.ece < 0.03
    # AUROC ranks: any increasing map of the confidences leaves it unchanged; a perfect ranking is 1
    for warped in (p**3, _sharpen(p, 4.0), 0.1 + p / 2):
        assert metrics(warped, y).auroc == pytest.approx(m.auroc, abs=1e-12)
    assert metrics(np.where(y, 0.7, 0.3), y).auroc == 1.0 and metrics(np.where(y, 0.3, 0.7), y).auroc == 0.0
    # mis-calibrating the same ranking, either way, is worse on every calibration measure
    for factor in (0.3, 3.0):
        worse = metrics(_sharpen(p, factor), y)
        assert worse.ece > m.ece and worse.nll > m.nll and worse.brier > m.brier
    # undefined metrics are NaN (None in the report), never an exception
    one_class = metrics(p, np.ones(5000, bool))
    assert np.isnan(one_class.auroc) and one_class.to_dict()["auroc"] is None and np.isfinite(one_class.nll)
    assert all(v is None for k, v in metrics(p[:0], y[:0]).to_dict().items() if k != "count")


def test_temperature_fitted_on_one_split_is_no_worse_on_another():
    torch.manual_seed(4)
    grid = _grid_conf(torch.randn(8000, 40) * 2.5)
    y = np.random.default_rng(4).random(8000) < confidence_at(grid, 0.6)  # the raw confidences are underconfident
    fitted = fit_temperature(grid[:4000], y[:4000])
    held_raw, held_fit = (metrics(confidence_at(grid[4000:], t), y[4000:]) for t in (1.0, fitted))
    assert fitted > 0 and held_fit.nll < held_raw.nll and held_fit.ece < held_raw.ece and held_fit.brier < held_raw.brier


def test_ridge_lens_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8))
    w, b = rng.normal(size=(8, 8)), rng.normal(size=8)
    y = x @ w + b
    x1 = np.concatenate([x, np.ones((2000, 1))], axis=1)
    w_hat, b_hat = ridge_lens(x1.T @ x1, x1.T @ y, lam=1e-6)
    assert np.allclose(w_hat, w, atol=1e-5) and np.allclose(b_hat, b, atol=1e-5)


def test_next_token_head_fit_recovers_a_linear_map_from_exact_moments():
    """The head's ridge map from calibration's exact int64 moments, inputs [state; scale * e]:
    with small embeddings scaled up before rounding, the map (scaled back) is recovered, and the
    moments summed in any split give the same bits."""
    from specbound.calibrate.precision import exact_moments

    rng = np.random.default_rng(2)
    n, H = 3000, 6
    state, emb = rng.normal(size=(n, H)), rng.normal(size=(n, H)) * 0.03  # embeddings ~30x smaller
    w1, w2, b = rng.normal(size=(H, H)), rng.normal(size=(H, H)) * 30, rng.normal(size=H)
    y = state @ w1 + emb @ w2 + b
    scale = 32.0
    x = np.concatenate([state, emb * scale], axis=1)
    gram, cross = exact_moments(x, y)
    w, bias = C.fit_next_head(gram, cross, scale, 1e-9)
    assert np.allclose(w[:H].numpy(), w1, atol=2e-3) and np.allclose(w[H:].numpy(), w2, rtol=2e-3, atol=2e-2)
    assert np.allclose(bias.numpy(), b, atol=2e-3)
    parts = [exact_moments(x[i::3], y[i::3]) for i in range(3)]
    again = C.fit_next_head(sum(g for g, _ in parts), sum(c for _, c in parts), scale, 1e-9)
    assert torch.equal(again[0], w) and torch.equal(again[1], bias)


def test_simulator_without_exits_is_plain_decoding_plus_checks():
    n = 50
    exits = Exits(layer=np.full(n, -1), right=np.zeros(n, bool), checks=np.full(n, 2))
    r = simulate(exits, [(0, n)], COST, d_max=4, w_max=4)
    assert r.tokens == n and r.rounds == n and r.mean_accepted_length == 1.0 and r.drafted == 0
    # every round but the prefill and the last pays two failed checks for its hard token
    assert r.cost_ms == pytest.approx(COST.ar_token * n + 2 * COST.check * (n - 2))
    assert r.speedup < 1.0


def test_simulator_with_perfect_shallow_drafts_accepts_full_width():
    n = 41
    exits = Exits(layer=np.full(n, 2), right=np.ones(n, bool), checks=np.ones(n, int))
    r = simulate(exits, [(0, n)], COST, d_max=2, w_max=4)
    # the prefill, then eight rounds of four accepted drafts plus the full model's token
    assert r.rounds == 1 + 8 and r.tokens == n
    assert r.mean_accepted_length == pytest.approx(41 / 9)
    assert r.acceptance_rate == 1.0 and r.waste == 0.0
    assert r.speedup > 1.5


GUARD = (0.45, 0.7, 0.95)  # what 1, 2, 3 depth-0 drafts cost, in plain steps: dear enough to pause


@pytest.mark.parametrize(
    "lookup, head, guard",
    [(lk, h, False) for lk in [(0, 0), (1, 0), (2, 0), (3, 1)] for h in (False, True)] + [((0, 0), True, True), ((2, 0), True, True)],
    ids=lambda v: {(0, 0): "no-lookup", (1, 0): "unigram-lookup", (2, 0): "bigram-lookup", (3, 1): "trigram-lookup-backing-off"}.get(v, "")
    if isinstance(v, tuple) else ("" if v is False else "next-token-head" if v is True else ""),
)
def test_simulator_matches_the_engine_round_by_round(lookup, head, guard):
    """Replaying recorded statistics gives the same accepted lengths as decoding for real; with
    the next-token head (fitted by calibration's own code on every other answer position, so
    that it is right about every other position and mostly wrong on the rest), the same head
    drafts too; under the run-time guard (the last cases), the same rounds are paused."""
    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.engine import NoDrafter, generate
    from specbound_runtime.drafters import Speculator
    from specbound_runtime.exit_head import ExitHeadWeights
    from specbound_runtime.policy import ExitPolicy
    from tiny_models import tiny_model

    model = tiny_model("llama", seed=3)
    lm_plain = HFCausalLM(model)
    layers = (2, 3, 4)
    prompts = ([5, 9, 20], [40, 41, 42, 43], [7])
    answers = [list(generate(lm_plain, prompt, 40, NoDrafter()).token_ids) for prompt in prompts]
    next_head = None
    if head:  # fitted on every other position of the answers: right there, mostly wrong elsewhere
        from specbound.calibrate.precision import exact_moments

        scale = C.embedding_scale(lm_plain)
        gram = cross = 0
        for prompt, answer in zip(prompts, answers):
            ids = prompt + answer
            with torch.inference_mode():
                x, y = C.head_inputs(lm_plain, ids, lm_plain.layer_states(ids)[0][-1], scale)
            rows = np.arange(len(prompt) - 1, len(x), 2)
            g, c = exact_moments(x[rows], y[rows])
            gram, cross = gram + g, cross + c
        next_head = C.fit_next_head(gram, cross, scale, 1e-6)
    weights = ExitHeadWeights(shortlist=torch.arange(lm_plain.vocab_size), lens={}, next_head=next_head)
    lm = HFCausalLM(model, exit_weights=weights)
    t = float(TEMPERATURE_GRID[8])
    policy = ExitPolicy(
        6, layers, (t,) * 3, (0.08,) * 3, d_max=4, w_max=3, lookup_ngram=lookup[0], lookup_max=3 if lookup[0] else 0,
        head_draft=head, lookup_min=lookup[1], guard_costs=GUARD if guard else (),
    )
    settings = C.CollectSettings(candidate_layers=layers, shortlist_size=lm.vocab_size)
    heads = {name: C.FittedExitHead(weights, lm.normed, lm.lm_head_weight, lm.softcap) for name in C.HEADS}
    simulated, real, paused = [], [], 0
    for p, (prompt, answer) in enumerate(zip(prompts, answers)):
        seq = C.RecordedSequence(f"s{p}", False, True, tuple(prompt + answer), len(prompt) - 1)
        rec = C.record_sequence(lm, heads, seq, layers)
        k = len(rec["final"])
        records = C.with_lookups(
            C.Records(
                np.zeros(k, np.int32), np.zeros(k, bool), np.ones(k, bool), rec["final"], rec["right"], rec["conf"], layers,
                head_right=rec.get("head_right"),
            ),
            [seq],
        )
        exits = decide_exits(rec["conf"][:, 0], rec["right"][:, 0], [0, 1, 2], list(layers), [t] * 3, [0.08] * 3)
        sim = simulate(exits, [(0, k - 1)], COST, policy.d_max, policy.w_max, replays(records, policy), policy.guard_costs)
        result = generate(lm, prompt, 40, Speculator.for_policy(policy))
        if guard:
            free = generate(lm, prompt, 40, Speculator.for_policy(dataclasses.replace(policy, guard_costs=())))
            depth0 = lambda r: sum(r.drafted_sources.count(s) for s in ("lookup", "head"))  # noqa: E731
            paused += depth0(free) - depth0(result)
        assert list(result.token_ids) == answer
        simulated.append(sim)
        real.append(result)
    assert sum(r.drafted for r in real) > 10
    if guard:  # the guard paused a source somewhere: fewer depth-0 drafts than without it
        assert paused > 0
    if head:  # the head drafted, and was both right and wrong
        assert 0 < sum(r.accepted_sources.count("head") for r in real) < sum(r.drafted_sources.count("head") for r in real)
    for sim, result in zip(simulated, real):
        assert sim.rounds == result.verify_passes
        assert sim.accepted == result.accepted
        assert sim.head_reads == result.drafted_sources.count("head")
        # drafts after a wrong one are charged from the true context (the documented approximation)
        assert abs(sim.drafted - result.drafted) <= 0.15 * result.drafted


@pytest.mark.parametrize(
    "rule",
    [(1, 0, 0, 3), (3, 1, 0, 3), (4, 2, 0, 3), (8, 1, 1, 6), (8, 2, 2, 5)],
    ids=["unigram", "trigram-backing-off-to-1", "4-gram-backing-off-to-2", "8-gram-drafts-by-match-from-1", "8-gram-drafts-by-match-from-2"],
)
@pytest.mark.parametrize("guard", [False, True], ids=["", "guarded"])
def test_prompt_lookup_is_replayed_exactly(rule, guard):
    """Lookup drafts once per round from committed tokens, so the replay's rounds are the engine's:
    the same drafts, acceptances and passes, call for call; with drafts sized by the match's
    length (lookup_floor) too."""
    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.engine import NoDrafter, generate
    from specbound_runtime.drafters import Speculator
    from specbound_runtime.policy import ExitPolicy
    from tiny_models import tiny_model

    ngram, lookup_min, floor, m = rule
    model = tiny_model("llama", seed=3)
    lm = HFCausalLM(model)
    costs = tuple(k + 1.5 for k in range(m)) if guard else ()  # dearer than any round can pay: pauses follow
    policy = ExitPolicy(6, (), (), (), d_max=6, w_max=m, lookup_ngram=ngram, lookup_max=m, lookup_min=lookup_min, lookup_floor=floor, guard_costs=costs)
    drafted, widths, unguarded = 0, set(), 0
    for prompt in ([5, 9, 20, 5, 9, 21, 5, 9], [40, 41, 42, 43, 40, 41], [7, 8, 7, 8, 7], [3, 4, 5, 6, 7, 8, 9, 3, 4, 5, 6, 7, 8]):
        answer = list(generate(lm, prompt, 40, NoDrafter()).token_ids)
        seq = C.RecordedSequence("s", False, True, tuple(prompt + answer), len(prompt) - 1)
        n = len(answer) + 1
        records = C.with_lookups(
            C.Records(np.zeros(n, np.int32), np.zeros(n, bool), np.ones(n, bool), np.zeros(n, np.int32),
                      np.zeros((n, 1, 0), bool), np.zeros((n, 1, 0, 1), np.float32), ()),
            [seq],
        )
        free = replays(records, policy)
        none = Exits(layer=np.full(n, -1), right=np.zeros(n, bool), checks=np.zeros(n, np.int64))
        sim = simulate(none, [(0, n - 1)], COST, 6, m, free, costs)
        result = generate(lm, prompt, 40, Speculator.for_policy(policy))
        assert list(result.token_ids) == answer
        assert (sim.rounds, sim.drafted, sim.accepted) == (result.verify_passes, result.drafted, result.accepted)
        drafted += result.drafted
        if guard:  # what the same lookup drafts unguarded
            unguarded += generate(lm, prompt, 40, Speculator.for_policy(dataclasses.replace(policy, guard_costs=()))).drafted
        widths |= {int(w) for w in free[0].proposed if w}
    assert drafted > 0
    if guard:  # it paused lookup: short n-grams match every few rounds, so some pause lands on a match
        assert drafted < unguarded if ngram < 4 else drafted <= unguarded
    if floor:  # the drafts' sizes followed the matches: narrower and wider ones both occurred
        assert min(widths) < m and max(widths) > floor


def test_lookup_match_and_the_recorded_lookup_columns_agree_with_a_naive_backoff_on_random_sequences():
    """The engine's one-scan lookup_match and the recorder's columns (proposed, right, matched size
    per rule) both equal the plain definition: the longest tail, from ngram down to the backoff's
    lowest, that occurred earlier, at its most recent occurrence."""
    from specbound_runtime.policy import lookup_match

    def naive(tokens, ngram, lowest):
        for size in range(ngram, (lowest or ngram) - 1, -1):
            for end in range(len(tokens) - 2, size - 2, -1):
                if tokens[end - size + 1 : end + 1] == tokens[len(tokens) - size :]:
                    return end, size
        return -1, 0

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        ids = [int(x) for x in rng.integers(0, rng.integers(2, 5), size=int(rng.integers(2, 40)))]
        seq = C.RecordedSequence("r", False, True, tuple(ids), 0)
        n = len(ids)
        records = C.with_lookups(
            C.Records(np.zeros(n, np.int32), np.zeros(n, bool), np.ones(n, bool), np.zeros(n, np.int32),
                      np.zeros((n, 1, 0), bool), np.zeros((n, 1, 0, 1), np.float32), ()),
            [seq],
        )
        for g, (ngram, lowest) in enumerate(C.LOOKUP_RULES):
            for p in range(n):
                tokens = ids[: p + 1]
                end, size = naive(tokens, ngram, lowest)
                assert lookup_match(tokens, ngram, lowest) == (end, size)
                cont = tokens[end + 1 : end + 1 + C.LOOKUP_MAX] if size else []
                truth = ids[p + 1 : p + 1 + len(cont)]
                right = next((k for k, (a, b) in enumerate(zip(cont, truth)) if a != b), min(len(cont), len(truth)))
                assert (records.lookup_proposed[p, g], records.lookup_right[p, g], records.lookup_size[p, g]) == (
                    len(cont), right, size
                )
                checked += size > 0
    assert checked > 1000


# A cost model whose layer calls and LM-head reads jump at four positions, as SmolLM2's do on a
# 2-core CPU (the BLAS switches kernels): only pricing each call by its width gets it right.
CLIFF = CostModel(
    num_layers=6, layer_base=1.0, layer_extra=0.1, head_base=2.0, head_extra=0.2, check=0.3, round_overhead=0.5,
    layer_widths=(1.0, 1.1, 1.2, 3.0, 3.1, 3.2), head_widths=(2.0, 2.1, 2.2, 5.0),
)


def test_width_costs_price_each_call_by_what_its_width_measured():
    assert [CLIFF.layer_call(n) for n in (1, 3, 4, 6)] == [1.0, 1.2, 3.0, 3.2]
    assert CLIFF.layer_call(8) == pytest.approx(3.2 + 2 * 0.1)  # past the table: its last entry plus extra
    assert CLIFF.head_call(4) == 5.0 and CLIFF.head_call(5) == pytest.approx(5.2)
    assert CLIFF.ar_token == pytest.approx(6 * 1.0 + 2.0 + 0.5)
    rounds = [
        dict(layer_base=1.0, layer_extra=0.1, head_base=2.0, head_extra=0.2, check=0.3, round_overhead=0.5,
             layer_widths=[1.0, w], head_widths=[2.0, 2.5])
        for w in (1.1, 1.5, 4.0)
    ]
    cost = CostModel.from_rounds(6, rounds)
    assert cost.layer_widths == (1.0, 1.5)  # the median round's width costs
    assert [v.layer_call(2) for v in cost.variants()] == [1.5, 1.1, 1.5, 4.0]  # every round kept
    assert CostModel(**json.loads(json.dumps(cost.to_dict()))) == cost


class _ScriptedDrafter:
    """Drafts the true next token at a recorded exit layer (-1: a hard token), through the
    engine's own DecodeState: so the live engine's rounds are exactly the replay's."""

    def __init__(self, ids, first, layer, d_max, w_max):
        self.ids, self.first, self.layer, self.d_max, self.w_max = ids, first, layer, d_max, w_max

    def draft(self, seq, budget):
        while len(seq.drafts) < min(budget, self.w_max):
            frontier = len(seq.tokens) + len(seq.drafts) - 1
            exit_layer = int(self.layer[frontier - self.first])
            if exit_layer < 0:
                seq.advance_to(self.d_max)
                return
            seq.advance_to(exit_layer)
            seq.push_draft(self.ids[frontier + 1], exit_layer)

    def observe(self, acceptance):
        return None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulator_counts_every_layer_call_and_head_read_by_width_as_the_engine_makes_them(seed):
    """Exit layers varying draft by draft make the engine climb, merge and verify positions in
    calls of many widths (DecodeState.advance_to); the replay counts the same calls and LM-head
    reads, width by width (what it charges for them: the worked example below)."""
    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.engine import NoDrafter, generate
    from tiny_models import tiny_model

    class Counting(HFCausalLM):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls, self.heads = [], []

        def run_layer(self, layer, hidden, start, cache):
            self.calls.append((start, hidden.shape[1]))
            return super().run_layer(layer, hidden, start, cache)

        def final_logits(self, hidden):
            self.heads.append(hidden.shape[1])
            return super().final_logits(hidden)

    model = tiny_model("llama", seed=3)
    lm = Counting(model)
    prompt, n_new, d_max, w_max = [5, 9, 20], 40, 4, 5
    answer = list(generate(HFCausalLM(model), prompt, n_new, NoDrafter()).token_ids)
    rng = np.random.default_rng(seed)
    layer = rng.choice([-1, 2, 3, 4], size=n_new + 1, p=[0.15, 0.35, 0.25, 0.25])
    exits = Exits(layer=layer, right=np.ones(n_new + 1, bool), checks=np.ones(n_new + 1, np.int64))
    sim = simulate(exits, [(0, n_new)], CLIFF, d_max, w_max)

    drafter = _ScriptedDrafter(prompt + answer, len(prompt) - 1, layer, d_max, w_max)
    result = generate(lm, prompt, n_new, drafter)
    assert list(result.token_ids) == answer
    calls = [n for start, n in lm.calls if start != 0] + [1] * 6  # the prefill, priced as one position
    widths = np.bincount(calls, minlength=len(sim.call_widths) + 1)[1:]
    heads = np.bincount(lm.heads[1:] + [1], minlength=len(sim.head_rows) + 1)[1:]
    assert max(calls) >= 4 and len(set(calls)) >= 4  # the cliff and several widths below it were met
    assert sim.rounds == result.verify_passes and sim.drafted == result.drafted
    assert tuple(widths) == sim.call_widths
    assert tuple(heads) == sim.head_rows


def test_a_replay_costs_what_its_calls_cost_worked_by_hand():
    """Seven recorded positions, every draft right at layer 2 (one check each), d_max 2, w_max 4,
    under CLIFF. By hand:
    - the prefill: 6 layer calls over one position (1.0 ms each) and a head read over one (2.0);
    - one drafting round: the token emitted last round and each of four drafts climbs layers 1-2
      on its own before the next is drafted (5 x 2 calls over one position, 4 checks at 0.3),
      then all five climb layers 3-6 together (4 calls over five positions: 3.1 ms each, past the
      cliff) and the head reads five (5.0 + 0.2 = 5.2: one position past its table);
    - one last plain step, as the prefill: the sequence ends;
    - 3 rounds at 0.5.
    Layers 22 x 1.0 + 4 x 3.1 = 34.4, heads 2 x 2.0 + 5.2 = 9.2, checks 1.2, rounds 1.5: 46.3 ms
    for 7 tokens, which plain decoding makes in 7 x (6 x 1.0 + 2.0 + 0.5) = 59.5 ms."""
    n = 7
    exits = Exits(layer=np.full(n, 2), right=np.ones(n, bool), checks=np.ones(n, np.int64))
    r = simulate(exits, [(0, n)], CLIFF, d_max=2, w_max=4)
    assert (r.tokens, r.rounds, r.drafted, r.exit_checks) == (7, 3, 4, 4)
    assert r.call_widths == (22, 0, 0, 0, 4) and r.head_rows == (2, 0, 0, 0, 1)
    assert r.cost_ms == pytest.approx(46.3)
    assert r.speedup == pytest.approx(59.5 / 46.3)


# -- the whole pipeline on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from helpers import make_tiny_model_folder

    root = tmp_path_factory.mktemp("calib")
    model = make_tiny_model_folder(root / "model", vocab_size=64, num_layers=4, seed=0)
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(50))}) + "\n")
        for _ in range(16):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(6))}) + "\n")
    cost = CostModel(num_layers=4, layer_base=0.2, layer_extra=0.01, head_base=0.05, head_extra=0.01, check=0.02, round_overhead=0.3)
    return root, model, corpus, cost


def _calibrate(root, model, corpus, cost, name, monkeypatch, **kw):
    from specbound.calibrate import options, pipeline, run

    monkeypatch.setattr(pipeline, "cached_cost", lambda *a, **k: cost)
    opts = options.CalibrateOptions(
        model=str(model), corpus=str(corpus), out=root / f"{name}.safetensors", work_dir=root / f"work-{name}",
        **{"trials": 25, "answer_tokens": 12, "measure_prompts": 0, **kw},
    )
    return run.run_calibration(opts)


def test_pipeline_is_byte_identical_and_decodes_exactly(tiny_setup, monkeypatch):
    import specbound_runtime as sb
    from specbound_runtime.artifact import load_artifact
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.models import resolve_model

    root, model, corpus, cost = tiny_setup
    a = _calibrate(root, model, corpus, cost, "a", monkeypatch)
    b = _calibrate(root, model, corpus, cost, "b", monkeypatch)
    assert a.artifact.read_bytes() == b.artifact.read_bytes()
    loaded = resolve_model(str(model))
    art = load_artifact(a.artifact, loaded.fingerprint, loaded.tokenizer_fingerprint)
    assert art.metadata["seed"] == "0" and "cost_model" in art.metadata
    _exports_the_best_trial(art, root / "work-a", a.report)
    _reports_the_next_token_head(art, a.report)
    tuned = Decoder(sb.load(str(model), artifact=a.artifact))
    _records_the_batch_policy(art, a.report, tuned.m)
    plain = Decoder(tuned.m.uncalibrated())
    for text in ("w5 w6 w7", "w30 w31 w9 w9 w12"):
        enc = tuned.encode([{"role": "user", "content": text}], True, 24)
        assert tuned.generate(enc).token_ids == plain.generate(enc, speculation=False).token_ids


def _records_the_batch_policy(art, report, m) -> None:
    """The artifact holds a draft bound a row for 1, 4 and 16 rows, each the fastest of its
    simulated bounds (or 0 where none pays), the rule checked at 2 and 8 rows; the runtime's batch
    width is the rule's (one row: the policy's own)."""
    from specbound.calibrate.batches import MARGIN

    doc = json.loads(art.metadata["batch_policy"])
    assert doc == report["batch_policy"] and [t["rows"] for t in doc["tuned"]] == [1, 4, 16]
    for t in doc["tuned"]:
        by_width = {int(w): v for w, v in t["by_width"].items()}
        assert set(by_width) == set(range(1, art.policy.w_max + 1))
        if t["width"]:
            assert by_width[t["width"]] == max(by_width.values()) == t["predicted_speedup"]
        else:
            assert max(by_width.values()) < 1.0 + MARGIN
    assert [c["rows"] for c in doc["checked"]] == [2, 8]
    widths = {t["rows"]: t["width"] for t in doc["tuned"]}
    assert m.batch_width(1) == art.policy.w_max
    assert m.batch_width(4) == min(widths[4], art.policy.w_max) and m.batch_width(16) == min(widths[16], art.policy.w_max)
    assert [m.batch_width(c["rows"]) for c in doc["checked"]] == [c["rule_width"] for c in doc["checked"]]


def _reports_the_next_token_head(art, report) -> None:
    """The report and the summary say how often the fitted head is right on held-out positions
    and whether the policy uses it; the artifact holds the head exactly when it does."""
    from specbound.calibrate.export import calibration_summary

    head = report["next_token_head"]
    assert head["used"] == art.policy.head_draft == (art.exit_weights.next_head is not None)
    assert 0.0 <= head["held_out_agreement"] <= 1.0 and head["held_out_positions"] == report["positions"]["held_out"]
    summary = calibration_summary(report)
    assert f"next-token head: its draft is the full model's token at {head['held_out_agreement']:.1%}" in summary
    assert ("the policy drafts with it" in summary) == head["used"]


def _exports_the_best_trial(art, work, report) -> None:
    """Trial 0 tried the paper's defaults; the artifact holds the best trial's policy, and the
    simulated speedup it records is that trial's, better than the paper's on this model; or,
    when a fallback without early exit (lookup and/or the next-token head) scores higher, that
    fallback, with its higher simulated speedup."""
    import optuna

    from specbound.calibrate.tune import lookup_rule_name
    from specbound_runtime.policy import PAPER_ALPHA, PAPER_THRESHOLD, PAPER_W_MAX, default_check_layers, paper_temperatures

    study = optuna.load_study(study_name=report["study_name"], storage=f"sqlite:///{(work / 'study.db').resolve()}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    layers = tuple(json.loads(art.metadata["candidate_layers"]))
    L = art.policy.num_layers
    paper_checks = default_check_layers(L)
    assert trials[0].params == {
        "head": "plain", "schedule": "paper", "threshold": PAPER_THRESHOLD, **{f"check_{l}": l in paper_checks for l in layers},
        "d_max": paper_checks[-1], "w_max": PAPER_W_MAX, "lookup": "off", "lookup_max": 1, "lookup_floor": 0, "head_draft": False,
    }
    best = max(trials, key=lambda t: (t.value, -t.number))
    simulated = json.loads(art.metadata["simulation"])
    if json.loads(art.metadata["best_trial"])["number"] == -1:
        from specbound.calibrate.tune import fallback_candidates

        policy = art.policy
        fallbacks = [c for c in fallback_candidates(L, with_head=True)]
        assert any(
            (c.checks, c.w_max, c.lookup_ngram, c.lookup_max, c.head_draft, c.lookup_min, c.lookup_floor)
            == (policy.check_layers, policy.w_max, policy.lookup_ngram, policy.lookup_max, policy.head_draft, policy.lookup_min,
                policy.lookup_floor)
            for c in fallbacks
        )
        assert (art.exit_weights.next_head is not None) == policy.head_draft
        assert simulated["fit"]["speedup"] >= best.value > simulated["fit_paper_defaults"]["speedup"]
        return
    assert json.loads(art.metadata["best_trial"])["number"] == best.number
    p = best.params
    checks = tuple(l for l in layers if p[f"check_{l}"] and l <= p["d_max"])
    policy = art.policy
    assert (policy.check_layers, policy.d_max, policy.w_max) == (checks, checks[-1] if checks else L, p["w_max"])
    assert lookup_rule_name(policy.lookup_ngram, policy.lookup_min) == p["lookup"]
    assert policy.lookup_max == (p["lookup_max"] if p["lookup"] != "off" else 0)
    assert policy.lookup_floor == (p["lookup_floor"] if p["lookup"] != "off" and p["lookup_floor"] < p["lookup_max"] else 0)
    assert policy.head_draft == p["head_draft"] and (art.exit_weights.next_head is not None) == p["head_draft"]
    assert policy.thresholds == pytest.approx((p["threshold"],) * len(checks))
    calibration = report["calibration"][p["head"]]
    fitted = {row["layer"]: row["temperature"] for row in calibration["layers"]}
    alpha = {"fitted": None, "paper-fitted": calibration["alpha"], "paper": PAPER_ALPHA}[p["schedule"]]
    want = [fitted[l] for l in checks] if alpha is None else paper_temperatures(alpha, checks, L)
    assert policy.temperatures == pytest.approx(want, abs=1e-5)
    assert (art.exit_weights.lens != {}) == (p["head"] == "lens")
    assert simulated["fit"] == best.user_attrs["result"] and simulated["fit"]["speedup"] == pytest.approx(best.value, abs=1e-6)
    assert simulated["fit_paper_defaults"] == trials[0].user_attrs["result"]
    assert simulated["fit"]["speedup"] > simulated["fit_paper_defaults"]["speedup"]


def _big_text(path, megabytes: float = 3.0, seed: int = 0):
    """Random words of the tiny vocabulary in paragraphs of 5 to 1,500 words (blank-line separated)."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < megabytes * 2**20:
        paragraphs.append(" ".join(f"w{rng.randrange(4, 64)}" for _ in range(rng.randrange(5, 1500))))
        size += len(paragraphs[-1]) + 2
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def test_costs_measured_again_tune_afresh_in_the_same_work_folder(tiny_setup, monkeypatch):
    """After the cost model is measured again, the same command tunes in a new study (the old
    trials were scored under the old costs) instead of failing on the work folder's study."""
    import dataclasses

    root, model, corpus, cost = tiny_setup
    first = _calibrate(root, model, corpus, cost, "recost", monkeypatch)
    again = _calibrate(root, model, corpus, cost, "recost", monkeypatch, force=True)
    assert again.report["study_name"] == first.report["study_name"]  # same costs: the same study resumes
    other = dataclasses.replace(cost, layer_extra=cost.layer_extra * 3)
    second = _calibrate(root, model, corpus, other, "recost", monkeypatch, force=True)
    assert second.report["study_name"] != first.report["study_name"]


def test_split_text_packs_paragraphs_and_cuts_long_ones_between_words():
    from specbound.calibrate.corpus import split_text

    text = "a b c\n\nd e\n \n\n" + " ".join(["wxyz"] * 30) + "\n\n" + "z" * 25 + "\n\nf"
    items = split_text(text, max_chars=20)
    assert all(0 < len(item) <= 20 for item in items)
    assert items[0] == "a b c\n\nd e"  # short paragraphs packed together, whole
    assert " ".join(items).split() == text.split()[:-2] + ["z" * 20, "z" * 5, "f"]  # only a word too long is cut
    assert split_text(text, max_chars=20) == items


def test_a_large_text_file_becomes_many_items_spread_over_every_split(tmp_path):
    from collections import Counter

    from specbound.calibrate.corpus import TEXT_ITEM_CHARS, load_corpus

    path = _big_text(tmp_path / "big.txt")
    corpus = load_corpus(str(path), n_prompts=0, n_documents=0, held_out_fraction=0.1, seed=0)
    docs = corpus.documents
    assert len(docs) > 1000 and len({d.id for d in docs}) == len(docs) and not corpus.prompts
    assert all(0 < len(d.text) <= TEXT_ITEM_CHARS and d.id.startswith("big.txt:") for d in docs)
    assert [w for d in docs for w in d.text.split()] == path.read_text().split()  # in order, nothing lost
    splits = Counter(
        "held-out" if d.held_out else "lens" if C.RecordedSequence(d.id, False, False, (4, 5), 0).lens_split else "calibration"
        for d in docs
    )
    assert set(splits) == {"held-out", "lens", "calibration"} and min(splits.values()) > 0.05 * len(docs)
    assert load_corpus(str(path), 0, 0, 0.1, 0) == corpus  # stable ids and items


def test_a_corpus_of_one_large_text_file_calibrates(tiny_setup, monkeypatch):
    root, model, _, cost = tiny_setup
    big = _big_text(root / "big.txt", megabytes=2.0, seed=1)
    out = _calibrate(root, model, big, cost, "big-text", monkeypatch, documents=16)
    positions = out.report["positions"]
    assert min(positions["lens"], positions["fit"], positions["held_out"]) > 0 and positions["own"] == 0
    assert out.artifact.exists()


def test_a_corpus_that_names_its_kinds_is_judged_and_measured_kind_by_kind(tiny_setup, monkeypatch):
    """Prompt rows with a `kind`: every kind keeps held-out prompts (even one whose prompts all
    hash into the tuning split), tuning reports each kind's prediction, and the live check
    decodes one prompt of each kind in turn."""
    from specbound.calibrate.corpus import load_corpus

    root, model, corpus, cost = tiny_setup
    rng = random.Random(5)
    kinds = root / "by-kind.jsonl"  # a name whose row ids hash no prompt into the held-out 10%
    rows = [json.loads(line) for line in corpus.read_text().splitlines() if "text" in json.loads(line)]
    rows += [{"prompt": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(6)), "kind": k} for k in ("alpha", "beta", "gamma") for _ in range(6)]
    kinds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_corpus(str(kinds), 0, 0, 0.1, 0)
    assert sorted(p.kind for p in loaded.prompts if p.held_out) == ["alpha", "beta", "gamma"]
    out = _calibrate(root, model, kinds, cost, "kinds", monkeypatch, measure_prompts=3, measure_tokens=6)
    assert set(out.report["simulated"]["held_out_kinds"]) == {"alpha", "beta", "gamma"}
    assert all(v["worst_round"] >= 1.0 for v in out.report["simulated"]["held_out_kinds"].values())
    measured = out.report["measured"]
    assert measured["prompts"] == 3 and set(measured["speedup_by_kind"]) == {"alpha", "beta", "gamma"}
    assert measured["worst_kind"] == min(measured["speedup_by_kind"], key=measured["speedup_by_kind"].get)


def test_interrupted_collection_resumes_to_the_same_artifact(tiny_setup, monkeypatch):
    root, model, corpus, cost = tiny_setup
    ref = _calibrate(root, model, corpus, cost, "ref", monkeypatch)
    work = root / "work-ref"
    # as if killed mid-way: a shard of answers, of lens moments and of records missing (one of
    # them still claimed by a process that is gone), and a study that never ran
    (work / "answers" / "shard-00001.jsonl").unlink()
    (work / "pass_a" / "shard-00000.npz").unlink()
    shards = sorted((work / "shards").glob("*.arrow"))
    shards[-1].unlink()
    (work / "shards" / f".{shards[-1].name}.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1}))
    (work / "study.db").unlink()
    ref_bytes = ref.artifact.read_bytes()
    ref.artifact.unlink()
    again = _calibrate(root, model, corpus, cost, "ref", monkeypatch)
    assert again.artifact.read_bytes() == ref_bytes


def test_multi_objective_tuning_writes_the_pareto_front(tiny_setup, monkeypatch):
    root, model, corpus, cost = tiny_setup
    out = _calibrate(root, model, corpus, cost, "pareto", monkeypatch, multi_objective=True)
    front = json.loads((root / "work-pareto" / "pareto.json").read_text())
    assert front and all({"speedup", "waste", "params"} <= set(p) for p in front)
    # a front: no point is beaten on both objectives by another
    for p in front:
        assert not any(q["speedup"] > p["speedup"] and q["waste"] < p["waste"] for q in front)
    assert (root / "work-pareto" / "pareto.png").stat().st_size > 0
    assert out.artifact.exists()

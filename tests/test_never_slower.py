"""A calibrated artifact is never slower than plain decoding: tuning scores policies under every
measured cost round, and where no draft source pays it chooses prompt lookup alone or no drafting.
Cost measurements that disagree are measured again, and a busy machine is reported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specbound.calibrate import costs as costs_module
from specbound.calibrate.collect import HEADS, LOOKUP_RULES, Records
from specbound.calibrate.fit import TEMPERATURE_GRID
from specbound.calibrate.simulate import COST_FIELDS, CostModel, Exits, simulate
from specbound.calibrate.tune import Schedules, tune

L = 6
LAYERS = (2, 3, 4)
COST = CostModel(num_layers=L, layer_base=1.0, layer_extra=0.08, head_base=0.6, head_extra=0.1, check=0.05, round_overhead=0.3)


def _records(
    n_seq: int = 4, length: int = 80, right: float = 0.0, lookup_right: int = 0, seed: int = 0, head: float | None = None
) -> Records:
    """Recorded positions whose exit heads are always confident; a draft is right with
    probability `right`; prompt lookup always proposes 3 tokens, `lookup_right` of them right;
    with `head`, the next-token head was recorded too, its draft right with that probability."""
    rng = np.random.default_rng(seed)
    n = n_seq * length
    C, G = len(LAYERS), len(TEMPERATURE_GRID)
    return Records(
        seq=np.repeat(np.arange(n_seq), length),
        held_out=np.zeros(n, bool),
        own=np.ones(n, bool),
        final=np.zeros(n, np.int64),
        right=rng.random((n, len(HEADS), C)) < right,
        conf=np.full((n, len(HEADS), C, G), 0.99),
        layers=LAYERS,
        lookup_proposed=np.full((n, len(LOOKUP_RULES)), 3, np.int64),
        lookup_right=np.full((n, len(LOOKUP_RULES)), lookup_right, np.int64),
        lookup_size=np.full((n, len(LOOKUP_RULES)), 2, np.int64),  # every match on 2 tokens
        head_right=None if head is None else np.random.default_rng(seed + 100).random(n) < head,
    )


SCHEDULES = Schedules(LAYERS, L, {h: (1.0,) * len(LAYERS) for h in HEADS}, {h: 1.0 for h in HEADS})


def _tune(records, cost, folder, trials=6, held_out=None):
    folder.mkdir(exist_ok=True)
    return tune(records, SCHEDULES, cost, trials, 0, f"sqlite:///{folder / 'study.db'}", "s", held_out=held_out, batch=3)


def test_useless_drafts_choose_plain_decoding(tmp_path):
    """Every early-exit draft and every lookup draft is wrong, on the tuning data and on every
    held-out kind: any drafting is slower than plain decoding (the paper's policy is), so tuning
    chooses no drafting at all."""
    kinds = {"chat": _records(seed=1), "code": _records(seed=2)}
    result = _tune(_records(), COST, tmp_path, held_out=kinds)
    assert result.paper.speedup < 1.0
    assert not result.best.policy(SCHEDULES).drafts
    assert result.value.speedup == pytest.approx(1.0)


def test_lookup_alone_when_only_lookup_pays(tmp_path):
    """Early exit is useless but prompt lookup is right: tuning keeps lookup and drops early exit."""
    result = _tune(_records(lookup_right=3), COST, tmp_path)
    policy = result.best.policy(SCHEDULES)
    assert policy.check_layers == () and policy.lookup_ngram > 0
    assert result.value.speedup > 1.2


def test_a_policy_slower_on_held_out_sequences_is_not_chosen(tmp_path):
    """Drafts pay on the tuning split but not on held-out sequences: the artifact must not be
    slower for prompts it was not tuned on, so tuning falls back to plain decoding."""
    result = _tune(_records(right=0.95), COST, tmp_path, held_out={"chat": _records(right=0.0, seed=1)})
    assert not result.best.policy(SCHEDULES).drafts
    free = _tune(_records(right=0.95), COST, tmp_path / "free")
    assert free.best.policy(SCHEDULES).drafts and free.value.speedup > 1.0


@pytest.mark.parametrize("math_right", [0.6, 0.7], ids=["slower-on-math", "barely-faster-on-math"])
def test_the_worst_held_out_kind_decides_which_policy_ships(math_right):
    """Early exit scores best on the tuning data (drafts right 99% of the time) and on code
    answers. On math answers its drafts are right less often: 60% makes it slower than plain
    decoding there (it does not qualify), 70% leaves it a little faster (it qualifies, but its
    worst kind is far below that of drafting one lookup token, which every math answer repeats).
    Either way the lookup policy ships; without held-out kinds, early exit would."""
    from specbound.calibrate.tune import Candidate, evaluate, fallback_candidates, never_slower, score

    fit = _records(right=0.99, lookup_right=1)
    kinds = {"code": _records(right=0.99, lookup_right=1, seed=1), "math": _records(right=math_right, lookup_right=3, seed=2)}
    early_exit = Candidate("plain", "fitted", 0.5, LAYERS, LAYERS[-1], 4)
    options = [(early_exit, 0)] + [(c, -1) for c in fallback_candidates(L)]
    on_math = score(evaluate(kinds["math"], early_exit, SCHEDULES, COST))
    assert (on_math < 1.0) == (math_right == 0.6)
    chosen, trial, per_kind = never_slower(options, fit, kinds, SCHEDULES, COST)
    assert not chosen.early_exit and chosen.lookup_ngram and trial == -1
    assert set(per_kind) == {"code", "math"} and min(per_kind.values()) > max(on_math, 1.0)
    assert never_slower(options, fit, None, SCHEDULES, COST)[0] == early_exit


def test_tuning_prefers_a_policy_that_wins_under_every_measured_round(tmp_path):
    """Drafts right 80% of the time: early exit pays under the median costs but not under one
    measured round where each further position in a layer call cost as much as the first.
    Judged under every round, early exit is not chosen."""
    records = _records(right=0.8)
    steady = _tune(records, COST, tmp_path / "a")
    assert steady.best.policy(SCHEDULES).check_layers  # under the median alone, early exit wins
    unbatched = [1.0, 1.0, 0.6, 0.1, 0.05, 0.3]  # layer_extra 1.0: no gain from batching positions
    rows = [[getattr(COST, k) for k in COST_FIELDS]] * 4 + [unbatched]
    spread = CostModel.from_rounds(L, [dict(zip(COST_FIELDS, r)) for r in rows])
    assert spread.layer_extra == COST.layer_extra  # the median is unchanged ...
    robust = _tune(records, spread, tmp_path / "b")
    assert not robust.best.policy(SCHEDULES).check_layers  # ... but the choice is not
    assert robust.value.robust_speedup > 1.0 - 1e-9  # plain decoding, up to rounding


def test_a_replay_repriced_under_another_cost_model_keeps_what_pricing_must():
    """The simulator's counted work, priced under another cost model (how a replay is judged under
    every measured round without replaying it again), checked by facts that do not depend on how
    pricing is written:
    - every cost scaled by one factor (a uniformly faster machine): the same speedup;
    - only a round's fixed cost counts: plain decoding pays it once per token, the replay once per
      round, so the speedup is the mean accepted length;
    - every position of every layer call and LM-head read costs the same, nothing else costs: work
      done while drafting is never done again, so each position a round handles (the token emitted
      last round and each draft) climbs all L layers and is read by the head once, and the speedup
      is tokens over positions handled, rounds + drafted;
    - an exit check dearer by 1 ms: the replay dearer by exactly its number of checks;
    - wide passes dearer: slower, and a replay of plain decoding is exactly 1 under any of them."""
    rng = np.random.default_rng(3)
    n = 400
    exits = Exits(layer=rng.choice([-1, 2, 3, 4], n), right=rng.random(n) < 0.5, checks=rng.integers(1, 4, n))
    r = simulate(exits, [(0, 200), (200, n)], COST, d_max=4, w_max=5)
    assert r.accepted > 0 and sum(r.call_widths[1:]) > 0  # drafts were kept, and passes were wide
    scaled = CostModel(L, *(3.0 * getattr(COST, k) for k in COST_FIELDS))
    rounds_only = CostModel(L, layer_base=0.0, layer_extra=0.0, head_base=0.0, head_extra=0.0, check=0.0, round_overhead=1.0)
    per_position = CostModel(L, layer_base=1.0, layer_extra=1.0, head_base=1.0, head_extra=1.0, check=0.0, round_overhead=0.0)
    dearer = dataclasses.replace(COST, layer_extra=0.5, head_extra=0.4)
    assert r.speedup_under(scaled) == pytest.approx(r.speedup, rel=1e-12)
    assert r.speedup_under(rounds_only) == pytest.approx(r.mean_accepted_length, rel=1e-12)
    assert r.speedup_under(per_position) == pytest.approx(r.tokens / (r.rounds + r.drafted), rel=1e-12)
    ms = lambda cost: cost.ar_token * r.tokens / r.speedup_under(cost)  # noqa: E731  (what the replay costs)
    assert ms(dataclasses.replace(COST, check=COST.check + 1.0)) - ms(COST) == pytest.approx(r.exit_checks, rel=1e-9)
    assert r.speedup_under(dearer) < r.speedup
    plain = simulate(Exits(np.full(n, -1), np.zeros(n, bool), np.zeros(n, np.int64)), [(0, 200), (200, n)], COST, d_max=4, w_max=5)
    assert plain.drafted == 0 and plain.rounds == plain.tokens == n
    for cost in (COST, scaled, rounds_only, per_position, dearer):
        assert plain.speedup_under(cost) == pytest.approx(1.0, rel=1e-12)


def test_unsteady_cost_rounds_are_measured_again(monkeypatch):
    """Rounds that disagree (a busy CPU) are measured again; the steady attempt is kept, silently."""
    steady = dict(layer_base=1.0, layer_extra=0.1, head_base=0.5, head_extra=0.1, check=0.05, round_overhead=0.2)
    busy = {**steady, "layer_base": 3.0}
    attempts = iter([[steady, busy, steady, busy, steady], [steady] * 5])
    monkeypatch.setattr(costs_module, "_measure_round", _rounds_from(attempts))
    warnings = []
    cost = costs_module.measure_costs(_FakeLM(), 16, warn=warnings.append, far=None, batch_rows=())
    assert cost.spread == 0.0 and len(cost.samples) == 5 and warnings == []


def test_a_machine_that_stays_busy_is_reported(monkeypatch):
    steady = dict(layer_base=1.0, layer_extra=0.1, head_base=0.5, head_extra=0.1, check=0.05, round_overhead=0.2)
    busy = {**steady, "layer_base": 3.0}
    monkeypatch.setattr(costs_module, "_measure_round", _rounds_from(iter([[steady, busy] * 3] * 3)))
    warnings = []
    cost = costs_module.measure_costs(_FakeLM(), 16, rounds=5, warn=warnings.append, far=None, batch_rows=())
    assert len(warnings) == 1 and "unsteady" in warnings[0] and "specbound costs" in warnings[0]
    assert cost.spread > costs_module.STABLE_SPREAD
    assert cost.layer_base == 1.0  # the median of three steady rounds and two busy ones


class _FakeLM:
    num_layers = L


def _rounds_from(attempts):
    current: list = []

    def measure_round(*args, **kwargs):
        if not current:
            current.extend(next(attempts)[:5])
        return current.pop(0)

    return measure_round


def test_the_next_token_head_alone_when_only_it_pays(tmp_path):
    """Early exit and prompt lookup are useless, the next-token head is right 90% of the time.
    Lookup proposes in every round, and the head drafts only where lookup proposes nothing, so
    tuning must turn lookup off to use the head."""
    result = _tune(_records(head=0.9), COST, tmp_path)
    policy = result.best.policy(SCHEDULES)
    assert policy.head_draft and policy.check_layers == () and policy.lookup_ngram == 0
    assert result.value.head_reads > 0 and result.value.speedup > 1.2


def test_a_useless_next_token_head_is_not_chosen(tmp_path):
    """The head is never right, nor is anything else: no drafting at all; and a head that pays on
    the tuning split but not on held-out sequences is not chosen either."""
    assert not _tune(_records(head=0.0), COST, tmp_path / "a").best.policy(SCHEDULES).drafts
    held = _tune(_records(head=0.95), COST, tmp_path / "b", held_out={"chat": _records(head=0.0, seed=1)})
    assert not held.best.policy(SCHEDULES).drafts


def test_a_replay_with_the_head_is_repriced_as_its_drafts_cost():
    """Next-token head drafts (no early exit, no lookup): each is one short-list head product,
    priced as an exit check, and one more position verified. So a check dearer by 1 ms makes the
    replay dearer by exactly its number of head drafts, and under a cost where every position of
    a layer call or head read costs the same and nothing else does, a head draft is one more
    position handled, like any draft."""
    from specbound.calibrate.tune import evaluate, no_exit_candidate

    r = evaluate(_records(head=0.6, seed=4), no_exit_candidate(L, w_max=1, head_draft=True), SCHEDULES, COST)
    assert r.head_reads > 0 and r.exit_checks == 0 and r.drafted == r.head_reads
    dearer_check = dataclasses.replace(COST, check=COST.check + 1.0)
    ms = lambda cost: cost.ar_token * r.tokens / r.speedup_under(cost)  # noqa: E731  (what the replay costs)
    assert ms(dearer_check) - ms(COST) == pytest.approx(r.head_reads, rel=1e-9)
    per_position = CostModel(L, layer_base=1.0, layer_extra=1.0, head_base=1.0, head_extra=1.0, check=0.0, round_overhead=0.0)
    assert r.speedup_under(per_position) == pytest.approx(r.tokens / (r.rounds + r.drafted), rel=1e-12)


def test_tuning_trials_search_the_head(tmp_path):
    """Early exit and the next-token head both pay (lookup does not, and the run-time guard
    pauses it): the trials themselves, not only the fallbacks, try the head, and a trial that
    drafts with it wins."""
    result = _tune(_records(right=0.9, head=0.9), COST, tmp_path, trials=48)
    policy = result.best.policy(SCHEDULES)
    assert result.best_trial >= 0 and policy.head_draft and policy.check_layers
    assert result.value.head_reads > 0 and result.value.speedup > 1.2


def test_tuning_keeps_passes_below_a_measured_cost_cliff(tmp_path):
    """Prompt lookup always proposes three right tokens. Under costs linear in the number of
    positions, verifying all three pays best; where a layer call over four positions costs four
    times one over three (the BLAS switches kernels), tuning stops at two drafts, the widest pass
    below the cliff."""
    cliff = CostModel(
        num_layers=L, layer_base=1.0, layer_extra=0.05, head_base=0.6, head_extra=0.05, check=0.05, round_overhead=0.3,
        layer_widths=(1.0, 1.05, 1.1, 4.0, 4.0, 4.0), head_widths=(0.6, 0.65, 0.7, 2.0),
    )
    linear = CostModel(num_layers=L, layer_base=1.0, layer_extra=0.05, head_base=0.6, head_extra=0.05, check=0.05, round_overhead=0.3)
    records = _records(lookup_right=3)
    widest = lambda result: max(n for n, rounds in enumerate(result.value.head_rows, 1) if rounds)  # noqa: E731
    under_linear = _tune(records, linear, tmp_path / "linear")
    under_cliff = _tune(records, cliff, tmp_path / "cliff")
    assert widest(under_linear) == 4  # positions verified in the widest pass: all three drafts
    assert widest(under_cliff) == 3 and under_cliff.value.speedup > 2.0


def test_scaling_wide_passes_scales_every_draft_price_and_leaves_a_plain_step():
    from specbound.calibrate.simulate import guard_prices

    cost = CostModel.from_rounds(L, [
        {**{k: getattr(COST, k) for k in COST_FIELDS}, "layer_widths": [1.0, 1.1, 1.3, 1.8], "head_widths": [0.6, 0.7, 0.9, 1.2]},
        {**{k: getattr(COST, k) * 1.1 for k in COST_FIELDS}, "layer_widths": [1.1, 1.2, 1.4, 2.0], "head_widths": [0.7, 0.8, 1.0, 1.3]},
    ])
    for factor in (0.5, 2.0):
        scaled = cost.wide_passes_scaled(factor)
        for a, b in zip(scaled.variants(), cost.variants()):
            assert a.ar_token == pytest.approx(b.ar_token)
            assert guard_prices(a, 6) == pytest.approx(tuple(factor * x for x in guard_prices(b, 6)), rel=1e-6)


def test_the_artifact_knows_which_draft_prices_would_change_its_policy():
    """Lookup drafts one token in three right, and each further position in a pass costs 60% of a
    layer call: drafting one lookup token pays 1.3x. Where wide passes cost more, the choice moves
    at the first factor policy_change names, and not at the factors before it; where they cost a
    little more or less, it holds."""
    from specbound.calibrate.tune import CHANGE_ABOVE, CHANGE_BELOW, fallback_candidates, never_slower, policy_change

    cost = dataclasses.replace(COST, layer_extra=0.6)
    fit = _records(lookup_right=1)
    kinds = {"code": _records(lookup_right=1, seed=1), "math": _records(lookup_right=1, seed=2)}
    options = [(c, -1) for c in fallback_candidates(L)]
    chosen = never_slower(options, fit, kinds, SCHEDULES, cost)[0]
    assert chosen.drafts
    below, above = policy_change(options, chosen, fit, kinds, SCHEDULES, cost)
    assert above in CHANGE_ABOVE and below is None  # one lookup token: cheaper passes change nothing
    assert never_slower(options, fit, kinds, SCHEDULES, cost.wide_passes_scaled(above))[0] != chosen
    for f in [f for f in CHANGE_ABOVE if f < above] + list(CHANGE_BELOW):
        assert never_slower(options, fit, kinds, SCHEDULES, cost.wide_passes_scaled(f))[0] == chosen, f

"""The run-time guard on prompt lookup and the next-token head (specbound_runtime/guard.py): a
source whose drafts do not pay pauses with a growing backoff and probes again, one that pays is
left alone, the artifact keeps the guard's prices, the guarded engine stays exact, and calibration
writes prices that follow its cost model. (The simulator's replay of the guard, round by round, is
checked against the engine in test_calibrate.py.)"""

from __future__ import annotations

import pytest
import torch

from clitools import invoke, save_tiny_artifact
from helpers import make_tiny_model_folder
from specbound.calibrate.simulate import CostModel, guard_prices
from specbound_runtime.artifact import _read, read_artifact
from specbound_runtime.guard import MAX_PAUSE, DraftGuard
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy


def _drafting_rounds(guard: DraftGuard, kept, rounds: int = 400, drafted: int = 4) -> int:
    """Rounds (of `rounds`) in which lookup was allowed to draft; kept(i): what the i-th drafting
    round kept."""
    n = 0
    for _ in range(rounds):
        if "lookup" in guard.open_sources():
            guard.record("lookup", drafted, kept(n))
            n += 1
    return n


def test_a_source_that_never_pays_drafts_about_once_per_longest_pause():
    guard = DraftGuard((0.2, 0.3, 0.4, 0.5))
    n = _drafting_rounds(guard, lambda i: 0)
    # pauses of 1, 2, 4, ... rounds up to the longest: a few probes, then one per longest pause
    assert 400 / (MAX_PAUSE + 1) <= n <= 400 / (MAX_PAUSE + 1) + 8
    assert "head" in guard.open_sources()  # each source has its own guard


def test_a_source_that_pays_is_never_paused_and_one_that_pays_mostly_rarely():
    assert _drafting_rounds(DraftGuard((0.2, 0.3, 0.4, 0.5)), lambda i: 2) == 400
    # one round in three keeps 3 of 4 drafts, the others none: worth 3 - 3 * 0.5 a cycle
    mostly = _drafting_rounds(DraftGuard((0.2, 0.3, 0.4, 0.5)), lambda i: 3 if i % 3 == 0 else 0)
    assert mostly > 0.7 * 400


def test_a_probe_that_pays_ends_the_backoff():
    guard = DraftGuard((0.5,))
    seen = []
    for i in range(300):  # useless for the first 100 rounds, perfect after
        if "lookup" in guard.open_sources():
            seen.append(i)
            guard.record("lookup", 1, 1 if i >= 100 else 0)
    resumed = [i for i in seen if i >= 100]
    assert resumed and resumed[0] <= 100 + MAX_PAUSE
    assert resumed == list(range(resumed[0], 300))  # every round after the first good probe


def test_calibrations_prices_follow_the_cost_model():
    """A pass whose width costs nothing extra makes drafts free; one where each extra position
    costs what a whole plain step does makes k drafts cost k steps."""
    free = CostModel(num_layers=4, layer_base=1.0, layer_extra=0.0, head_base=1.0, head_extra=0.0, check=0.1, round_overhead=0.0)
    assert guard_prices(free, 3) == (0.0, 0.0, 0.0)
    dear = CostModel(num_layers=4, layer_base=1.0, layer_extra=1.0, head_base=1.0, head_extra=1.0, check=0.1, round_overhead=0.0)
    assert guard_prices(dear, 3) == pytest.approx((1.0, 2.0, 3.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny-guard") / "model", num_layers=4, seed=0)
    return folder, resolve_model(str(folder))


def test_the_guard_survives_the_artifact_round_trip_and_decodes_exactly(tiny, tmp_path):
    import specbound_runtime as sb

    folder, loaded = tiny
    policy = ExitPolicy(4, (), (), (), 4, 3, lookup_ngram=2, lookup_max=3, lookup_min=1, guard_costs=(0.9, 1.9, 2.9))
    path = save_tiny_artifact(loaded, tmp_path / "guarded.safetensors", policy=policy)
    assert read_artifact(path).policy.guard_costs == pytest.approx((0.9, 1.9, 2.9))
    plain = save_tiny_artifact(loaded, tmp_path / "plain.safetensors", policy=ExitPolicy(4, (), (), (), 4, 3, lookup_ngram=2, lookup_max=3, lookup_min=1))
    assert "policy.guard_costs" not in _read(plain)[1] and read_artifact(plain).policy.guard_costs == ()
    ids = torch.tensor([[5, 6, 7, 8, 5, 9, 7, 8, 6, 5, 6, 7]])
    reference = sb.load(str(folder)).model.generate(ids, max_new_tokens=40, do_sample=False)
    guarded = sb.load(str(folder), artifact=path).generate_with_stats(ids, max_new_tokens=40, do_sample=False)
    free = sb.load(str(folder), artifact=plain).generate_with_stats(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(guarded.sequences, reference) and torch.equal(free.sequences, reference)
    assert guarded.stats.drafted < free.stats.drafted  # drafts this dear pause lookup
    assert "guard on lookup and head" in invoke("inspect", path).output


@pytest.mark.parametrize(
    "value,fragment",
    [(torch.tensor([0.5, -1.0]), "guard_costs must be finite and >= 0"), (torch.tensor([1, 2]), "must hold floats")],
    ids=["negative", "integers"],
)
def test_broken_guard_prices_are_refused(tiny, tmp_path, value, fragment):
    from test_errors import refused, rewrite

    _, loaded = tiny
    policy = ExitPolicy(4, (), (), (), 4, 2, lookup_ngram=2, lookup_max=2, guard_costs=(0.5, 1.0))
    path = save_tiny_artifact(loaded, tmp_path / "a.safetensors", policy=policy)
    rewrite(path, lambda t, m: t.__setitem__("policy.guard_costs", value))
    refused(path, loaded, fragment)


def test_the_watch_says_nothing_until_enough_passes_nor_when_prices_agree():
    from specbound_runtime.guard import MIN_PASSES, PassCostWatch

    watch = PassCostWatch((0.2, 0.3, 0.4), tolerance=0.1)
    watch.add([1] * MIN_PASSES + [3] * (MIN_PASSES - 1), [0.010] * MIN_PASSES + [0.013] * (MIN_PASSES - 1))
    assert watch.drift() is None  # seven passes of 3 positions: too few to judge
    watch.add([3], [0.013])
    assert watch.drift() is None  # 2 drafts priced 0.3 steps, as the artifact says


def test_the_watch_names_the_drafts_whose_price_moved():
    from specbound_runtime.guard import MIN_PASSES, PassCostWatch

    watch = PassCostWatch((0.2, 0.3, 0.4), tolerance=0.1)
    # a machine where 3 drafts cost a whole extra step (1 -> 4 positions doubles the pass)
    watch.add([1] * MIN_PASSES + [4] * (MIN_PASSES + 2) + [2] * MIN_PASSES, [0.01] * MIN_PASSES + [0.02] * (MIN_PASSES + 2) + [0.012] * MIN_PASSES)
    assert watch.drift() == {"drafts": 3, "measured": 1.0, "expected": 0.4}


def test_the_watch_lets_pass_a_difference_that_would_not_change_the_policy():
    """Prices 2.5x the artifact's are beyond the measurement's noise; whether that is worth a
    warning depends on where tuning would have chosen otherwise (metadata policy_change)."""
    from specbound_runtime.guard import MIN_PASSES, PassCostWatch

    def watch(change):
        w = PassCostWatch((0.2, 0.4, 0.6), tolerance=0.1, change=change)
        w.add([1] * MIN_PASSES + [3] * MIN_PASSES, [0.01] * MIN_PASSES + [0.02] * MIN_PASSES)  # 2 drafts: 1.0 step
        return w.drift()

    assert watch((0.5, 3.0)) is None  # 2.5x the price, and the policy holds up to 3x
    assert watch((0.5, 2.0)) == {"drafts": 2, "measured": 1.0, "expected": 0.4}
    assert watch((0.5, None)) is None  # the policy held at every dearer price tried
    assert watch(None) == {"drafts": 2, "measured": 1.0, "expected": 0.4}  # an older artifact: noise decides


def test_the_engine_times_its_depth0_passes_and_decode_warns_once_when_prices_drift(tiny, tmp_path):
    """A tiny artifact whose prices no machine has (5 plain steps for any draft): decode's own
    passes show it, it warns once (JSON: cost_drift on the record that found it), and the output
    is still exact."""
    import json

    folder, loaded = tiny
    policy = ExitPolicy(4, (), (), (), 4, 3, lookup_ngram=1, lookup_max=3, guard_costs=(5.0, 5.0, 5.0))
    base = save_tiny_artifact(loaded, tmp_path / "base.safetensors", policy=policy)
    path = save_tiny_artifact(loaded, tmp_path / "dear.safetensors", policy=policy, metadata={"cost_tolerance": "0.1"})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "w5 w6 w7 w5 w6 w7 w5 w6"}) + "\n" for _ in range(4)))
    result = invoke("decode", "--model", folder, "--artifact", path, "--prompt-file", prompts, "--max-new-tokens", "40", "--json", "--check-exact")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["exact"] for r in records)
    drifts = [r["cost_drift"] for r in records if "cost_drift" in r]
    assert len(drifts) == 1 and drifts[0]["expected"] == 5.0 and drifts[0]["measured"] < 4.9
    assert result.stderr.count("warning: this machine prices") == 1
    # an artifact without a tolerance (or without a guard) is never judged
    quiet = invoke("decode", "--model", folder, "--artifact", base, "--prompt-file", prompts, "--max-new-tokens", "40", "--json")
    assert quiet.exit_code == 0 and "cost_drift" not in quiet.stdout and "warning: this machine prices" not in quiet.stderr

"""The pure core: acceptance and the exit rule, tested by properties."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from specbound_runtime.acceptance import accept
from specbound_runtime.policy import ExitPolicy, decide_exit, exit_confidence, lookup_continuation, lookup_match, paper_temperatures


def _logits_for(tokens, vocab=10):
    out = torch.full((len(tokens), vocab), -1.0)
    for i, t in enumerate(tokens):
        out[i, t] = 1.0
    return out


@pytest.mark.parametrize(
    "drafts,targets,n",
    [([], [4], 0), ([1, 2, 3], [1, 2, 3, 9], 3), ([1, 2, 3], [1, 5, 3, 9], 1), ([1], [2, 7], 0)],
)
def test_accept_keeps_longest_agreeing_prefix_and_full_model_token(drafts, targets, n):
    a = accept(torch.tensor(drafts, dtype=torch.long), _logits_for(targets))
    assert a.accepted_length == n
    assert a.next_token == targets[n]
    assert a.tokens_emitted == n + 1
    assert a.drafted == len(drafts)


def test_accept_rejects_wrong_number_of_rows():
    with pytest.raises(ValueError):
        accept(torch.tensor([1, 2]), _logits_for([1, 2]))


def test_paper_schedule_anneals_towards_one_at_the_last_layer():
    """T_l = 1 + alpha * (1 - l/L), checked by what the paper's schedule means rather than by its
    formula: 1 + alpha at the embeddings, exactly 1 at the last layer, a straight line in between
    that depends on the depth fraction l/L only, and alpha the whole of the extra heat."""
    temps = paper_temperatures(0.8, (1, 10, 20, 30), 30)
    assert temps[0] > temps[1] > temps[2] > temps[3] == 1.0
    assert paper_temperatures(0.8, (0,), 30) == pytest.approx((1.8,))  # before the first layer: 1 + alpha
    assert paper_temperatures(0.8, (15,), 30) == pytest.approx((1.4,))  # halfway down: halfway to 1
    even = paper_temperatures(0.8, (6, 12, 18, 24), 30)  # equal layer steps, equal temperature steps
    assert [a - b for a, b in zip(even, even[1:])] == pytest.approx([0.16] * 3)  # 6/30 of alpha 0.8
    assert paper_temperatures(0.8, (10, 20), 30) == pytest.approx(paper_temperatures(0.8, (20, 40), 60))
    assert paper_temperatures(0.0, (1, 10, 29), 30) == (1.0, 1.0, 1.0)  # no annealing: the raw confidences
    doubled = paper_temperatures(1.6, (1, 10, 20), 30)
    assert [d - 1 for d in doubled] == pytest.approx([2 * (t - 1) for t in temps[:3]])


def test_confidence_is_max_softmax_and_temperature_only_lowers_it():
    torch.manual_seed(0)
    z = torch.randn(50) * 3
    conf, token = (float(v) for v in exit_confidence(z, 1.0))
    assert conf == pytest.approx(float(torch.softmax(z, -1).max()), rel=1e-6)
    assert int(token) == int(z.argmax())
    hotter, same_token = exit_confidence(z, 2.5)
    assert float(hotter) < conf and int(same_token) == token


def test_nan_logits_never_exit_but_minus_inf_is_allowed():
    z = torch.tensor([0.0, 10.0, float("-inf")])
    assert decide_exit(z, 1.0, 0.5).exits
    assert not decide_exit(torch.tensor([0.0, float("nan"), 10.0]), 1.0, 0.0).exits
    assert not decide_exit(torch.tensor([0.0, float("inf")]), 1.0, 0.0).exits


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(check_layers=(3, 2)),
        dict(check_layers=(0, 2)),
        dict(check_layers=(2, 6)),
        dict(temperatures=(0.0, 1.0)),
        dict(temperatures=(float("nan"), 1.0)),
        dict(thresholds=(1.5, 0.5)),
        dict(d_max=0),
        dict(w_max=0),
    ],
)
def test_exit_policy_rejects_impossible_values(kwargs):
    base = dict(num_layers=6, check_layers=(2, 4), temperatures=(1.0, 1.0), thresholds=(0.5, 0.5), d_max=4, w_max=2)
    base.update(kwargs)
    if "check_layers" in kwargs and len(kwargs["check_layers"]) != 2:
        n = len(kwargs["check_layers"])
        base["temperatures"], base["thresholds"] = (1.0,) * n, (0.5,) * n
    with pytest.raises(ValueError):
        ExitPolicy(**base)


@pytest.mark.parametrize("lookup", [0, 2, (3, 1)], ids=["no-drafting", "lookup-only", "lookup-backing-off"])
def test_a_policy_without_check_layers_drafts_only_lookups(lookup):
    """No check layer: early exit is off. With lookup on, every draft is a prompt-lookup draft
    (exit layer 0); with lookup off too, nothing is drafted: plain decoding. Either way the output
    is plain greedy decoding's."""
    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.engine import NoDrafter, generate
    from specbound_runtime.drafters import Speculator
    from tiny_models import tiny_model

    lm = HFCausalLM(tiny_model("llama", seed=1))
    ngram, lookup_min = lookup if isinstance(lookup, tuple) else (lookup, 0)
    policy = ExitPolicy(6, (), (), (), d_max=6, w_max=4, lookup_ngram=ngram, lookup_max=4 if ngram else 0, lookup_min=lookup_min)
    assert policy.drafts == bool(lookup)
    prompt = [5, 9, 20, 5, 9, 20, 5, 9]
    plain = generate(lm, prompt, 40, NoDrafter())
    run = generate(lm, prompt, 40, Speculator.for_policy(policy))
    assert run.token_ids == plain.token_ids
    assert set(run.exit_layers) <= {0}
    assert (run.drafted > 0) == bool(lookup)


def test_paper_default_policy_is_valid_for_many_depths():
    for layers in (2, 4, 6, 12, 30, 80):
        p = ExitPolicy.paper_default(layers)
        assert p.d_max == p.check_layers[-1] < layers
        assert p.temperatures[0] >= p.temperatures[-1] >= 1.0


def test_runtime_imports_no_calibration_dependencies():
    code = (
        "import sys, specbound_runtime, specbound_runtime.engine, specbound_runtime.adapter, "
        "specbound_runtime.policy, specbound_runtime.acceptance\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(specbound_runtime.__path__):\n"
        "    importlib.import_module('specbound_runtime.' + m.name)\n"
        "forbidden = ('optuna', 'sklearn', 'datasets', 'scipy', 'pyarrow', 'matplotlib', 'calibrate', 'data', 'bench')\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in forbidden\n"
        "             or n.startswith(('specbound.calibrate', 'specbound.data', 'specbound.bench')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "tokens,ngram,m,expected",
    [
        ([1, 2, 3, 9, 1, 2], 2, 3, [3, 9, 1]),  # most recent earlier "1 2" is followed by 3 9 1
        ([1, 2, 3, 1, 2, 4, 1, 2], 2, 2, [4, 1]),  # the most recent occurrence wins
        ([5, 6, 7], 2, 3, []),  # no earlier occurrence
        ([7, 7, 7], 1, 4, [7]),  # overlapping: only tokens that exist
        ([1, 2], 2, 3, []),  # nothing before the tail
        ([4, 1, 2, 4], 1, 0, []),
    ],
)
def test_lookup_continuation(tokens, ngram, m, expected):
    assert lookup_continuation(tokens, ngram, m) == expected


@pytest.mark.parametrize(
    "tokens,ngram,lowest,expected",
    [
        ([8, 2, 3, 5, 1, 2, 3, 6, 9, 2, 3], 3, 1, [6, 9]),  # "2 3" never followed "9": the 2-gram's latest match
        ([1, 2, 3, 7, 4, 2, 3, 8, 1, 2, 3], 3, 1, [7, 4]),  # the 3-gram "1 2 3" matched: it wins over the later "2 3"
        ([5, 6, 7, 6, 9, 1, 8, 9], 3, 1, [1, 8]),  # only the last token occurred before
        ([5, 6, 7, 6, 9, 1, 8, 9], 3, 2, []),  # ... and the backoff stops at 2 tokens
        ([1, 2, 3, 4], 3, 1, []),  # nothing occurred before
    ],
)
def test_lookup_backs_off_to_shorter_tails_and_the_longest_match_wins(tokens, ngram, lowest, expected):
    assert lookup_continuation(tokens, ngram, 2, lowest) == expected


def test_lookup_settings_are_both_on_or_both_off():
    base = dict(num_layers=6, check_layers=(2,), temperatures=(1.0,), thresholds=(0.5,), d_max=2, w_max=2)
    ExitPolicy(**base, lookup_ngram=2, lookup_max=4)
    for bad in ((2, 0), (0, 3), (-1, 2)):
        with pytest.raises(ValueError):
            ExitPolicy(**base, lookup_ngram=bad[0], lookup_max=bad[1])
    ExitPolicy(**base, lookup_ngram=3, lookup_max=2, lookup_min=1)
    for ngram, lookup_min in ((3, 4), (0, 1), (2, -1)):  # backoff past the n-gram, without lookup, negative
        with pytest.raises(ValueError):
            ExitPolicy(**base, lookup_ngram=ngram, lookup_max=2 if ngram else 0, lookup_min=lookup_min)


@pytest.mark.parametrize(
    "tokens,ngram,lowest,expected",
    [
        ([1, 2, 3, 7, 4, 2, 3, 8, 1, 2, 3], 8, 1, (2, 3)),  # "1 2 3" matched 3 tokens, ending at index 2
        ([8, 2, 3, 5, 1, 2, 3, 6, 9, 2, 3], 8, 1, (6, 2)),  # the most recent of the two 2-token matches
        ([7, 7, 7, 7], 8, 1, (2, 3)),  # overlapping: "7 7 7" ending at index 2 (nothing follows index 3)
        ([5, 6, 7, 6, 9, 1, 8, 9], 3, 2, (-1, 0)),  # a 1-token match is below the backoff's lowest
        ([1, 2], 2, 1, (-1, 0)),
    ],
)
def test_lookup_match_reports_where_the_longest_match_ends_and_its_length(tokens, ngram, lowest, expected):
    assert lookup_match(tokens, ngram, lowest) == expected


def test_lookup_drafts_follow_the_match_length_between_the_floor_and_lookup_max():
    base = dict(num_layers=6, check_layers=(), temperatures=(), thresholds=(), d_max=6, w_max=6, lookup_ngram=8, lookup_min=1)
    sized = ExitPolicy(**base, lookup_max=5, lookup_floor=2)
    assert [sized.lookup_width(s) for s in (1, 2, 3, 4, 5, 8)] == [2, 2, 3, 4, 5, 5]
    assert [ExitPolicy(**base, lookup_max=5).lookup_width(s) for s in (1, 8)] == [5, 5]  # no floor: fixed
    for bad in dict(lookup_max=5, lookup_floor=6), dict(lookup_max=5, lookup_floor=-1):
        with pytest.raises(ValueError, match="lookup_floor"):
            ExitPolicy(**base, **bad)
    with pytest.raises(ValueError, match="lookup_floor"):
        ExitPolicy(6, (), (), (), 6, 6, lookup_floor=1)  # a floor without lookup

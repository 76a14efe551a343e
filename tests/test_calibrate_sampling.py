"""Calibrating for sampling: the recorded acceptance probability is the engine's, the simulator's
replay predicts the live engine under sampling (accepted lengths, acceptance, drafts and the
cost-model speedup), and `calibrate --temperature` tunes for that mode and records it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch


from specbound.calibrate import collect as C
from specbound.calibrate.replay import head_replay, replays
from specbound.calibrate.simulate import CostModel, decide_exits, simulate
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import NoDrafter, generate, target_scores
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import SpecBoundWarning
from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.generation import prepared_by_generate
from specbound_runtime.policy import ExitPolicy
from specbound_runtime.sampling import DecodingMode, Sampler, draft_probabilities, full_vocabulary, probabilities
from test_calibrate import _calibrate, tiny_setup  # noqa: F401  (a fixture)
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (3, 4, 5)
COST = CostModel(num_layers=6, layer_base=1.0, layer_extra=0.1, head_base=2.0, head_extra=0.2, check=0.3, round_overhead=0.5)
PROMPTS = ([5, 9, 2], [4, 11, 12, 13], [7])


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=1, vocab_size=16)
    mode, processors = prepared_by_generate(model, DecodingMode.sampling(temperature=1.5, top_k=8))
    weights = ExitHeadWeights(shortlist=torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 13, 15]), lens={})
    lm = HFCausalLM(model, exit_weights=weights)
    heads = C.exit_heads(lm, weights)
    return model, lm, heads, processors, weights


def _record(lm, heads, processors, seq):
    return C.record_sequence(lm, heads, seq, LAYERS, processors)


def test_recorded_acceptance_is_what_the_engine_accepts_with(setup):
    """accept = sum_x min(p(x), q(x)) with p and q exactly as the engine builds them (generate()'s
    processors on the full model's row, the exit head's short-list under the same warpers)."""
    model, lm, heads, processors, weights = setup
    ids = [5, 9, 2, 7, 7, 11, 4, 13, 2, 9]
    seq = C.RecordedSequence("s", False, True, tuple(ids), 2)
    rec = _record(lm, heads, processors, seq)
    assert rec["accept"].shape == (len(ids) - 2, len(C.HEADS), len(LAYERS))
    with torch.inference_mode():
        states, logits = lm.layer_states(ids)
    for row in range(len(ids) - 2):
        position = 2 + row
        prefix = torch.tensor([ids[: position + 1]])
        p = probabilities(target_scores(logits[position : position + 1], ids[: position + 1], [], processors))[0]
        for c, layer in enumerate(LAYERS):
            with torch.inference_mode():
                z = lm.exit_logits(states[layer - 1][position : position + 1][None], layer)[-1]
            q = full_vocabulary(draft_probabilities(z, processors, prefix, lm.exit_columns, lm.vocab_size), lm.exit_columns, lm.vocab_size)
            want = float(torch.minimum(p.double(), q).sum())
            assert rec["accept"][row, 0, c] == pytest.approx(want, abs=1e-4)
    assert 0.05 < rec["accept"].mean() < 0.95


def test_recorded_head_acceptance_is_p_of_the_engines_head_draft(setup):
    """head_accept = p(x) for the next-token head's one-hot draft x, with x exactly what the engine
    drafts (from the previous position's final state and x_t's embedding) and p the full model's
    distribution after generate()'s processors; head_right says whether x is p's argmax."""
    model, _, _, processors, base = setup
    g = torch.Generator().manual_seed(11)
    H = 64
    weights = ExitHeadWeights(base.shortlist, {}, (torch.randn(2 * H, H, generator=g) * 0.2, torch.randn(H, generator=g)))
    lm = HFCausalLM(model, exit_weights=weights)
    ids = [5, 9, 2, 7, 7, 11, 4, 13, 2, 9]
    rec = _record(lm, C.exit_heads(lm, weights), processors, C.RecordedSequence("s", False, True, tuple(ids), 2))
    with torch.inference_mode():
        states, logits = lm.layer_states(ids)
    accepts = []
    for row in range(len(ids) - 2):
        position = 2 + row
        p = probabilities(target_scores(logits[position : position + 1], ids[: position + 1], [], processors))[0]
        with torch.inference_mode():
            x = lm.next_token_draft(states[-1][position - 1][None, None], lm.embed([ids[position]]))
        assert rec["head_accept"][row] == pytest.approx(float(p[x]), abs=1e-4)
        assert rec["head_right"][row] == (x == int(logits[position].argmax()))
        accepts.append(float(p[x]))
    assert min(accepts) < max(accepts) and max(accepts) > 0  # drafts of differing quality, not a constant


class CountingLM(HFCausalLM):
    """Counts the work the simulator charges: layer calls and the positions in each."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def run_layer(self, layer, hidden, start, cache):
        self.calls.append((start, hidden.shape[1]))
        return super().run_layer(layer, hidden, start, cache)


@pytest.mark.parametrize("lookup", [(0, 0), (1, 3)], ids=["early-exit", "early-exit+lookup"])
def test_the_simulator_predicts_the_live_engine_under_sampling(setup, monkeypatch, lookup):
    """Replay of recorded sampled trajectories (acceptance drawn from 1 - TV) against the engine
    decoding for real under the same sampling mode: accepted length, acceptance rate, drafts per
    token, and the speedup the cost model gives for the work each did, all agree. (Not exactly: the
    replay follows trajectories sampled from p, the engine's context after an accepted draft is a
    token from min(p, q); see calibrate/simulate.py.)"""
    from specbound_runtime import drafters, engine

    model, lm, heads, processors, weights = setup
    temps = (float(C.TEMPERATURE_GRID[8]),) * 3
    policy = ExitPolicy(6, LAYERS, temps, (0.3,) * 3, d_max=5, w_max=3, lookup_ngram=lookup[0], lookup_max=lookup[1])
    g = torch.Generator().manual_seed(0)
    recs, seqs = [], []
    for r in range(8):
        for p, prompt in enumerate(PROMPTS):
            answer = list(generate(lm, prompt, 40, NoDrafter(), logits_processor=processors, sampler=Sampler(g)).token_ids)
            seqs.append(C.RecordedSequence(f"{p}-{r}", False, True, tuple(prompt + answer), len(prompt) - 1))
            recs.append(_record(lm, heads, processors, seqs[-1]))
    k = [len(r["final"]) for r in recs]
    cat = lambda name: np.concatenate([r[name] for r in recs])  # noqa: E731
    records = C.Records(
        np.repeat(np.arange(len(recs)), k).astype(np.int32), np.zeros(sum(k), bool), np.ones(sum(k), bool),
        cat("final"), cat("right"), cat("conf"), LAYERS, accept=cat("accept"),
    )
    records = C.with_lookups(records, seqs)
    sims = []
    for draw in range(5):
        rr = records.with_draws(draw)
        exits = decide_exits(rr.conf[:, 0], rr.draft_right(0), [0, 1, 2], list(LAYERS), list(temps), [0.3] * 3)
        sims.append(simulate(exits, rr.bounds(), COST, policy.d_max, policy.w_max, replays(rr, policy)))

    counting = CountingLM(model, exit_weights=weights)
    checks = []
    real_decide = drafters.decide_exit
    monkeypatch.setattr(drafters, "decide_exit", lambda *a: checks.append(1) or real_decide(*a))
    g = torch.Generator().manual_seed(1)
    runs = [
        generate(counting, prompt, 40, Speculator.for_policy(policy), logits_processor=processors, sampler=Sampler(g))
        for _ in range(8)
        for prompt in PROMPTS
    ]
    tokens = sum(r.new_tokens for r in runs)
    passes = sum(r.verify_passes for r in runs)
    drafted = sum(r.drafted for r in runs)
    # the engine's work, charged as the simulator charges it (a prefill counts as one position)
    layer_cost = sum(COST.layer_base + COST.layer_extra * (0 if start == 0 else n - 1) for start, n in counting.calls)
    engine_cost = layer_cost + COST.check * len(checks) + (COST.head_base + COST.round_overhead) * passes + COST.head_extra * drafted
    engine_speedup = COST.ar_token * tokens / engine_cost

    mean = lambda f: float(np.mean([f(s) for s in sims]))  # noqa: E731
    assert drafted > 100 and 0.1 < sum(r.accepted for r in runs) / drafted < 0.9
    # agreement seen when written: within 5% (accepted length, speedup), 0.05 (acceptance); a replay
    # that scores drafts by argmax agreement instead misses the engine by 20% and more
    assert mean(lambda s: s.mean_accepted_length) == pytest.approx(tokens / passes, rel=0.08)
    assert mean(lambda s: s.acceptance_rate) == pytest.approx(sum(r.accepted for r in runs) / drafted, abs=0.07)
    assert mean(lambda s: s.drafted / s.tokens) == pytest.approx(drafted / tokens, rel=0.12)
    assert mean(lambda s: s.speedup) == pytest.approx(engine_speedup, rel=0.08)


def test_calibrate_for_sampling_tunes_for_it_and_records_the_mode(tiny_setup, monkeypatch, capsys):
    import specbound_runtime as sb

    root, model, corpus, cost = tiny_setup
    out = _calibrate(root, model, corpus, cost, "sampling", monkeypatch, temperature=0.8, top_p=0.9)
    m = sb.load(str(model), artifact=out.artifact)
    tuned = m.tuned_mode
    assert (tuned.do_sample, tuned.temperature, tuned.top_p) == (True, 0.8, 0.9) and tuned.top_k == 50  # generate()'s default
    assert json.loads(m.artifact_metadata["job"])["decoding"] == {"temperature": 0.8, "top_p": 0.9}
    assert out.report["decoding_mode"] == tuned.describe()
    shards = sorted((root / "work-sampling" / "shards").glob("*.arrow"))
    records = C.load_records(shards, tuple(json.loads(m.artifact_metadata["candidate_layers"])))
    assert records.accept is not None and records.draws is not None and 0 < records.accept.mean() < 1
    ids = torch.tensor([[1, 9, 10, 11, 12]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
        assert not caught
        m.generate(ids, max_new_tokens=8)
    assert [str(w.message).startswith("the artifact was tuned for sampling") for w in caught] == [True]
    assert caught[0].category is SpecBoundWarning
    # the same job tuned greedily: another work folder (its own answers and records), no mode recorded
    greedy = _calibrate(root, model, corpus, cost, "greedy-twin", monkeypatch)
    assert "decoding_mode" not in sb.load(str(model), artifact=greedy.artifact).artifact_metadata
    assert "decoding" not in json.loads(sb.load(str(model), artifact=greedy.artifact).artifact_metadata["job"])


def test_the_sampling_replay_keeps_head_drafts_at_their_acceptance_probability():
    """Under sampling the head's draft is kept in replay with its recorded acceptance probability
    p(x), not by whether it is the argmax: drafts that are never the argmax but always accepted
    (p(x) = 1) are all kept, never-accepted ones never, and at p(x) = 0.3 about 30% are."""
    n = 4000
    for p_accept, low, high in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.3, 0.27, 0.33)):
        records = C.Records(
            np.zeros(n, np.int32), np.zeros(n, bool), np.ones(n, bool), np.zeros(n, np.int32),
            np.zeros((n, len(C.HEADS), len(LAYERS)), bool), np.zeros((n, len(C.HEADS), len(LAYERS), 17), np.float32), LAYERS,
            accept=np.zeros((n, len(C.HEADS), len(LAYERS)), np.float32),
            head_right=np.zeros(n, bool), head_accept=np.full(n, p_accept, np.float32),
        ).with_draws(0)
        exits = decide_exits(records.conf[:, 0], records.draft_right(0), [], [], [], [])
        sim = simulate(exits, records.bounds(), COST, 5, 1, [head_replay(records.head_draft_right())])
        assert sim.head_reads > 0 and low <= sim.acceptance_rate <= high

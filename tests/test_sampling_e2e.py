"""Sampling end to end on tiny models: the exact distribution of short continuations against
SpecBound's samples, a biased acceptance rule caught by the same test, seeds, the API and
custom_generate, and the host-read budget.

The distribution test. On a tiny Llama (vocabulary 16), generate()'s own processors for the
sampling settings are captured, and the exact probability of every continuation of 4 tokens is
enumerated from the model's plain forward pass (transformers' code, not ours). SpecBound draws
N continuations with drafters that are often right and often wrong (early exit at a shallow and a
deep layer, short-list exit heads, prompt lookup's one-hot drafts). Pearson's chi-square
goodness-of-fit test compares the counts with N times the exact probabilities, continuations
expected fewer than 5 times pooled into one cell. The threshold is fixed in advance: reject when
the p-value is below ALPHA = 1e-3, so a correct sampler fails with probability 0.1% for a seed
drawn at random (the seeds here are fixed, so the test is deterministic). The same test, run on a
deliberately biased rule (on rejection, draw from p instead of the residual max(0, p - q)), must
reject: it does, with p-values far below ALPHA (about 1e-30 at N = 1000 when this was written).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from scipy.stats import chisquare

import specbound_runtime as sb
from clitools import save_tiny_artifact
from helpers import make_tiny_model_folder
from specbound_runtime import drafters, engine
from specbound_runtime.acceptance import Acceptance
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import SpecBoundWarning
from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.generation import prepared_by_generate
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy
from specbound_runtime.sampling import DecodingMode, Sampler, sample_index
from specbound_runtime.host import HostReadCounter
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3  # fixed in advance: the false-alarm rate of each goodness-of-fit test
PROMPT = [5, 9, 5, 9]  # "5 9" recurs: prompt lookup drafts one-hot proposals
LENGTH = 4
EOS = 3


def generate_processors(model, **sampling):
    """The logits processors and warpers generate() builds for these settings (from generate())."""
    return prepared_by_generate(model, DecodingMode.sampling(**sampling))[1]


def exact_distribution(model, processors, prompt=PROMPT, length=LENGTH, eos=EOS) -> dict[tuple, float]:
    """P(continuation) for every continuation of `length` tokens (shorter when it ends at EOS),
    from the model's full forward pass and generate()'s processors."""
    out, frontier = {}, [((), 1.0)]
    with torch.inference_mode():
        while frontier:
            seq, prob = frontier.pop()
            if len(seq) == length or (seq and seq[-1] == eos):
                out[seq] = prob
                continue
            ids = torch.tensor([prompt + list(seq)])
            p = torch.softmax(processors(ids, model(ids).logits[:, -1].float()), -1)[0].double()
            frontier += [(seq + (t,), prob * float(p[t])) for t in torch.nonzero(p > 0).flatten().tolist()]
    return out


def chi_square_pvalue(exact: dict[tuple, float], samples: list[tuple]) -> float:
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= set(exact), "a continuation the model cannot produce was sampled"
    big = [s for s in exact if exact[s] * n >= 5]
    observed = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    expected = np.array([exact[s] for s in big] + [1.0 - sum(exact[s] for s in big)])
    assert len(big) >= 20  # enough cells for the test to see a shape, not only a mean
    return float(chisquare(observed, expected * n / expected.sum()).pvalue)


def draw(lm, drafter_for, processors, n: int, seed: int) -> tuple[list[tuple], int, int]:
    g = torch.Generator().manual_seed(seed)
    samples, drafted, accepted = [], 0, 0
    for _ in range(n):
        r = generate(lm, PROMPT, LENGTH, drafter_for(), [EOS], logits_processor=processors, sampler=Sampler(g))
        samples.append(tuple(r.token_ids))
        drafted += r.drafted
        accepted += r.accepted
    return samples, drafted, accepted


@pytest.fixture(scope="module")
def tiny16():
    model = tiny_model("llama", seed=1, vocab_size=16)
    return model


def _rejects_often_and_accepts_often(drafted, accepted):
    assert drafted > 0 and 0.1 < accepted / drafted < 0.9  # both the accept and the residual paths run


def test_samples_follow_the_exact_distribution_with_top_k_and_a_shallow_exit(tiny16):
    model = tiny16
    processors = generate_processors(model, temperature=1.5, top_k=3)
    exact = exact_distribution(model, processors)
    policy = ExitPolicy(6, (3,), (1.0,), (0.0,), 3, 3, lookup_ngram=1, lookup_max=2)
    samples, drafted, accepted = draw(HFCausalLM(model), lambda: Speculator.for_policy(policy), processors, 600, seed=0)
    _rejects_often_and_accepts_often(drafted, accepted)
    assert chi_square_pvalue(exact, samples) >= ALPHA


def test_samples_follow_the_exact_distribution_with_top_p_and_a_short_list_head(tiny16):
    model = tiny16
    processors = generate_processors(model, temperature=0.9, top_p=0.85, top_k=0)
    exact = exact_distribution(model, processors)
    g = torch.Generator().manual_seed(7)
    weights = ExitHeadWeights(
        shortlist=torch.tensor([0, 1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 15]),
        lens={2: (torch.eye(64) + 0.05 * torch.randn(64, 64, generator=g), torch.zeros(64))},
    )
    lm = HFCausalLM(model, exit_weights=weights)
    policy = ExitPolicy(6, (2, 5), (1.0, 1.0), (0.5, 0.0), 5, 3)
    samples, drafted, accepted = draw(lm, lambda: Speculator.for_policy(policy), processors, 600, seed=1)
    _rejects_often_and_accepts_often(drafted, accepted)
    assert chi_square_pvalue(exact, samples) >= ALPHA


def _draw_from_p_on_rejection(draft_tokens, q, p, u, finite_rows=None):
    """A deliberately biased rule: right acceptance test, wrong distribution after a rejection."""
    k = len(draft_tokens)
    n = 0
    while n < k and u[n] * q[n, draft_tokens[n]] < p[n, draft_tokens[n]]:
        n += 1
    return Acceptance(n, int(sample_index(p[n], u[k])), k)


def test_the_same_test_rejects_a_biased_acceptance_rule(tiny16, monkeypatch):
    model = tiny16
    processors = generate_processors(model, temperature=1.5, top_k=3)
    exact = exact_distribution(model, processors)
    policy = ExitPolicy(6, (3,), (1.0,), (0.0,), 3, 3, lookup_ngram=1, lookup_max=2)
    monkeypatch.setattr(engine, "speculative_accept", _draw_from_p_on_rejection)
    samples, drafted, accepted = draw(HFCausalLM(model), lambda: Speculator.for_policy(policy), processors, 400, seed=0)
    assert drafted > accepted > 0
    assert chi_square_pvalue(exact, samples) < ALPHA


# -- seeds, the API, custom_generate -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling-api")
    folder = make_tiny_model_folder(root / "model", num_layers=4, seed=3)
    loaded = resolve_model(str(folder))
    policy = ExitPolicy(4, (1, 2, 3), (1.0,) * 3, (0.0,) * 3, d_max=3, w_max=4, lookup_ngram=2, lookup_max=3)
    greedy_tuned = save_tiny_artifact(loaded, root / "greedy.safetensors", policy=policy)
    mode = DecodingMode.resolved(type(loaded.model.generation_config)(do_sample=True, temperature=0.7, top_k=50, top_p=0.9))
    sampling_tuned = save_tiny_artifact(loaded, root / "sampling.safetensors", policy=policy, metadata={"decoding_mode": mode.to_json()})
    return folder, greedy_tuned, sampling_tuned


IDS = torch.tensor([[1, 9, 10, 11, 12, 13, 9, 10, 11]])
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=24)


def test_the_same_seed_gives_the_same_output_through_every_entry_point(tiny):
    folder, _, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    by_generator = [m.generate(IDS, generator=torch.Generator().manual_seed(s), **SAMPLING) for s in (0, 0, 1)]
    assert torch.equal(by_generator[0], by_generator[1]) and not torch.equal(by_generator[0], by_generator[2])
    torch.manual_seed(0)
    a = m.generate(IDS, **SAMPLING)
    torch.manual_seed(0)
    b = m.generate(IDS, **SAMPLING)
    c = m.generate(IDS, **SAMPLING)  # the global generator moved on
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.inference_mode():
        via_hf = m.model.generate(
            IDS, custom_generate=m.custom_generate, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True, **SAMPLING
        )
    assert torch.equal(via_hf.sequences, by_generator[0]) and via_hf.specbound_stats.drafted > 0


def test_sampled_generation_drafts_accepts_and_stops_like_generate(tiny):
    folder, _, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    eos = m.eos_token_ids[0]
    total_drafted = total_accepted = 0
    for s in range(6):
        run = m.generate_with_stats(IDS, generator=torch.Generator().manual_seed(s), min_p=0.05, **SAMPLING)
        out, stats = run.sequences[0, IDS.shape[1] :].tolist(), run.stats
        assert len(out) == stats.new_tokens == sum(stats.accept_lengths) <= 24
        assert eos not in out[:-1] and (len(out) == 24 or out[-1] == eos)
        total_drafted += stats.drafted
        total_accepted += stats.accepted
    assert total_drafted > total_accepted > 0


def _warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    assert all(w.category is SpecBoundWarning for w in caught)
    return [str(w.message) for w in caught]


def test_decoding_in_another_mode_than_tuned_warns_once(tiny):
    folder, greedy_tuned, sampling_tuned = tiny
    m = sb.load(str(folder), artifact=sampling_tuned)
    assert not _warnings(lambda: m.generate(IDS, generator=torch.Generator().manual_seed(0), **SAMPLING))  # its own mode
    (message,) = _warnings(lambda: (m.generate(IDS, max_new_tokens=4), m.generate(IDS, max_new_tokens=4, do_sample=True, temperature=1.3)))
    assert "tuned for sampling (temperature=0.7, top_k=50, top_p=0.9" in message and "greedy" in message
    old = sb.load(str(folder), artifact=greedy_tuned)  # an artifact that names no mode was tuned greedily
    assert old.tuned_mode == DecodingMode()
    (message,) = _warnings(lambda: [old.generate(IDS, generator=torch.Generator().manual_seed(s), **SAMPLING) for s in (0, 1)])
    assert "tuned for greedy" in message
    assert json.loads(DecodingMode.sampling(temperature=0.5).to_json())["temperature"] == 0.5


def test_host_reads_under_sampling_stay_one_per_exit_decision_and_per_verification(tiny, monkeypatch):
    folder, _, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    processors = generate_processors(m.model, temperature=0.7, top_p=0.9)
    decisions = []
    real = drafters.decide_exit
    monkeypatch.setattr(drafters, "decide_exit", lambda *a: decisions.append(1) or real(*a))
    drafter = Speculator.for_policy(m.policy)
    with torch.inference_mode():
        generate(m.lm, IDS[0].tolist(), 40, drafter, m.eos_token_ids, logits_processor=processors, sampler=Sampler(torch.Generator().manual_seed(0)))
        decisions.clear()
        with HostReadCounter() as reads:
            result = generate(
                m.lm, IDS[0].tolist(), 40, drafter, m.eos_token_ids, logits_processor=processors,
                sampler=Sampler(torch.Generator().manual_seed(1)),
            )
    assert len(decisions) > 0 and result.drafted > 0
    assert reads.count <= len(decisions) + result.verify_passes + result.fallbacks, (reads.count, len(decisions), result.verify_passes)


def test_plain_sampling_through_the_engine_is_generate_sampling_in_distribution(tiny16):
    """NoDrafter under sampling: one token per pass, from p (the first-token distribution)."""
    model = tiny16
    processors = generate_processors(model, temperature=1.5, top_k=3)
    exact = exact_distribution(model, processors, length=1)
    g = torch.Generator().manual_seed(3)
    samples = [tuple(generate(HFCausalLM(model), PROMPT, 1, NoDrafter(), [EOS], logits_processor=processors, sampler=Sampler(g)).token_ids) for _ in range(300)]
    counts = [samples.count(s) for s in exact]
    assert sum(counts) == 300 and chisquare(counts, np.array(list(exact.values())) * 300 / sum(exact.values())).pvalue >= ALPHA


def test_decode_cli_samples_reproducibly_per_prompt_from_the_seed(tiny, tmp_path):
    from clitools import assert_one_error, invoke

    folder, _, artifact = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7"}\n{"prompt": "w5 w6 w7"}\n')
    args = ("decode", "-m", folder, "-a", artifact, "-f", prompts, "-n", 12, "--temperature", "0.9", "--top-p", "0.95", "--json")

    def run(*extra):
        result = invoke(*args, *extra)
        assert result.exit_code == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    first, again, other = run("--seed", "3"), run("--seed", "3"), run("--seed", "4")
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]  # reproducible
    assert first[0]["seed"] != first[1]["seed"] and first[0]["token_ids"] != first[1]["token_ids"]  # same prompt, independent samples
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]
    assert first[0]["decoding"].startswith("sampling (temperature=0.9") and sum(r["accept_lengths"] != [1] * r["new_tokens"] for r in first + other) > 0
    assert_one_error(invoke(*args, "--check-exact"), 2, "--check-exact compares greedy outputs")
    assert_one_error(invoke("decode", "-m", folder, "-p", "w5", "--seed", "1"), 2, "--seed seeds sampling")


def test_decode_prints_a_mode_warning_as_one_line(tiny):
    """The CLI shows the library's warning as one `warning: ...` line on stderr, once."""
    from clitools import invoke

    folder, _, sampling_tuned = tiny
    result = invoke("decode", "-m", folder, "-a", sampling_tuned, "-p", "w9 w10 w11", "-n", 6, "--no-chat")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "tuned for" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: the artifact was tuned for sampling"), result.stderr

"""`specbound bench --temperature/--top-p`: every method samples with the same settings and
seeds against generate(do_sample=True), and the distribution check separates samplers that are
right from ones that are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clitools import assert_one_error, invoke
from specbound.bench import harness as H
from specbound.bench.distribution import pit_values, uniformity_pvalue
from specbound.bench.measurements import MEASUREMENTS_FILE
from specbound_runtime.exactness import reference_generate
from specbound_runtime.generation import prepared_by_generate
from specbound_runtime.sampling import DecodingMode, prompt_seed
from test_bench import TOKENS, _bench, tiny  # noqa: F401  (a fixture)
from tiny_models import tiny_model

SAMPLING = dict(temperature=0.8, top_p=0.9)


@pytest.fixture(scope="module")
def sampled(tiny):
    return _bench(tiny, tiny[0] / "out-sampling", tasks=("qa",), repeats=2, prompts_per_task=2, sample_seed=5, **SAMPLING)


def test_a_sampling_bench_runs_every_method_against_generate_sampling(sampled, tiny):
    results = sampled.results
    settings, overall = results["settings"], results["summary"]["overall"]
    assert settings["reference"] == "hf-sample" and settings["sample_seed"] == 5 and "top_p=0.9" in settings["decoding"]
    assert set(overall) == {"hf-sample", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound"}
    for m, row in overall.items():
        assert row["distribution_tokens"] == row["new_tokens"] > 0 and 0.0 <= row["distribution_pvalue"] <= 1.0, m
        assert row["exact"] is None and row["speedup"] > 0
    assert overall["specbound"]["drafted"] > 0 and overall["hf-sample"]["mean_accepted_length"] == 1.0
    # against `ar` too, speed is tokens per second: the sampled answers differ in length
    for row in results["summary"].values():
        for m, figures in row.items():
            expected = figures["tokens_per_s"] / row["ar"]["tokens_per_s"]
            assert figures["speedup_vs_ar"] == pytest.approx(expected, abs=1e-3), m
    assert "Speedup over hf-sample" in sampled.table and "distribution check p-value" in sampled.table
    # answer i is seeded from (seed, i): hf-sample is exactly generate(do_sample=True) after torch.manual_seed
    root, model, artifact = tiny
    import specbound_runtime as sb

    m = sb.load(str(model))
    lines = [json.loads(x) for x in (tiny[0] / "out-sampling" / MEASUREMENTS_FILE).read_text().splitlines()[1:]]
    ref0 = next(x for x in lines if x["method"] == "hf-sample" and x["answer"] == 0 and x["repeat"] == 0)
    from specbound.bench.answers import bench_answers
    from specbound_runtime.decoder import Decoder

    answer = bench_answers(("qa",), 2)[0]
    enc = Decoder(m).encode([{"role": "user", "content": answer.prompt.turns[0]}], True, TOKENS)
    torch.manual_seed(prompt_seed(5, 0))
    assert reference_generate(m.model, list(enc.ids), TOKENS, m.eos_token_ids, DecodingMode.sampling(**SAMPLING)) == ref0["token_ids"]
    # the same seed in every repeat: the same sample
    for method in ("specbound", "ar", "hf-sample"):
        reps = [x["token_ids"] for x in lines if x["method"] == method and x["answer"] == 1 and x["phase"] == "timed"]
        assert len(reps) == 2 and reps[0] == reps[1], method


def _answers(model, processors, n, length, greedy=False):
    out = []
    for i in range(n):
        prompt = [5 + i % 7, 9, 20 + i % 5]
        torch.manual_seed(i)
        mode = DecodingMode() if greedy else DecodingMode.sampling(temperature=1.2, top_k=20)
        out.append((prompt, reference_generate(model, prompt, length, (), mode)))
    return out


def test_the_distribution_check_accepts_samples_and_rejects_greedy_output():
    """The PIT of tokens drawn from the model is uniform (the KS p-value is not small); greedy
    tokens, always the most likely, give PIT values near 0 and a vanishing p-value."""
    model = tiny_model("llama", seed=2)
    _, processors = prepared_by_generate(model, DecodingMode.sampling(temperature=1.2, top_k=20))
    sampled = np.concatenate([pit_values(model, processors, p, t, seed=i).values for i, (p, t) in enumerate(_answers(model, processors, 12, 20))])
    greedy = np.concatenate([pit_values(model, processors, p, t, seed=i).values for i, (p, t) in enumerate(_answers(model, processors, 12, 20, True))])
    assert len(sampled) == len(greedy) == 240
    assert uniformity_pvalue(sampled) > 1e-3
    assert uniformity_pvalue(greedy) < 1e-6 and greedy.mean() < 0.35
    assert uniformity_pvalue(np.zeros(0)) is None


@pytest.mark.parametrize(
    "args,message",
    [
        (("--temperature", "0", "--top-p", "0.9"), "--temperature 0 means greedy"),
        (("--top-p", "1.5"), "--top-p must lie in (0, 1]"),
        (("--temperature", "0.7", "--seed", "-1"), "--seed must be >= 0"),
    ],
)
def test_bad_sampling_flags_exit_2(tiny, args, message):
    root, model, artifact = tiny
    assert_one_error(invoke("bench", "-m", model, "--tasks", "qa", "--out", root / "bad", *args), 2, message)

"""The real packaged model: SmolLM2-135M-Instruct, fp32, token-identical to generate()."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

N_PROMPTS = 20
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2():
    import specbound_runtime as sb

    m = sb.load("smollm2-135m")
    return m, m.eos_token_ids


@pytest.fixture(scope="module")
def mt_bench_prompts():
    from specbound.data.tasks import task_prompts

    return [p.text for p in task_prompts("mt-bench", N_PROMPTS)]


def _report(model, prompt_ids, ours, ref):
    from specbound_runtime.exactness import divergence

    div = divergence(model, prompt_ids, ours, ref)
    return "identical" if div is None else div.describe()


def test_speculation_with_the_paper_schedule_is_token_identical(smollm2, mt_bench_prompts):
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy

    loaded, eos = smollm2
    decoder = Decoder(loaded)
    drafted = 0
    for text in mt_bench_prompts:
        enc = decoder.encode([{"role": "user", "content": text}], True, NEW_TOKENS)
        ref = reference_greedy(loaded.model, list(enc.ids), NEW_TOKENS, eos)
        result = decoder.generate(enc)
        ours = list(result.token_ids)
        assert ours == ref, _report(loaded.model, list(enc.ids), ours, ref)
        drafted += result.drafted
    assert drafted > 100  # speculation really happened


def test_fitted_head_and_plain_engine_are_token_identical(smollm2, mt_bench_prompts):
    """A short-list head with a lens (here a random one: drafts are often wrong) changes speed,
    never tokens; nor does plain decoding through the engine."""
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy
    from specbound_runtime.exit_head import ExitHeadWeights
    from specbound_runtime.policy import ExitPolicy

    loaded, eos = smollm2
    g = torch.Generator().manual_seed(0)
    hidden = loaded.model.config.hidden_size
    lens = {l: (torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden, generator=g), torch.zeros(hidden)) for l in (20, 25)}
    weights = ExitHeadWeights(shortlist=torch.randperm(loaded.model.config.vocab_size, generator=g)[:4096].sort().values, lens=lens)
    policy = ExitPolicy(30, (20, 25), (1.0, 0.8), (0.3, 0.3), d_max=25, w_max=6)
    fitted = Decoder(loaded.with_policy(policy, weights))
    for text in mt_bench_prompts[:4]:
        enc = fitted.encode([{"role": "user", "content": text}], True, 64)
        ref = reference_greedy(loaded.model, list(enc.ids), 64, eos)
        assert list(fitted.generate(enc).token_ids) == ref
        assert list(fitted.generate(enc, speculation=False).token_ids) == ref

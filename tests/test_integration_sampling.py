"""The real packaged model under sampling: SpecBound's first generated tokens and
generate(do_sample=True)'s agree in distribution (a two-sample test), with drafts really made.

Pearson's chi-square test of homogeneity on the first FIRST_TOKENS generated tokens (as one
category per continuation; continuations seen fewer than 5 times in both samples together are
pooled), N samples from each. The threshold is fixed in advance: fail when p < ALPHA = 1e-3, a
false alarm for 0.1% of seeds. Samples are drawn ROWS at a time, as rows of one batch of the same
prompt: each row of a batch is distributed as its prompt alone (batch.py; transformers' batched
sampling too), so this is also the batch engine's sampling test on the real model. About a
minute on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from specbound_runtime.policy import ExitPolicy

pytestmark = pytest.mark.integration

ALPHA = 1e-3
N = 400
ROWS = 25
FIRST_TOKENS = 3
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9)
PROMPT = "Name one colour of the rainbow and say why you like it."


def homogeneity_pvalue(a: list[tuple], b: list[tuple]) -> float:
    keys = sorted(set(a) | set(b))
    counts = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]])
    big = counts.sum(0) >= 5
    table = np.concatenate([counts[:, big], counts[:, ~big].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table).pvalue)


def first_tokens(m, ids, n: int, seed: int, policy: ExitPolicy | None) -> tuple[list[tuple], int]:
    """n samples of the first FIRST_TOKENS tokens, ROWS at a time: SpecBound's batch engine
    drafting every round (policy given), or transformers' generate() on the repeated prompt."""
    from specbound_runtime.batch import generate_batch
    from specbound_runtime.drafters import Speculator
    from specbound_runtime.generation import prepared_by_generate
    from specbound_runtime.sampling import DecodingMode, Sampler

    samples, drafted = [], 0
    prompt = ids[0].tolist()
    processors = prepared_by_generate(m.model, DecodingMode.sampling(**{k: v for k, v in SAMPLING.items() if k != "do_sample"}))[1]
    g = torch.Generator().manual_seed(seed)
    for _ in range(n // ROWS):
        if policy is not None:
            eos = frozenset(m.eos_token_ids)
            run = generate_batch(
                m.lm, [prompt] * ROWS, FIRST_TOKENS + 1, lambda: Speculator.for_batch(policy, eos), eos,
                logits_processor=processors, sampler=Sampler(g), adaptive=False,
            )
            rows, drafted = [r.token_ids for r in run.rows], drafted + run.drafted
        else:
            torch.manual_seed(seed + len(samples))
            batch = ids.repeat(ROWS, 1)
            with torch.inference_mode():
                out = m.model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=FIRST_TOKENS, **SAMPLING)
            rows = out[:, ids.shape[1] :].tolist()
        samples += [tuple(r[:FIRST_TOKENS]) for r in rows]
    return samples, drafted


def test_first_tokens_match_generate_sampling_in_distribution():
    import specbound_runtime as sb

    m = sb.load("smollm2-135m")
    # eager drafting (1-gram prompt lookup, and the row's own sampled tokens to look up from):
    # most samples carry drafts to accept or reject
    drafting = ExitPolicy(30, (), (), (), 25, 4, lookup_ngram=1, lookup_max=3)
    ids = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    ours, drafted = first_tokens(m, ids, N, seed=0, policy=drafting)
    theirs, _ = first_tokens(m, ids, N, seed=10_000, policy=None)
    assert drafted > N / 2
    assert len(set(theirs)) > 3  # the settings leave room to sample: a real test, not a constant
    pvalue = homogeneity_pvalue(ours, theirs)
    print(f"two-sample chi-square on the first {FIRST_TOKENS} tokens, {N} samples each: p = {pvalue:.4g}; {drafted} drafts made")
    assert pvalue >= ALPHA

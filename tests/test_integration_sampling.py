"""The real packaged model under sampling: SpecBound's first generated tokens and
generate(do_sample=True)'s agree in distribution (a two-sample test), with drafts really made.

Pearson's chi-square test of homogeneity on the first FIRST_TOKENS generated tokens (as one
category per continuation; continuations seen fewer than 5 times in both samples together are
pooled), N samples from each. The threshold is fixed in advance: fail when p < ALPHA = 1e-3, a
false alarm for 0.1% of seeds. About 2-3 minutes on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from specbound_runtime.policy import ExitPolicy

pytestmark = pytest.mark.integration

ALPHA = 1e-3
N = 250
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


def first_tokens(m, ids, n: int, seed: int, speculative: bool) -> tuple[list[tuple], int]:
    samples, drafted = [], 0
    for i in range(n):
        if speculative:
            run = m.generate_with_stats(ids, max_new_tokens=FIRST_TOKENS + 1, generator=torch.Generator().manual_seed(seed + i), **SAMPLING)
            out, drafted = run.sequences, drafted + run.stats.drafted
        else:
            torch.manual_seed(seed + i)
            with torch.inference_mode():
                out = m.model.generate(ids, max_new_tokens=FIRST_TOKENS, **SAMPLING)
        samples.append(tuple(out[0, ids.shape[1] : ids.shape[1] + FIRST_TOKENS].tolist()))
    return samples, drafted


def test_first_tokens_match_generate_sampling_in_distribution():
    import specbound_runtime as sb

    m = sb.load("smollm2-135m")
    # eager drafting (low thresholds, prompt lookup): most samples carry drafts to accept or reject
    drafting = m.with_policy(ExitPolicy(30, (20, 25), (1.0, 1.0), (0.3, 0.2), 25, 4, 1, 3))
    ids = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    ours, drafted = first_tokens(drafting, ids, N, seed=0, speculative=True)
    theirs, _ = first_tokens(m, ids, N, seed=10_000, speculative=False)
    assert drafted > N / 2
    assert len(set(theirs)) > 3  # the settings leave room to sample: a real test, not a constant
    pvalue = homogeneity_pvalue(ours, theirs)
    print(f"two-sample chi-square on the first {FIRST_TOKENS} tokens, {N} samples each: p = {pvalue:.4g}; {drafted} drafts made")
    assert pvalue >= ALPHA

"""The distribution check of a sampling bench: are a method's tokens samples of the model?

Under sampling, outputs differ from run to run and from method to method; what must agree is
their distribution. The check uses the randomized probability integral transform (Rosenblatt):
for each generated token y_t, with p_t the full model's distribution at that position after
exactly the processors and warpers generate() applies (`generation.prepared_by_generate`, scored
by one teacher-forced forward pass), and tokens ordered by decreasing p_t (ties by id),

    u_t = P_t(tokens before y_t) + V_t * p_t(y_t),   V_t ~ Uniform(0, 1) independent,

is Uniform(0, 1), independently for every t, exactly when each y_t was drawn from p_t given the
tokens before it. A method that samples correctly gives uniform u's; one that prefers likely
tokens (drafts accepted too often) pushes them towards 0, one that prefers unlikely tokens
towards 1. The p-value is the Kolmogorov-Smirnov test of the pooled u's of a task's answers
against Uniform(0, 1): under a correct sampler it is uniform on [0, 1] (a false alarm at level
a happens with probability a). Pooling answers that stop at end-of-sequence (a stopping time)
keeps the u's uniform in expectation; with 128-token answers the effect on the test is negligible.

Teacher-forced logits differ from incremental decoding's by rounding, so a sampled token can
fall just outside a top-p set as scored here (p_t(y) = 0); such tokens are counted
(`impossible`) and scored at the set's edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PIT:
    values: np.ndarray  # u_t per generated token
    impossible: int  # tokens the teacher-forced p_t gave probability 0


def pit_values(model, processors, prompt_ids, token_ids, seed: int) -> PIT:
    """The randomized PIT of every generated token (V_t from numpy's generator seeded `seed`)."""
    from specbound_runtime.engine import target_scores

    token_ids = list(token_ids)
    if not token_ids:
        return PIT(np.zeros(0), 0)
    prompt_ids = list(prompt_ids)
    ids = torch.tensor([prompt_ids + token_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        scores = target_scores(logits, prompt_ids, token_ids[:-1], processors)
        probs = torch.softmax(scores.float(), dim=-1).double().cpu()
    chosen = torch.tensor(token_ids)
    p_y = probs[torch.arange(len(token_ids)), chosen]
    # mass of the tokens ranked before y: more likely, or as likely with a smaller id
    vocab = torch.arange(probs.shape[1])
    before = (probs > p_y[:, None]) | ((probs == p_y[:, None]) & (vocab[None, :] < chosen[:, None]))
    lower = (probs * before).sum(-1)
    v = np.random.default_rng(seed).random(len(token_ids))
    u = np.clip(lower.numpy() + v * p_y.numpy(), 0.0, 1.0)
    return PIT(u, int((p_y == 0).sum()))


def uniformity_pvalue(values: np.ndarray) -> float | None:
    """Kolmogorov-Smirnov p-value of values against Uniform(0, 1); None without values."""
    from scipy.stats import kstest

    if len(values) == 0:
        return None
    return float(kstest(values, "uniform").pvalue)

"""Verification as pure functions, one per decoding mode: drafts and the full model's scores in,
what is kept out. `accept` for greedy decoding, `speculative_accept` for sampling. Each reads the
device once (one host read per verification)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .host import read
from .sampling import exact_dtype, sample_index


@dataclass(frozen=True)
class Acceptance:
    """accepted_length drafts are kept, then the full model's own next token (under sampling: the
    token drawn from the residual distribution at the first rejection, or from p after the last
    draft).

    trusted is False when a row the decision rests on (rows 0..accepted_length) had non-finite
    logits: such a decision must be redone, never emitted."""

    accepted_length: int
    next_token: int
    drafted: int
    trusted: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.accepted_length <= self.drafted):
            raise ValueError(f"accepted {self.accepted_length} of {self.drafted} drafts")

    @property
    def tokens_emitted(self) -> int:
        """Tokens this verification pass adds: the accepted drafts plus the full model's token."""
        return self.accepted_length + 1


def accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor, finite_rows: torch.Tensor | None = None) -> Acceptance:
    """Longest prefix of draft_tokens ([k]) that greedy decoding would have produced.

    target_logits ([k + 1, V]) row i is the full model's scores for the token at draft slot i;
    row k predicts the token after the last draft. finite_rows ([k + 1] bool), when given, says
    which rows came from finite logits. One host read (one device synchronisation) in all.
    """
    k = int(draft_tokens.shape[0])
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} rows of target logits for {k} drafts, got {target_logits.shape[0]}")
    targets = target_logits.argmax(dim=-1)
    if finite_rows is None:
        finite_rows = torch.ones_like(targets, dtype=torch.bool)
    values = read(torch.cat([targets, finite_rows.to(targets.dtype)]))
    chosen, finite = values[: k + 1], values[k + 1 :]
    drafts = draft_tokens.tolist()
    n = 0
    while n < k and chosen[n] == drafts[n]:
        n += 1
    return Acceptance(accepted_length=n, next_token=chosen[n], drafted=k, trusted=all(finite[: n + 1]))


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    finite_rows: torch.Tensor | None = None,
) -> Acceptance:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for one chain of drafts.

    draft_tokens [k]: the drafts; draft_probs q [k, V]: row i is the distribution draft i was drawn
    from (one-hot for a deterministic proposal such as prompt lookup); target_probs p [k + 1, V]:
    row i is the full model's distribution at draft slot i after exactly the processors and
    warpers generate() applies there, row k the one after the last draft; uniforms [k + 1]: uniform
    numbers in [0, 1), u_i decides draft i, u_k draws the emitted token.

    Draft i is accepted when u_i * q_i(x_i) < p_i(x_i), that is with probability
    min(1, p_i(x_i) / q_i(x_i)); drafts are kept up to the first rejection. At a rejection at slot n
    the emitted token is drawn from normalize(max(0, p_n - q_n)); after k accepted drafts, from
    p_k. The emitted sequence is then distributed exactly as sampling from p token by token.
    A pure function of its arguments; one host read in all."""
    k = int(draft_tokens.shape[0])
    if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k or uniforms.shape[0] != k + 1:
        raise ValueError(
            f"for {k} drafts need {k} draft rows, {k + 1} target rows and {k + 1} uniforms, got "
            f"{draft_probs.shape[0]}, {target_probs.shape[0]} and {uniforms.shape[0]}"
        )
    p = target_probs.to(exact_dtype(target_probs.device))
    q = _on(draft_probs, p.device).to(p.dtype)
    drafts = _on(draft_tokens, p.device)
    rows = torch.arange(k, device=p.device)
    u = _on(uniforms, p.device).to(p.dtype)
    accepted = u[:k] * q[rows, drafts] < p[rows, drafts]
    n = torch.cumprod(accepted.long(), dim=0).sum()  # leading accepted drafts, on the device
    # the distribution the emitted token comes from, for every possible n; then row n of it
    residual = torch.cat([(p[:k] - q).clamp(min=0), p[k:]])
    row = residual.index_select(0, n.view(1))[0]
    # p_n == q_n up to rounding (a rejection is then all but impossible): draw from p_n itself
    row = torch.where(row.sum() > 0, row, p.index_select(0, n.view(1))[0])
    token = sample_index(row, u[k])
    if finite_rows is None:
        finite_rows = torch.ones(k + 1, dtype=torch.bool, device=p.device)
    values = read(torch.cat([n.view(1), token.view(1), _on(finite_rows, p.device).long()]))
    length, next_token, finite = values[0], values[1], values[2:]
    return Acceptance(accepted_length=length, next_token=next_token, drafted=k, trusted=all(finite[: length + 1]))


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`, copied only when it lives elsewhere (a copy to the host would be a read)."""
    return t if t.device == device else t.to(device)

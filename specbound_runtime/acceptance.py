"""Greedy verification as a pure function: drafts and the full model's logits in, what is kept out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .host import read


@dataclass(frozen=True)
class Acceptance:
    """accepted_length drafts are kept, then the full model's own next token.

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

"""Greedy verification as a pure function: drafts and the full model's logits in, what is kept out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Acceptance:
    """accepted_length drafts are kept, then the full model's own next token."""

    accepted_length: int
    next_token: int
    drafted: int

    def __post_init__(self) -> None:
        if not (0 <= self.accepted_length <= self.drafted):
            raise ValueError(f"accepted {self.accepted_length} of {self.drafted} drafts")

    @property
    def tokens_emitted(self) -> int:
        """Tokens this verification pass adds: the accepted drafts plus the full model's token."""
        return self.accepted_length + 1


def accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Acceptance:
    """Longest prefix of draft_tokens ([k]) that greedy decoding would have produced.

    target_logits ([k + 1, V]) row i is the full model's prediction for the token at draft slot i;
    row k predicts the token after the last draft.
    """
    k = int(draft_tokens.shape[0])
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} rows of target logits for {k} drafts, got {target_logits.shape[0]}")
    targets = target_logits.argmax(dim=-1)
    matches = (targets[:k] == draft_tokens).int()
    # cumprod keeps 1 only up to the first mismatch
    n = int(matches.cumprod(0).sum()) if k else 0
    return Acceptance(accepted_length=n, next_token=int(targets[n]), drafted=k)

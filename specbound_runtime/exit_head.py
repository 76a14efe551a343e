"""Draft heads: how a shallow hidden state becomes draft logits at an exit-check layer.

The plain head is the model's own (final norm, LM head, soft-capping), over the full vocabulary:
the paper's logit lens. A fitted head adds, per check layer, an affine map of the normalised
state towards the final normalised state (closed-form ridge, fitted by `calibrate`), and scores
only a short-list of the vocabulary, which makes an exit check ~10x cheaper than a full LM-head
product. Both maps fold into one matrix per layer at load time, so the map costs nothing extra.
Drafts need not be right: verification decides. A head only changes speed, never the output.

The fitted next-token head is a draft source of its own, at no layer cost: an affine map (closed-form
ridge, fitted by `calibrate`) of [norm(h_t); e(x_{t+1})] -- the final state of the last verified
position and the input embedding of the token the full model just chose -- towards norm(h_{t+1}),
read through the same short-list of the LM head; its argmax is a draft for x_{t+2}. Folded with the
short-list rows at load time like the lens, so a draft costs one [2H] x [2H, S] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExitHeadWeights:
    """What an artifact stores. lens[l] = (W [H, H], b [H]) maps norm(h_l) towards norm(h_L)."""

    shortlist: torch.Tensor | None  # [S] token ids, or None for the full vocabulary
    lens: dict[int, tuple[torch.Tensor, torch.Tensor]]
    # the fitted next-token head: (W [2H, H], b [H]) maps [norm(h_t); e(x_{t+1})] towards norm(h_{t+1})
    next_head: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.shortlist is not None:
            if self.shortlist.ndim != 1 or self.shortlist.numel() == 0:
                raise ValueError("shortlist must be a non-empty 1-D tensor of token ids")
            if self.shortlist.dtype not in (torch.int32, torch.int64):
                raise ValueError("shortlist must hold integer token ids")
        for layer, (w, b) in self.lens.items():
            if w.ndim != 2 or w.shape[0] != w.shape[1] or b.shape != (w.shape[0],):
                raise ValueError(f"lens for layer {layer} must be W [H, H] and b [H]")
        if self.next_head is not None:
            w, b = self.next_head
            if w.ndim != 2 or w.shape[0] != 2 * w.shape[1] or b.shape != (w.shape[1],):
                raise ValueError(
                    f"the next-token head must be W [2H, H] and b [H], got {list(w.shape)} and {list(b.shape)}"
                )


class FittedExitHead:
    """Callable exit head bound to one model: (hidden [1, k, H], layer) -> logits [k, S]."""

    def __init__(self, weights: ExitHeadWeights, final_norm, lm_head_weight: torch.Tensor, softcap=None):
        self.final_norm = final_norm
        self.softcap = softcap
        vocab = lm_head_weight.shape[0]
        if weights.shortlist is not None:
            ids = weights.shortlist.long()
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"shortlist token ids must lie in 0..{vocab - 1}")
            self.token_ids = ids
            self.token_list = ids.tolist()  # on the host: mapping a draft to its token id never syncs
            rows = lm_head_weight[ids.to(lm_head_weight.device)]
        else:
            self.token_ids = None
            self.token_list = None
            rows = lm_head_weight
        rows = rows.detach()
        self._plain = rows.t().contiguous()  # [H, S]
        self._per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        fold = torch.promote_types(rows.dtype, torch.float32)
        exact = rows.to(fold)
        for layer, (w, b) in weights.lens.items():
            w = w.to(device=rows.device, dtype=fold)
            b = b.to(device=rows.device, dtype=fold)
            # logits = (x W + b) rows^T = x (W rows^T) + (b rows^T); folded in float32 (float64
            # for a float64 model), then stored in the model's dtype
            self._per_layer[layer] = (
                (w @ exact.t()).to(rows.dtype).contiguous(),
                (b @ exact.t()).to(rows.dtype).contiguous(),
            )
        self._next = None
        if weights.next_head is not None:
            w, b = (t.to(device=rows.device, dtype=fold) for t in weights.next_head)
            self._next = ((w @ exact.t()).to(rows.dtype).contiguous(), (b @ exact.t()).to(rows.dtype).contiguous())

    @property
    def has_next_head(self) -> bool:
        return self._next is not None

    def next_logits(self, normed_state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The next-token head: normed_state [..., H] (a final state through the final norm) and
        embedded [..., H] (the input embedding of the token that state predicted) -> logits
        [..., S] for the token after that one. Without soft-capping: only the argmax is used, and
        soft-capping is monotone."""
        w, b = self._next
        x = torch.cat([normed_state, embedded.to(normed_state.dtype)], dim=-1)
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
        return out.reshape(*x.shape[:-1], -1)

    def logits(self, normed: torch.Tensor, layer: int) -> torch.Tensor:
        """normed [..., H] (already through the final norm) -> logits [..., S]."""
        fitted = self._per_layer.get(layer)
        if fitted is None:
            out = normed @ self._plain
        else:
            out = torch.addmm(fitted[1], normed.reshape(-1, normed.shape[-1]), fitted[0])
            out = out.reshape(*normed.shape[:-1], -1)
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def __call__(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return self.logits(self.final_norm(hidden), layer)[0]

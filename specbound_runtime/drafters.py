"""Draft sources as parts, and the one object that composes them in the order the policy says.

Each source is a `DraftSource`: given the generation's state and how many drafts the round may
still take, it returns a `Proposal` (data: tokens, a parent index per token, the source's name,
the depth each token was drafted at, and q under sampling) or None. Sources never run layers
themselves: they ask the `DecodeState` (engine.py), the only thing that does.

- `PromptLookup`: the continuation of the longest matching tail in the committed tokens, sized by
  the match (`ExitPolicy.lookup_drafts`); no layers.
- `NextTokenHead`: one draft of the fitted next-token head from the state verified last round;
  no layers.
- `EarlyExit`: the paper's drafter, one token a call: exit at the first check layer whose
  calibrated confidence passes its threshold; a token that reaches the depth bound without
  exiting is a hard token and ends drafting.

`Speculator` runs a round: the sources that cost no layers are consulted in order, and the first
that proposes opens the round (lookup runs once, from committed tokens only, so the simulator
replays it exactly); then the layer source drafts on, up to the width bound. A draft that is an
end-of-sequence token ends the round. With the policy's guard prices, a guard (guard.py) pauses a
no-layer source whose drafts verification keeps too few of to pay for the wider pass.

A new source is one class here with its switch in `ExitPolicy.sources`; calibrate/ replays it
from recorded columns (calibrate/replay.py). Verification takes chains only: a proposal whose
parents branch (a tree) is refused by `DecodeState.extend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .acceptance import Acceptance
from .engine import DecodeState
from .guard import SOURCES, DraftGuard
from .policy import ExitPolicy, decide_exit
from .sampling import draft_probabilities, full_vocabulary


@dataclass(frozen=True)
class Proposal:
    """What a source proposes. parents[i]: the index of token i's parent among these tokens, -1
    for the round's root (the last token before them); a chain is (-1, 0, 1, ...). depths[i]: the
    layers token i was drafted from (0: none). q[i], under sampling: the distribution over the
    vocabulary it was drawn from; None (or q empty): a deterministic proposal, one-hot."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    source: str
    depths: tuple[int, ...]
    q: tuple[torch.Tensor | None, ...] = ()

    @classmethod
    def chain(cls, tokens, source: str, depth: int = 0, q: torch.Tensor | None = None) -> "Proposal":
        tokens = tuple(int(t) for t in tokens)
        n = len(tokens)
        return cls(tokens, tuple(range(-1, n - 1)), source, (depth,) * n, (q,) * n if q is not None else ())

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self.tokens) - 1))

    def __len__(self) -> int:
        return len(self.tokens)


class DraftSource(Protocol):
    """One way of proposing drafts. `source` names it in statistics and in the guard."""

    source: str

    def propose(self, state: DecodeState, limit: int) -> Proposal | None: ...


@dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup (no layers), as the policy's rule sizes it."""

    policy: ExitPolicy
    source: str = "lookup"

    def propose(self, state: DecodeState, limit: int) -> Proposal | None:
        tokens = self.policy.lookup_drafts(state.tokens, limit)
        return Proposal.chain(tokens, self.source) if tokens else None


@dataclass(frozen=True)
class NextTokenHead:
    """The fitted next-token head's one draft at the start of a round (no layers)."""

    source: str = "head"

    def propose(self, state: DecodeState, limit: int) -> Proposal | None:
        token = state.next_token_draft() if limit > 0 else None
        return None if token is None else Proposal.chain([token], self.source)


@dataclass(frozen=True)
class EarlyExit:
    """Early exit, one token a call: the first check layer whose calibrated confidence passes
    its threshold drafts it; None for a hard token (run to the depth bound, which ends drafting)."""

    policy: ExitPolicy
    source: str = "early-exit"

    def propose(self, state: DecodeState, limit: int) -> Proposal | None:
        for layer, temperature, threshold in self.policy.active_checks:
            logits = state.exit_logits(layer)
            if state.sampler is None:
                q = None
                decision = decide_exit(logits, temperature, threshold)
            else:  # sample the draft from q, in the same host read as the exit decision
                lm = state.lm
                q = draft_probabilities(logits, state.logits_processor, state.prefix_ids(), lm.exit_columns, lm.vocab_size)
                decision = decide_exit(logits, temperature, threshold, q, state.sampler.uniforms(1)[0])
            if decision.exits:
                full = None if q is None else full_vocabulary(q, state.lm.exit_columns, state.lm.vocab_size)
                return Proposal.chain([state.lm.exit_token(decision.token)], self.source, layer, full)
        state.advance_to(self.policy.d_max)  # a hard token: drafting stops here
        return None


@dataclass
class Speculator:
    """A round of drafting from parts: `opening` (no-layer sources; the first that proposes opens
    the round), then `extending` (drafts on, a token a call, up to the width bound). What the
    engine's loop calls (`draft`, `observe`). One per generation: the guard keeps its state."""

    opening: tuple[DraftSource, ...]
    extending: DraftSource | None
    w_max: int
    eos_token_ids: frozenset[int] = frozenset()
    guard: DraftGuard | None = None
    _round: tuple[str, int] | None = field(init=False, default=None)  # (source, drafts) of the round's opening

    @classmethod
    def for_policy(cls, policy: ExitPolicy, eos_token_ids=frozenset()) -> "Speculator":
        """The sources `policy.sources` names, in its order, with its guard."""
        parts = {"lookup": lambda: PromptLookup(policy), "head": NextTokenHead, "early-exit": lambda: EarlyExit(policy)}
        built = [parts[name]() for name in policy.sources]
        layered = [s for s in built if isinstance(s, EarlyExit)]
        return cls(
            tuple(s for s in built if not isinstance(s, EarlyExit)), layered[0] if layered else None, policy.w_max,
            frozenset(eos_token_ids), policy.guard(),
        )

    @classmethod
    def for_batch(cls, policy: ExitPolicy, eos_token_ids=frozenset(), width: int | None = None) -> "Speculator":
        """A batch row's drafter (batch.py): the policy's sources that cost no layers, in its
        order, with its guard; early exit is not a batch source. width: the row's draft bound in
        this batch (SpecBound.batch_width); None: the policy's own w_max."""
        full = cls.for_policy(policy, eos_token_ids)
        return cls(full.opening, None, policy.w_max if width is None else width, full.eos_token_ids, full.guard)

    def draft(self, seq: DecodeState, budget: int) -> None:
        limit = min(budget, self.w_max)
        self._round = None
        if limit < 1:
            return
        open_ = self.guard.open_sources() if self.guard is not None else SOURCES
        for source in self.opening:
            if source.source in SOURCES and source.source not in open_:
                continue
            proposal = source.propose(seq, limit)
            if proposal:
                pushed, ended = seq.extend(proposal, self.eos_token_ids)
                self._round = (proposal.source, pushed)
                if ended:
                    return
                break
        if self.extending is None:
            return
        while len(seq.drafts) < limit:
            proposal = self.extending.propose(seq, limit - len(seq.drafts))
            if proposal is None or seq.extend(proposal, self.eos_token_ids)[1]:
                return

    def trim(self, kept: int) -> None:
        """Only the round's first `kept` drafts go to verification (a batch round narrower than
        what was drafted): the guard counts those alone."""
        if self._round is not None:
            self._round = (self._round[0], min(self._round[1], kept))

    def observe(self, acceptance: Acceptance) -> None:
        """The guard learns what verification kept of the round's opening drafts (they come first
        in a round, so it kept min(accepted, drafted) of them)."""
        if self.guard is not None and self._round is not None and self._round[0] in SOURCES:
            source, drafted = self._round
            self.guard.record(source, drafted, min(acceptance.accepted_length, drafted))
        self._round = None

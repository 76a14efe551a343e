"""The run-time guard on the draft sources that cost no layers (prompt lookup, the next-token head).

Such a draft is free to make but not to verify: each one widens the verification pass. On prompts
unlike the calibration corpus a source can keep proposing drafts that are rejected (a 2-gram match
in code that leads nowhere), and then every round pays for a wider pass and gains nothing. The
guard watches what verification keeps of each source's drafts and stops a source whose recent
drafts do not pay for their width, then lets it try again later, as SWIFT and SuffixDecoding adapt
their speculation online.

The price of k drafts is `costs[k - 1]`: what widening the pass from 1 to k + 1 positions costs,
in plain decoding steps (written into the artifact by calibration from the cost model it tuned
under). A round where a source drafted k tokens and verification kept a of them adds a - costs[k-1]
to the source's credit, after halving it (recent rounds weigh most). When the credit drops below
zero the source pauses for 1 round, then 2, 4, ... up to MAX_PAUSE rounds while its probes keep
failing, with its credit cleared so that the probe alone decides; a probe that pays ends the backoff.

Deterministic given what verification kept, so calibration's simulator (calibrate.simulate) runs
this same class over recorded sequences and predicts the guarded decode loop exactly.
"""

from __future__ import annotations

SOURCES = ("lookup", "head")
MAX_PAUSE = 32  # rounds: a source that never pays costs one probe in about 33 rounds


class DraftGuard:
    """One generation's guard state (a fresh one per generation)."""

    def __init__(self, costs: tuple[float, ...]) -> None:
        if not costs:
            raise ValueError("the guard needs the price of at least one draft")
        self.costs = tuple(float(c) for c in costs)
        self.credit = dict.fromkeys(SOURCES, 0.0)
        self.pause = dict.fromkeys(SOURCES, 0)
        self.backoff = dict.fromkeys(SOURCES, 0)

    def open_sources(self) -> frozenset[str]:
        """At the start of a round that may draft: the sources allowed to; a paused source's
        pause shrinks by this round."""
        open_ = []
        for source in SOURCES:
            if self.pause[source]:
                self.pause[source] -= 1
            else:
                open_.append(source)
        return frozenset(open_)

    def record(self, source: str, drafted: int, kept: int) -> None:
        """After verification: `source` drafted `drafted` tokens this round (the round's first
        drafts) and verification kept `kept` of them."""
        if drafted < 1:
            return
        price = self.costs[min(drafted, len(self.costs)) - 1]
        credit = self.credit[source] / 2 + (kept - price)
        if credit < 0:
            self.backoff[source] = min(MAX_PAUSE, 2 * self.backoff[source] or 1)
            self.pause[source] = self.backoff[source]
            credit = 0.0
        else:
            self.backoff[source] = 0
        self.credit[source] = credit

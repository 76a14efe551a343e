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

import json
import statistics

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


MIN_PASSES = 8  # of one width, and of single positions, before the prices are compared


class PassCostWatch:
    """Whether this machine prices drafts as the artifact expects, from the passes decoding times
    anyway (GenerationResult.pass_widths/pass_seconds; nothing is measured at start-up).

    The measured price of k drafts is t(k + 1) / t(1) - 1, medians of the passes over k + 1 and
    over 1 position, against guard_costs[k - 1] (a price in plain steps; a plain step is one
    single-position pass plus the loop's fixed cost, which is small). Two limits from the artifact:
    `tolerance` (metadata cost_tolerance: how far the prices spread over the cost measurement's
    own rounds, plus a margin), within which a difference is noise; and `change` (metadata
    policy_change: the factors below and above 1 by which every price would have to move for
    tuning to choose another policy, a side None where the policy held at every factor tried that
    way). A difference counts when it is beyond the tolerance and, where the artifact says where
    the policy changes (`change` given), past that factor. An artifact made before policy_change
    existed gives no `change`: the tolerance alone decides."""

    def __init__(self, costs: tuple[float, ...], tolerance: float, change: tuple[float | None, float | None] | None = None) -> None:
        self.costs = tuple(costs)
        self.tolerance = float(tolerance)
        self.change = change
        self.times: dict[int, list[float]] = {}
        self.warned = False  # the caller warns once per run

    def add(self, widths, seconds) -> None:
        for width, s in zip(widths, seconds):
            self.times.setdefault(int(width), []).append(float(s))

    def drift(self) -> dict | None:
        """{drafts, measured, expected} for the most frequent draft width whose measured price is
        off by more than the tolerance; None while too few passes are timed, or when they agree."""
        ones = self.times.get(1, [])
        wide = [(len(t), w) for w, t in self.times.items() if 2 <= w <= len(self.costs) + 1 and len(t) >= MIN_PASSES]
        if len(ones) < MIN_PASSES or not wide:
            return None
        _, width = max(wide)
        measured = statistics.median(self.times[width]) / statistics.median(ones) - 1.0
        expected = self.costs[width - 2]
        if abs(measured - expected) <= self.tolerance:
            return None
        if self.change is not None and expected > 0:
            below, above = self.change
            ratio = measured / expected
            if (below is None or ratio > below) and (above is None or ratio < above):
                return None  # off, but not so far that another policy would do better
        return {"drafts": width - 1, "measured": round(measured, 3), "expected": round(expected, 3)}

    @classmethod
    def for_artifact(cls, policy, metadata: dict[str, str]) -> "PassCostWatch | None":
        """A watch on an artifact's prices, when it has them (a guarded policy) and says how far
        they may drift (metadata cost_tolerance, and policy_change where it was tuned with it);
        None otherwise, or when that metadata does not parse."""
        if not policy.guard_costs or "cost_tolerance" not in metadata:
            return None
        try:
            change = None  # an artifact from before policy_change: the tolerance alone decides
            if "policy_change" in metadata:
                bounds = json.loads(metadata["policy_change"])
                change = tuple(None if bounds.get(side) is None else float(bounds[side]) for side in ("below", "above"))
            return cls(policy.guard_costs, float(metadata["cost_tolerance"]), change)
        except (ValueError, TypeError, AttributeError):
            return None


def drift_warning(drift: dict) -> str:
    """What decode prints once when `PassCostWatch.drift` finds this machine's prices off."""
    return (
        f"warning: this machine prices {drift['drafts']} drafts at {drift['measured']} plain steps, the artifact "
        f"expects {drift['expected']}: far enough that tuning would choose another policy for this machine. Retune "
        "(minutes, no recording): specbound costs --out mine.json, then specbound calibrate --from-artifact "
        "ARTIFACT --costs mine.json --work-dir <its calibration's work folder>"
    )


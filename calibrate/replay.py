"""The runtime's no-layer draft sources, replayed over recorded statistics.

For each such source a policy uses (`ExitPolicy.sources`, in its order), a `simulate.Replay`:
what the source proposes at each recorded position and how much of it the full model keeps,
from the columns the recorder wrote (`collect.with_lookups`, the next-token head's rows). The
simulator composes them as `specbound_runtime.drafters.Speculator` composes the sources
themselves. A new source adds its builder to REPLAYS; the simulator does not change.
"""

from __future__ import annotations

import numpy as np

from specbound_runtime.policy import ExitPolicy

from .collect import Records, lookup_column
from .simulate import Replay


def lookup_replay(policy: ExitPolicy, proposed: np.ndarray, right: np.ndarray, size: np.ndarray | None) -> Replay:
    """Prompt lookup under the policy's rule: of `proposed` tokens found after a match of `size`
    tokens (`right` of them lead the true continuation), it drafts what `ExitPolicy.lookup_width`
    allows for that match."""
    longest = policy.lookup_rule[0]
    widths = np.asarray([policy.lookup_width(s) for s in range(longest + 1)])
    if (widths == widths[0]).all():
        drafts = np.minimum(proposed, widths[0])
    elif size is None:
        raise ValueError("sizing lookup drafts by the match needs the matched sizes")
    else:
        drafts = np.minimum(proposed, widths[np.minimum(size, longest)])
    return Replay("lookup", drafts, right)


def head_replay(kept: np.ndarray) -> Replay:
    """The next-token head: one draft at every round's start, kept where `kept`; it costs one
    short-list head product (priced as an exit check)."""
    return Replay("head", np.ones(len(kept), dtype=np.int64), kept.astype(np.int64), reads=1)


def _lookup(records: Records, policy: ExitPolicy) -> Replay | None:
    if records.lookup_proposed is None:
        return None
    g = lookup_column(*policy.lookup_rule)
    size = None if records.lookup_size is None else records.lookup_size[:, g]
    return lookup_replay(policy, records.lookup_proposed[:, g], records.lookup_right[:, g], size)


def _head(records: Records, policy: ExitPolicy) -> Replay:
    if not records.has_head:
        raise ValueError("a policy with the next-token head needs records of it")
    return head_replay(records.head_draft_right())


# source name -> its replay from records (None: the records cannot replay it, so it drafts nothing)
REPLAYS = {"lookup": _lookup, "head": _head}


def replays(records: Records, policy: ExitPolicy) -> list[Replay]:
    """The policy's no-layer sources replayed over `records`, in the order a round consults them."""
    built = (REPLAYS[name](records, policy) for name in policy.sources if name in REPLAYS)
    return [r for r in built if r is not None]

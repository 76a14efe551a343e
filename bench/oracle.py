"""The oracle: not run, simulated. The only part of the bench that needs the calibration code.

For each answer, the per-layer statistics of the reference output are recorded with
`collect.record_sequence` (the artifact's exit head, candidate layers = its check layers), then
replayed through `simulate` under the artifact's cost model, once with `decide_exits` (the
simulator's prediction for the calibrated policy) and once with `oracle_exits` (every exit decided
perfectly). Prompt lookup and the fitted next-token head, where the policy has them, draft in both
replays as the runtime does: they make no decision an oracle could improve. Both are speedups over our plain engine (`ar`); `specbound`'s measured speedup over
`ar` is set beside them.

The limit: the speed if every draft were free and right at the artifact's width bound (w_max):
each verification pass emits w_max + 1 tokens (fewer only at an answer's end) and costs one
verification pass over them and a round's overhead, nothing for drafting. Replayed through the
same `simulate` over the reference answers' lengths, as free prompt-lookup drafts that are always
right; no per-layer recording is needed. It is the ceiling of any drafter at that width under
this cost model: the cost of verification alone.

The harness imports this module only when the oracle or the limit is asked for.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from specbound.calibrate import collect as C
from specbound.calibrate.simulate import CostModel, Exits, Lookups, decide_exits, oracle_exits, simulate

from .summary import ratio


@dataclass(frozen=True)
class OracleSetup:
    """What the replay needs from the model and the artifact."""

    lm: object
    heads: dict
    layers: tuple[int, ...]
    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    d_max: int
    w_max: int
    cost: CostModel
    lookup_ngram: int = 0
    lookup_max: int = 0
    head_draft: bool = False
    lookup_min: int = 0  # the policy drafts with the fitted next-token head
    lookup_floor: int = 0


def oracle_setup(loaded, artifact, cost: CostModel) -> OracleSetup:
    """The replay's setup under `cost`, the artifact's cost model (`cost_model`)."""
    from specbound_runtime.exit_head import ExitHeadWeights

    lm = loaded.lm
    weights = artifact.exit_weights
    shortlist = weights.shortlist if weights is not None and weights.shortlist is not None else torch.arange(lm.vocab_size)
    lens = weights.lens if weights is not None else {}
    head_draft = bool(artifact.policy.head_draft and weights is not None and weights.next_head is not None)
    # as calibration records them; "lens" is exactly the runtime's exit head for this artifact, and
    # with the next-token head in the policy its drafts are recorded too
    heads = C.exit_heads(lm, ExitHeadWeights(shortlist, lens, weights.next_head if head_draft else None))
    active = artifact.policy.active_checks
    return OracleSetup(
        lm=lm,
        heads=heads,
        layers=tuple(l for l, _, _ in active),
        temperatures=tuple(t for _, t, _ in active),
        thresholds=tuple(p for _, _, p in active),
        d_max=artifact.policy.d_max,
        w_max=artifact.policy.w_max,
        cost=cost,
        lookup_ngram=artifact.policy.lookup_ngram,
        lookup_max=artifact.policy.lookup_max,
        head_draft=head_draft,
        lookup_min=artifact.policy.lookup_min,
        lookup_floor=artifact.policy.lookup_floor,
    )


def cost_model(artifact) -> CostModel | None:
    """The artifact's cost model, or None (with a warning) when it has none."""
    raw = artifact.artifact_metadata.get("cost_model")
    try:
        return CostModel(**json.loads(raw))
    except (TypeError, ValueError):
        print("warning: the artifact has no usable cost_model metadata; skipping oracle and limit (recalibrate to get one)", file=sys.stderr, flush=True)
        return None


def limit_simulate(cost: CostModel, w_max: int, answer_tokens: list[int]) -> dict | None:
    """The simulator's figures when every draft is free and right, `w_max` per pass, over answers
    of `answer_tokens` tokens each. None when no answer has a token."""
    if w_max < 0:
        raise ValueError(f"w_max must be >= 0, got {w_max}")
    lengths = [n for n in answer_tokens if n > 0]
    if not lengths:
        return None
    bounds, offset = [], 0
    for n in lengths:
        bounds.append((offset, offset + n))
        offset += n
    none = np.full(offset, -1)  # no early exit at all: every draft comes from the free source
    exits = Exits(layer=none, right=np.zeros(offset, bool), checks=np.zeros(offset, np.int64))
    free = Lookups(np.full(offset, w_max), np.full(offset, w_max))
    return simulate(exits, bounds, cost, cost.num_layers, w_max, lookups=free, lookup_max=w_max).to_dict()


def limit_row(sim: dict | None, w_max: int, row: dict) -> dict:
    """The limit's simulated figures, on ar's and on the reference's scale (`row`: the group's
    measured methods)."""
    if sim is None:
        return {"simulated": True, "w_max": w_max, "speedup_vs_ar": None, "speedup": None}
    ar = row.get("ar", {}).get("speedup")
    return {
        "simulated": True,
        "w_max": w_max,
        "speedup_vs_ar": round(sim["speedup"], 4),
        "mean_accepted_length": round(sim["mean_accepted_length"], 4),
        "limit_sim": sim,
        # on the hf-greedy scale, as the oracle's: the simulated speedup over ar times ar's measured one
        "speedup": round(sim["speedup"] * ar, 4) if ar else None,
    }


def oracle_record(setup: OracleSetup, prompt_ids, answer_ids) -> dict:
    """The exit head's per-layer confidence and correctness over one reference answer."""
    seq = C.RecordedSequence("bench", False, True, tuple(prompt_ids) + tuple(answer_ids), len(prompt_ids) - 1)
    rec = C.record_sequence(setup.lm, setup.heads, seq, setup.layers)
    h = C.HEADS.index("lens")
    out = {"conf": rec["conf"][:, h], "right": rec["right"][:, h], "tokens": len(answer_ids)}
    if setup.lookup_ngram:
        k = len(rec["final"])
        rows = C.Records(np.zeros(k, np.int32), np.zeros(k, bool), np.ones(k, bool), rec["final"], rec["right"], rec["conf"], setup.layers)
        rows = C.with_lookups(rows, [seq])
        g = C.lookup_column(setup.lookup_ngram, setup.lookup_min)
        out["lookup_proposed"], out["lookup_right"] = rows.lookup_proposed[:, g], rows.lookup_right[:, g]
        out["lookup_size"] = rows.lookup_size[:, g]
    if setup.head_draft:
        out["head_right"] = rec["head_right"]
    return out


def oracle_simulate(setup: OracleSetup, recs: list[dict]) -> dict | None:
    """The simulator's figures for a group of answers: "predicted" (the calibrated policy's exit
    decisions) and "oracle" (perfect ones). None when no answer has a token."""
    recs = [r for r in recs if r["tokens"] > 0]
    if not recs:
        return None
    conf = np.concatenate([r["conf"] for r in recs])
    right = np.concatenate([r["right"] for r in recs])
    bounds, offset = [], 0
    for r in recs:
        bounds.append((offset, offset + r["tokens"]))
        offset += len(r["conf"])
    columns = list(range(len(setup.layers)))
    layers = list(setup.layers)
    policy = decide_exits(conf, right, columns, layers, list(setup.temperatures), list(setup.thresholds))
    oracle = oracle_exits(right, columns, layers)
    lookups = None
    if setup.lookup_ngram:
        lookups = Lookups(
            np.concatenate([r["lookup_proposed"] for r in recs]),
            np.concatenate([r["lookup_right"] for r in recs]),
            np.concatenate([r["lookup_size"] for r in recs]),
        )
    head = np.concatenate([r["head_right"] for r in recs]) if setup.head_draft else None
    # the oracle decides exits perfectly; prompt lookup and the next-token head draft what they
    # draft (neither has a decision to make), so they are the same in both replays
    sim = dict(lookups=lookups, lookup_max=setup.lookup_max, head=head, lookup_floor=setup.lookup_floor)
    return {
        "predicted": simulate(policy, bounds, setup.cost, setup.d_max, setup.w_max, **sim).to_dict(),
        "oracle": simulate(oracle, bounds, setup.cost, setup.d_max, setup.w_max, **sim).to_dict(),
    }


def oracle_row(sim: dict | None, row: dict) -> dict:
    """The oracle's simulated figures, set beside what specbound measured (`row`: the group's
    measured methods)."""
    if sim is None:
        return {"simulated": True, "speedup_vs_ar": None, "speedup": None}
    o, p = sim["oracle"], sim["predicted"]
    out = {
        "simulated": True,
        "speedup_vs_ar": round(o["speedup"], 4),
        "mean_accepted_length": round(o["mean_accepted_length"], 4),
        "acceptance_rate": round(o["acceptance_rate"], 4),
        "predicted_specbound": {"speedup_vs_ar": round(p["speedup"], 4), "mean_accepted_length": round(p["mean_accepted_length"], 4), "acceptance_rate": round(p["acceptance_rate"], 4)},
        "oracle_sim": o,
        "predicted_sim": p,
        # on the hf-greedy scale: the simulated speedup over ar times ar's measured speedup
        "speedup": round(o["speedup"] * row["ar"]["speedup"], 4) if "ar" in row and row["ar"]["speedup"] else None,
    }
    sb = row.get("specbound", {}).get("speedup_vs_ar")
    out["specbound_measured_speedup_vs_ar"] = sb
    out["specbound_over_oracle"] = ratio(sb, o["speedup"]) if sb else None
    out["specbound_over_predicted"] = ratio(sb, p["speedup"]) if sb else None
    return out

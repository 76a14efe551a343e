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
from specbound.calibrate.replay import replays
from specbound.calibrate.simulate import CostModel, Exits, Replay, decide_exits, oracle_exits, simulate
from specbound_runtime.policy import ExitPolicy

from .summary import ratio


@dataclass(frozen=True)
class OracleSetup:
    """What the replay needs from the model and the artifact."""

    lm: object
    heads: dict
    layers: tuple[int, ...]
    policy: ExitPolicy
    cost: CostModel


def oracle_setup(loaded, artifact, cost: CostModel) -> OracleSetup:
    """The replay's setup under `cost`, the artifact's cost model (`cost_model`)."""
    from specbound_runtime.exit_head import ExitHeadWeights

    lm = loaded.lm
    weights = artifact.exit_weights
    shortlist = weights.shortlist if weights is not None and weights.shortlist is not None else torch.arange(lm.vocab_size)
    lens = weights.lens if weights is not None else {}
    # as calibration records them; "lens" is exactly the runtime's exit head for this artifact, and
    # with the next-token head in the policy (the artifact then holds it) its drafts are recorded too
    next_head = weights.next_head if weights is not None and "head" in artifact.policy.sources else None
    heads = C.exit_heads(lm, ExitHeadWeights(shortlist, lens, next_head))
    return OracleSetup(lm, heads, tuple(l for l, _, _ in artifact.policy.active_checks), artifact.policy, cost)


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
    free = Replay("free", np.full(offset, w_max), np.full(offset, w_max))
    return simulate(exits, bounds, cost, cost.num_layers, w_max, [free]).to_dict()


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
    k = len(rec["final"])
    rows = C.Records(
        np.zeros(k, np.int32), np.zeros(k, bool), np.ones(k, bool), rec["final"], rec["right"], rec["conf"], setup.layers,
        head_right=rec.get("head_right"),
    )
    rows = C.with_contexts(rows, [seq])
    if "lookup" in setup.policy.sources:
        rows = C.with_lookups(rows, [seq])
    out["free"] = replays(rows, setup.policy)  # prompt lookup and the next-token head, as the policy drafts
    out["context"] = rows.context
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
    active = setup.policy.active_checks
    policy = decide_exits(conf, right, columns, layers, [t for _, t, _ in active], [p for _, _, p in active])
    oracle = oracle_exits(right, columns, layers)
    # the oracle decides exits perfectly; prompt lookup and the next-token head draft what they
    # draft (neither has a decision to make), so they are the same in both replays
    free = [
        Replay(f.source, np.concatenate([r["free"][i].proposed for r in recs]), np.concatenate([r["free"][i].right for r in recs]), f.reads)
        for i, f in enumerate(recs[0]["free"])
    ]
    d_max, w_max = setup.policy.d_max, setup.policy.w_max
    context = np.concatenate([r["context"] for r in recs]) if all("context" in r for r in recs) else None
    return {
        "predicted": simulate(policy, bounds, setup.cost, d_max, w_max, free, contexts=context).to_dict(),
        "oracle": simulate(oracle, bounds, setup.cost, d_max, w_max, free, contexts=context).to_dict(),
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

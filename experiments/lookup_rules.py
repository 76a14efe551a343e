"""Prompt-lookup rules replayed over recorded greedy answers under a measured cost model.

    .venv/bin/python experiments/lookup_rules.py [ANSWERS] [COSTS]

ANSWERS: the answers file experiments/directions.py caches (default
runs/directions/answers-s0-b3-x24-n128.json: 18 bench answers never seen by calibration, split
"test", and 24 own answers to calibration prompts, split "train"). COSTS: a cost model with
per-width costs (default: the newest r4 entry in ~/.cache/specbound/costs/). Every round drafts
what the engine's prompt lookup proposes from the true context (ExitPolicy.lookup_drafts, with
fixed drafts or drafts sized by the match's length; nothing else drafts) and pays one verification pass over its width plus the round overhead; the figure is the
speedup over plain decoding, prefill excluded. Every rule of calibrate.collect.LOOKUP_RULES is
replayed with fixed drafts (up to 1..4 and 8) and drafts sized by the match (floor 1 or 2, up to 4 or 8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specbound.calibrate.collect import LOOKUP_RULES
from specbound.calibrate.simulate import CostModel
from specbound_runtime.policy import ExitPolicy

SIZES = [(m, 0) for m in (1, 2, 3, 4, 8)] + [(4, 1), (8, 1), (4, 2), (8, 2)]  # (lookup_max, lookup_floor)


def replay(items, cost: CostModel, ngram: int, lookup_min: int, m: int, floor: int = 0) -> float:
    step = lambda n: cost.num_layers * cost.layer_call(n) + cost.head_call(n) + cost.round_overhead  # noqa: E731
    policy = ExitPolicy(2, (), (), (), 2, m, lookup_ngram=ngram, lookup_max=m, lookup_min=lookup_min, lookup_floor=floor)
    spent = emitted = 0.0
    for item in items:
        prompt, answer = item["prompt"], item["answer"]
        t = 1  # the first token comes from the prefill
        while t < len(answer):
            proposal = policy.lookup_drafts(prompt + answer[:t], len(answer) - t - 1)
            right = 0
            while right < len(proposal) and proposal[right] == answer[t + right]:
                right += 1
            spent += step(len(proposal) + 1)
            emitted += right + 1
            t += right + 1
    return step(1) * emitted / spent


def main(answers: Path, costs: Path) -> None:
    data = json.loads(answers.read_text())
    raw = json.loads(costs.read_text())
    cost = CostModel(**{k: v for k, v in raw.items()})
    print(f"answers: {answers}; costs: {costs}")
    print("full pass over 1..4 positions, ms:", [round(cost.num_layers * cost.layer_call(n) + cost.head_call(n), 1) for n in range(1, 5)])
    for split in ("test", "train"):
        items = [x for x in data if x["split"] == split]
        print(f"\n{split}: {len(items)} answers, {sum(len(x['answer']) for x in items)} tokens")
        heads = [f"up to {m}" if not f else f"{f}-{m} by match" for m, f in SIZES]
        print("| rule | " + " | ".join(heads) + " |")
        print("| --- |" + " ---: |" * len(heads))
        for ngram, lowest in LOOKUP_RULES:
            name = f"{ngram} backing off to {lowest}" if lowest else f"exactly {ngram}"
            cells = [f"{replay(items, cost, ngram, lowest, m, f):.3f}x" for m, f in SIZES]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    answers = Path(args[0]) if args else Path("runs/directions/answers-s0-b3-x24-n128.json")
    costs = Path(args[1]) if len(args) > 1 else max((Path.home() / ".cache/specbound/costs").glob("r4-*.json"), key=lambda p: p.stat().st_mtime)
    main(answers, costs)

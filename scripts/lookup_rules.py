"""Prompt-lookup rules replayed over recorded greedy answers under a measured cost model.

    PYTHONPATH=.pp:. .venv/bin/python scripts/lookup_rules.py [ANSWERS] [COSTS]

ANSWERS: the answers file scripts/directions.py caches (default
runs/directions/answers-s0-b3-x24-n128.json: 18 bench answers never seen by calibration, split
"test", and 24 own answers to calibration prompts, split "train"). COSTS: a cost model with
per-width costs (default: the newest r3 entry in ~/.cache/specbound/costs/). Every round drafts
what specbound_runtime.policy.lookup_continuation proposes from the true context (nothing else
drafts) and pays one verification pass over its width plus the round overhead; the figure is the
speedup over plain decoding, prefill excluded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specbound.calibrate.simulate import CostModel
from specbound_runtime.policy import lookup_continuation


def replay(items, cost: CostModel, ngram: int, lookup_min: int, m: int) -> float:
    step = lambda n: cost.num_layers * cost.layer_call(n) + cost.head_call(n) + cost.round_overhead  # noqa: E731
    spent = emitted = 0.0
    for item in items:
        prompt, answer = item["prompt"], item["answer"]
        t = 1  # the first token comes from the prefill
        while t < len(answer):
            proposal = lookup_continuation(prompt + answer[:t], ngram, min(m, len(answer) - t - 1), lookup_min)
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
    rules = [(n, 0) for n in (1, 2, 3)] + [(2, 1), (3, 1), (4, 1), (3, 2), (4, 2)]
    for split in ("test", "train"):
        items = [x for x in data if x["split"] == split]
        print(f"\n{split}: {len(items)} answers, {sum(len(x['answer']) for x in items)} tokens")
        print("| rule | " + " | ".join(f"up to {m}" for m in (1, 2, 3, 4)) + " |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for ngram, lowest in rules:
            name = f"{ngram} backing off to {lowest}" if lowest else f"exactly {ngram}"
            print(f"| {name} | " + " | ".join(f"{replay(items, cost, ngram, lowest, m):.3f}x" for m in (1, 2, 3, 4)) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    answers = Path(args[0]) if args else Path("runs/directions/answers-s0-b3-x24-n128.json")
    costs = Path(args[1]) if len(args) > 1 else max((Path.home() / ".cache/specbound/costs").glob("r3-*.json"), key=lambda p: p.stat().st_mtime)
    main(answers, costs)

"""A sampling bench over several seeds, task by task: the geometric mean of each task's tokens/s
ratios (SpecBound over `ar` and over `hf-sample`, `ar` over `hf-sample`) across `specbound bench`
runs with different `--seed`s, and the same pooled (tokens over time summed over the seeds).

    .venv/bin/python experiments/sampling_seeds.py runs/bench-s2-seed0/results.json runs/bench-s2-seed1/results.json ...

A run may hold some tasks only (`--tasks`); each task takes every run that holds it. Under sampling
the methods draw different answers, so one (task, seed) cell is mostly the answer's content: judge
a task over several seeds.
"""

from __future__ import annotations

import json
import math
import sys


def main(paths: list[str]) -> None:
    cells: dict[str, list[dict]] = {}
    for path in paths:
        summary = json.load(open(path))["summary"]
        for task, row in summary.items():
            if task != "overall":
                cells.setdefault(task, []).append(row)
    tasks = list(cells)

    def gm(xs):
        return math.exp(sum(map(math.log, xs)) / len(xs))

    def rate(row, a, b):
        return row[a]["tokens_per_s"] / row[b]["tokens_per_s"]

    print("| tokens/s ratio | " + " | ".join(tasks) + " | all |")
    print("| --- | " + " | ".join("---:" for _ in tasks) + " | ---: |")
    for a, b in (("ar", "hf-sample"), ("specbound", "hf-sample"), ("specbound", "ar")):
        per_task = [gm([rate(r, a, b) for r in cells[t]]) for t in tasks]
        every = gm([rate(r, a, b) for t in tasks for r in cells[t]])
        print(f"| {a} over {b} | " + " | ".join(f"{v:.2f}x" for v in per_task) + f" | {every:.2f}x |")
    ratios = [rate(r, "specbound", "ar") for t in tasks for r in cells[t]]
    print(f"seeds per task: {sorted({len(v) for v in cells.values()})}; one cell over ar: {min(ratios):.2f}x to {max(ratios):.2f}x; "
          f"least distribution p-value: {min(r['specbound']['distribution_pvalue'] for t in tasks for r in cells[t])}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

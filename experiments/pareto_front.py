"""Optuna's Pareto front (`calibrate.study.pareto_front`, Study.best_trials) against the front the
tuner computed by hand before: on SETS random sets of trials (speedup up, waste down, with many
ties), the trials no other one dominates. Prints how many sets agreed.

    .venv/bin/python experiments/pareto_front.py [SETS=200]
"""

from __future__ import annotations

import random
import sys

import optuna

from specbound.calibrate.study import Finished, pareto_front


def by_hand(trials):
    return [
        t for t in trials
        if not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)
    ]


def main() -> None:
    sets = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(0)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    same = 0
    for _ in range(sets):
        trials = [
            Finished(i, {"x": rng.random()}, (round(rng.choice([0.9, 1.0, 1.1, 1.2, rng.random()]), 2), round(rng.choice([0.1, 0.2, rng.random()]), 2)), {}, dist, {})
            for i in range(rng.randint(1, 30))
        ]
        same += [t.index for t in by_hand(trials)] == [t.index for t in pareto_front(trials, ["maximize", "minimize"])]
    print(f"{same} of {sets} sets: the same front")


if __name__ == "__main__":
    main()

"""How long one tuning trial takes: the simulator over N recorded positions (synthetic, with the
shapes a SmolLM2 calibration records: 10 candidate layers, 17 temperatures, 128-token answers).
    .venv/bin/python experiments/sim_speed.py [N=100000]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from specbound.calibrate.collect import LOOKUP_MAX, LOOKUP_RULES, Records
from specbound.calibrate.fit import TEMPERATURE_GRID
from specbound.calibrate.simulate import CostModel
from specbound.calibrate.tune import Candidate, Schedules, evaluate


def main(n: int) -> None:
    rng = np.random.default_rng(0)
    layers = (15, 16, 17, 19, 21, 22, 23, 25, 27, 29)
    C, G = len(layers), len(TEMPERATURE_GRID)
    conf = np.sort(rng.random((n, 2, C, G)), axis=-1)[..., ::-1].astype(np.float32)  # falls with T
    right = rng.random((n, 2, C)) < conf[..., G // 2]
    seq = np.repeat(np.arange(n // 128 + 1), 128)[:n].astype(np.int32)
    rules = len(LOOKUP_RULES)
    proposed = rng.integers(0, LOOKUP_MAX + 1, size=(n, rules)) * (rng.random((n, rules)) < 0.2)
    records = Records(seq, np.zeros(n, bool), np.ones(n, bool), np.zeros(n, np.int32), right, conf, layers,
                      proposed, np.minimum(proposed, rng.integers(0, 3, size=(n, rules))))
    schedules = Schedules(layers, 30, {"plain": (1.0,) * C, "lens": (1.0,) * C}, {"plain": 1.0, "lens": 1.0})
    cost = CostModel(30, 0.9, 0.09, 2.6, 1.0, 0.35, 2.0)
    candidate = Candidate("lens", "fitted", 0.6, (15, 19, 25), 25, 8, 3, 4)
    evaluate(records, candidate, schedules, cost)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        result = evaluate(records, candidate, schedules, cost)
        times.append(time.perf_counter() - started)
    print(f"{n} positions, {result.rounds} rounds: one trial takes {min(times) * 1000:.0f} ms (best of 5)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)

"""Calibration math on recorded statistics: temperatures, the paper's schedule, metrics, ridge lens.

Pure numpy/scipy/scikit-learn: no model, no files. A layer's confidence at temperature T is max softmax(z/T);
it is recorded exactly on a grid of temperatures and interpolated in log-log space between grid
points (max softmax is smooth and monotone in T). The fitting target is whether the layer's draft
equals the last layer's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from specbound_runtime.policy import paper_temperatures

TEMPERATURE_GRID = np.geomspace(0.05, 20.0, 17)
LOG_T_BOUNDS = (float(np.log(TEMPERATURE_GRID[0])), float(np.log(TEMPERATURE_GRID[-1])))
_EPS = 1e-6


def confidence_at(conf_grid: np.ndarray, temperature: float) -> np.ndarray:
    """Interpolate confidences recorded on TEMPERATURE_GRID (last axis) at one temperature."""
    log_t = np.log(np.clip(temperature, TEMPERATURE_GRID[0], TEMPERATURE_GRID[-1]))
    grid = np.log(TEMPERATURE_GRID)
    i = int(np.clip(np.searchsorted(grid, log_t) - 1, 0, len(grid) - 2))
    w = (log_t - grid[i]) / (grid[i + 1] - grid[i])
    lo = np.log(np.clip(conf_grid[..., i], _EPS, 1.0))
    hi = np.log(np.clip(conf_grid[..., i + 1], _EPS, 1.0))
    return np.exp((1 - w) * lo + w * hi)


def binary_nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log-loss, the temperature fits' objective.

    Not sklearn's log_loss: the bounded optimiser calls this ~30 times per fit, and log_loss
    validates its inputs on every call (about 60x slower at a few thousand positions); the report's
    log-loss (`metrics`) is sklearn's."""
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(conf_grid: np.ndarray, agree: np.ndarray) -> float:
    """T minimising the log-loss of confidence against agreement; log T inside the grid's bounds."""
    if conf_grid.shape[0] == 0:
        raise ValueError("no recorded positions to fit a temperature on")
    y = agree.astype(np.float64)
    res = minimize_scalar(
        lambda log_t: binary_nll(confidence_at(conf_grid, float(np.exp(log_t))), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    if not res.success:
        raise RuntimeError(f"temperature fit failed: {res.message}")
    return float(np.exp(res.x))


def fit_paper_alpha(conf_grids: list[np.ndarray], agrees: list[np.ndarray], layers, num_layers: int) -> float:
    """The paper's one-parameter schedule T_l = 1 + alpha (1 - l/L), alpha fitted over all layers."""
    ys = [a.astype(np.float64) for a in agrees]

    def loss(alpha: float) -> float:
        temps = paper_temperatures(alpha, tuple(layers), num_layers)
        total = sum(binary_nll(confidence_at(c, t), y) * len(y) for c, t, y in zip(conf_grids, temps, ys))
        return total / max(1, sum(len(y) for y in ys))

    res = minimize_scalar(loss, bounds=(0.0, 16.0), method="bounded", options={"xatol": 1e-4})
    if not res.success:
        raise RuntimeError(f"alpha fit failed: {res.message}")
    return float(res.x)


@dataclass(frozen=True)
class CalibrationMetrics:
    ece: float
    brier: float
    auroc: float
    nll: float
    count: int
    agreement: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else round(float(v), 6)) for k, v in self.__dict__.items()}


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Mean |confidence - agreement| over equal-width bins, weighted by bin size (scikit-learn
    1.9 has no ECE; its calibration_curve gives the per-bin points but not the bin sizes). NaN
    without positions."""
    if not len(y):
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def metrics(p: np.ndarray, y: np.ndarray) -> CalibrationMetrics:
    """Held-out calibration of confidences `p` against agreement `y`, with scikit-learn's metrics;
    NaN where a metric is undefined (no positions; AUROC with a single class)."""
    y = y.astype(np.float64)
    n = len(y)
    both = n and 0 < y.sum() < n
    return CalibrationMetrics(
        ece=expected_calibration_error(p, y),
        brier=float(brier_score_loss(y, p, pos_label=1)) if n else float("nan"),
        auroc=float(roc_auc_score(y, p)) if both else float("nan"),
        nll=float(log_loss(y, p, labels=[0.0, 1.0])) if n else float("nan"),
        count=int(n),
        agreement=float(y.mean()) if n else float("nan"),
    )


def ridge_lens(gram: np.ndarray, cross: np.ndarray, lam: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge for Y ~ X W + b from accumulated [X 1]^T [X 1] and [X 1]^T Y.

    gram [H+1, H+1], cross [H+1, H] (the bias column last). The bias is not penalised."""
    h = gram.shape[0] - 1
    reg = np.eye(h + 1) * lam
    reg[h, h] = 0.0
    solution = np.linalg.solve(gram + reg, cross)
    return solution[:h], solution[h]

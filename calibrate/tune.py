"""Tune the exit policy with Optuna against the simulator (recorded data, not the live model).

Searched: the draft head (plain short-list or with the fitted lens), the temperature schedule
(per-layer fitted, the paper's linear schedule with alpha fitted, or the paper's default alpha),
the exit threshold, which candidate layers are exit checks, the depth bound and the width bound.
The paper's defaults are enqueued as the first trial, so tuning can only match or beat them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from specbound_runtime.errors import UsageError
from specbound_runtime.policy import PAPER_ALPHA, PAPER_THRESHOLD, PAPER_W_MAX, ExitPolicy, default_check_layers, paper_temperatures

from .collect import HEADS, LOOKUP_MAX, LOOKUP_NGRAMS, Records
from .simulate import CostModel, Lookups, SimResult, decide_exits, oracle_exits, simulate

SCHEDULES = ("fitted", "paper-fitted", "paper")
_STORAGE = re.compile(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://")


def check_storage_url(url: str) -> str:
    if not _STORAGE.match(url):
        raise UsageError(
            f"unknown --storage URL {url!r}; use an Optuna RDB URL such as sqlite:///study.db or "
            "postgresql://user:pass@host/db"
        )
    return url


@dataclass(frozen=True)
class Schedules:
    """Fitted temperatures per head: per-layer, and the paper's alpha."""

    layers: tuple[int, ...]
    num_layers: int
    fitted: dict[str, tuple[float, ...]]
    alpha: dict[str, float]

    def temperatures(self, head: str, schedule: str) -> tuple[float, ...]:
        if schedule == "fitted":
            return self.fitted[head]
        alpha = self.alpha[head] if schedule == "paper-fitted" else PAPER_ALPHA
        return paper_temperatures(alpha, self.layers, self.num_layers)


@dataclass(frozen=True)
class Candidate:
    """One point of the search space, and the policy it means."""

    head: str
    schedule: str
    threshold: float
    checks: tuple[int, ...]
    d_max: int
    w_max: int
    lookup_ngram: int = 0
    lookup_max: int = 0

    def policy(self, schedules: Schedules) -> ExitPolicy:
        temps = dict(zip(schedules.layers, schedules.temperatures(self.head, self.schedule)))
        return ExitPolicy(
            num_layers=schedules.num_layers,
            check_layers=self.checks,
            temperatures=tuple(temps[l] for l in self.checks),
            thresholds=(self.threshold,) * len(self.checks),
            d_max=self.d_max,
            w_max=self.w_max,
            lookup_ngram=self.lookup_ngram,
            lookup_max=self.lookup_max,
        )


def paper_candidate(layers: tuple[int, ...], num_layers: int) -> Candidate:
    checks = tuple(l for l in default_check_layers(num_layers) if l in layers)
    return Candidate("plain", "paper", PAPER_THRESHOLD, checks, checks[-1], PAPER_W_MAX)


def _lookups(records: Records, candidate: Candidate) -> Lookups | None:
    if not candidate.lookup_ngram or records.lookup_proposed is None:
        return None
    g = LOOKUP_NGRAMS.index(candidate.lookup_ngram)
    return Lookups(records.lookup_proposed[:, g], records.lookup_right[:, g])


def evaluate(records: Records, candidate: Candidate, schedules: Schedules, cost: CostModel) -> SimResult:
    h = HEADS.index(candidate.head)
    policy = candidate.policy(schedules)
    columns = [records.layers.index(l) for l in policy.check_layers]
    exits = decide_exits(
        records.conf[:, h], records.right[:, h], columns, list(policy.check_layers), list(policy.temperatures), list(policy.thresholds)
    )
    return simulate(
        exits, records.bounds(), cost, policy.d_max, policy.w_max, _lookups(records, candidate), candidate.lookup_max
    )


def evaluate_oracle(records: Records, candidate: Candidate, cost: CostModel) -> SimResult:
    """The same drafts with every exit decided perfectly: the policy's own limit."""
    h = HEADS.index(candidate.head)
    columns = [records.layers.index(l) for l in candidate.checks]
    exits = oracle_exits(records.right[:, h], columns, list(candidate.checks))
    return simulate(
        exits, records.bounds(), cost, candidate.d_max, candidate.w_max, _lookups(records, candidate), candidate.lookup_max
    )


def _suggest(trial, layers: tuple[int, ...], num_layers: int) -> Candidate | None:
    head = trial.suggest_categorical("head", list(HEADS))
    schedule = trial.suggest_categorical("schedule", list(SCHEDULES))
    threshold = trial.suggest_float("threshold", 0.2, 0.995)
    use = [trial.suggest_categorical(f"check_{l}", [True, False]) for l in layers]
    d_max = trial.suggest_categorical("d_max", list(layers))
    w_max = trial.suggest_int("w_max", 1, 12)
    lookup_ngram = trial.suggest_categorical("lookup_ngram", [0, *LOOKUP_NGRAMS])
    lookup_max = trial.suggest_int("lookup_max", 1, LOOKUP_MAX)
    checks = tuple(l for l, u in zip(layers, use) if u and l <= d_max)
    if not checks:
        return None
    return Candidate(head, schedule, threshold, checks, checks[-1], w_max, lookup_ngram, lookup_max if lookup_ngram else 0)


def _params(candidate: Candidate, layers: tuple[int, ...]) -> dict:
    params = {"head": candidate.head, "schedule": candidate.schedule, "threshold": candidate.threshold}
    params.update({f"check_{l}": l in candidate.checks for l in layers})
    params.update({"d_max": candidate.d_max, "w_max": candidate.w_max})
    params.update({"lookup_ngram": candidate.lookup_ngram, "lookup_max": max(1, candidate.lookup_max)})
    return params


@dataclass(frozen=True)
class TuneResult:
    best: Candidate
    best_trial: int
    value: SimResult
    paper: SimResult
    trials: int
    pareto: list[dict]


def tune(
    records: Records,
    schedules: Schedules,
    cost: CostModel,
    n_trials: int,
    seed: int,
    storage: str,
    study_name: str,
    multi_objective: bool = False,
    progress=None,
) -> TuneResult:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    layers = records.layers
    L = schedules.num_layers
    paper = paper_candidate(layers, L)
    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]

    def sampler_for(n_complete: int):
        # Reseeded before each trial from (seed, trials done): a study resumed after an
        # interruption suggests exactly what an uninterrupted one would have.
        s = seed * 1_000_003 + n_complete
        return optuna.samplers.NSGAIISampler(seed=s) if multi_objective else optuna.samplers.TPESampler(seed=s)

    study = optuna.create_study(
        storage=storage, study_name=study_name, sampler=sampler_for(0), directions=directions, load_if_exists=True
    )
    if len(study.directions) != len(directions):
        raise UsageError(f"study {study_name!r} in {storage} was made with other objectives; use another --study-name")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    paper_params = _params(paper, layers)
    if not any(
        t.params == paper_params or t.system_attrs.get("fixed_params") == paper_params
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
    ):
        study.enqueue_trial(paper_params)

    def objective(trial):
        candidate = _suggest(trial, layers, L)
        if candidate is None:
            result = simulate(
                decide_exits(records.conf[:, 0], records.right[:, 0], [], [], [], []), records.bounds(), cost, L, 1
            )
        else:
            result = evaluate(records, candidate, schedules, cost)
        trial.set_user_attr("result", result.to_dict())
        if progress is not None:
            progress(1)
        return (result.speedup, result.waste) if multi_objective else result.speedup

    if progress is not None and finished:
        progress(min(len(finished), n_trials))
    done = len(finished)
    while done < n_trials:
        study.sampler = sampler_for(done)
        study.optimize(objective, n_trials=1, gc_after_trial=False)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    complete = [
        t for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and any(t.params.get(f"check_{l}") for l in layers if l <= t.params["d_max"])
    ]
    if multi_objective:
        valid = {t.number for t in complete}
        front = [t for t in study.best_trials if t.number in valid]
        best_trial = max(front or complete, key=lambda t: (t.values[0], -t.number))
    else:
        front = []
        best_trial = max(complete, key=lambda t: (t.value, -t.number))
    best = _candidate_from_params(best_trial.params, layers)
    pareto = [
        {"trial": t.number, "speedup": t.values[0], "waste": t.values[1], "params": t.params}
        for t in sorted(front, key=lambda t: t.values[0])
    ]
    return TuneResult(
        best=best,
        best_trial=best_trial.number,
        value=evaluate(records, best, schedules, cost),
        paper=evaluate(records, paper, schedules, cost),
        trials=len(complete),
        pareto=pareto,
    )


def _candidate_from_params(params: dict, layers: tuple[int, ...]) -> Candidate:
    checks = tuple(l for l in layers if params[f"check_{l}"] and l <= params["d_max"])
    ngram = int(params.get("lookup_ngram", 0))
    return Candidate(
        params["head"], params["schedule"], float(params["threshold"]), checks, checks[-1], int(params["w_max"]),
        ngram, int(params.get("lookup_max", 0)) if ngram else 0,
    )

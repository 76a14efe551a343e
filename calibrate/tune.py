"""Tune the exit policy with Optuna against the simulator (recorded data, not the live model),
and choose what ships.

The search space, and how the simulator judges each point of it, are space.py's.

Never slower than plain decoding, on every kind of prompt: the options are every trial, every
lookup-only policy (with the head recorded, the head alone and lookup + head too) and no drafting
at all (1.0x under any cost model, since it is plain decoding). An option qualifies when its
robust speedup is at least 1.0 on the tuning data and on the held-out answers of every kind of
prompt (`never_slower`). Among those, tuning maximises the worst kind first: it keeps the options
within WORST_KIND_BAND of the best worst kind, and of those takes the best on the tuning data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .collect import Records
from .simulate import CostModel, SimResult
from .space import (  # noqa: F401  (Candidate, Schedules, evaluate, fallback_candidates, score: tuning's names)
    SEARCH_SPACE, Candidate, Schedules, _candidate_from_params, _params, _suggest, evaluate, fallback_candidates,
    lookup_rule_name, no_exit_candidate, paper_candidate, score,
)

# options whose worst kind is this close to the best worst kind count as equals there, and the
# tuning data decides between them: a step of 1% is below what a bench can tell apart on a kind
# (`ar` and `generate()` spread more than that from task to task), and a strict maximum would trade
# large gains on every kind for a noise-sized one on the worst
WORST_KIND_BAND = 0.01


@dataclass(frozen=True)
class TuneResult:
    best: Candidate
    best_trial: int  # -1: a fallback (lookup only or no drafting) beat every trial
    value: SimResult
    paper: SimResult
    trials: int
    pareto: list[dict]
    kinds: dict[str, float]  # the chosen policy's robust speedup on each held-out kind
    change: tuple[float | None, float | None] = (None, None)  # policy_change: the price factors where the choice moves


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
    *,
    held_out: dict[str, Records] | None = None,
    batch: int = 8,
    worker: int = 0,
    workers: int = 1,
    job_key: str = "",
) -> TuneResult:
    """Tune in fixed batches (calibrate.study): the trials, and so the result, are the same with
    one worker or many, and after any interruption. `held_out`: each kind's held-out records."""
    import optuna

    from .study import open_study, pareto_front, run_batches

    layers = records.layers
    L = schedules.num_layers
    paper = paper_candidate(layers, L)
    with_head = records.has_head
    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]

    def make_sampler(s: int):
        return optuna.samplers.NSGAIISampler(seed=s) if multi_objective else optuna.samplers.TPESampler(seed=s)

    def objective(params: dict):
        result = evaluate(records, _suggest(optuna.trial.FixedTrial(params), layers, L, with_head), schedules, cost)
        summary = result.to_dict()  # compared at its 6 decimals (calibrate.precision)
        values = (score(result), summary["waste"]) if multi_objective else (score(result),)
        return values, {"result": summary}

    study = open_study(storage, study_name, directions, job_key)
    trials = run_batches(
        study, n_trials, batch, seed, make_sampler, lambda trial: _suggest(trial, layers, L, with_head), objective,
        first_params=_params(paper, layers, with_head), worker=worker, workers=workers, progress=progress,
    )
    complete = list(trials)
    front = pareto_front(complete, directions) if multi_objective else []
    best_trial = max(front or complete, key=lambda t: (t.values[0], -t.index))
    ranked = [best_trial] + sorted((t for t in complete if t is not best_trial), key=lambda t: (-t.values[0], t.index))
    options = [(_candidate_from_params(t.params, layers, L), t.index) for t in ranked] + [(c, -1) for c in fallback_candidates(L, with_head)]
    scored = {t.index: t.values[0] for t in complete}
    judged = judge(options, records, held_out, schedules, cost, scored)  # once, for both
    best, best_index, kinds = never_slower(options, records, held_out, schedules, cost, judged=judged)
    change = policy_change(options, best, records, held_out, schedules, cost, judged=judged)
    pareto = [
        {"trial": t.index, "speedup": t.values[0], "waste": t.values[1], "params": t.params}
        for t in sorted(front, key=lambda t: (t.values[0], t.index))
    ]
    return TuneResult(
        best=best,
        best_trial=best_index,
        value=evaluate(records, best, schedules, cost),
        paper=evaluate(records, paper, schedules, cost),
        trials=len(complete),
        pareto=pareto,
        kinds=kinds,
        change=change,
    )


@dataclass(frozen=True)
class Judged:
    """One option as tuning judged it: its tuning score and, when that is at least 1.0 (or it is
    plain decoding), its score on each held-out kind."""

    option: int  # its first place in the options
    fit: float
    per_kind: dict[str, float] | None  # None: not judged on the kinds (slower on the tuning data)

    @property
    def worst(self) -> float:
        return min(self.per_kind.values(), default=self.fit) if self.per_kind is not None else -math.inf

    @property
    def qualifies(self) -> bool:
        return self.per_kind is not None and self.fit >= 1.0 and min(self.per_kind.values(), default=1.0) >= 1.0


def judge(
    options: list[tuple[Candidate, int]],
    records: Records,
    held_out: dict[str, Records] | None,
    schedules: Schedules,
    cost: CostModel,
    scored: dict[int, float] | None = None,
) -> dict[Candidate, Judged]:
    """Every distinct option scored on the tuning data and, where that is at least 1.0, on each
    held-out kind. `scored`: trial number -> its tuning score, where the study already holds it."""
    kinds = {k: r for k, r in sorted((held_out or {}).items()) if len(r.seq)}
    judged: dict[Candidate, Judged] = {}
    for i, (candidate, index) in enumerate(options):
        if candidate in judged:
            continue  # a repeat of an earlier option
        if not candidate.drafts:  # plain decoding: exactly 1.0 everywhere
            judged[candidate] = Judged(i, 1.0, {k: 1.0 for k in kinds})
            continue
        fit = scored[index] if scored is not None and index in scored else score(evaluate(records, candidate, schedules, cost))
        per_kind = {k: score(evaluate(r, candidate, schedules, cost)) for k, r in kinds.items()} if fit >= 1.0 else None
        judged[candidate] = Judged(i, fit, per_kind)
    return judged


def never_slower(
    options: list[tuple[Candidate, int]],
    records: Records,
    held_out: dict[str, Records] | None,
    schedules: Schedules,
    cost: CostModel,
    scored: dict[int, float] | None = None,
    judged: dict[Candidate, Judged] | None = None,
) -> tuple[Candidate, int, dict[str, float]]:
    """The option (candidate, trial number) to ship, and its score on each held-out kind.

    An option qualifies when it scores at least 1.0 on the tuning data and on every kind's
    held-out records. Of those, the ones whose worst kind is within WORST_KIND_BAND of the best
    worst kind compete on the tuning data; ties go to the earlier option. Without held-out records,
    the worst kind is the tuning score itself. No drafting (always among the fallbacks) scores
    exactly 1.0 everywhere, so one option qualifies. `judged`: `judge`'s result for these options
    and costs, where the caller has it."""
    judged = judged if judged is not None else judge(options, records, held_out, schedules, cost, scored)
    qualified = [j for j in judged.values() if j.qualifies]
    if not qualified:  # pragma: no cover
        raise AssertionError("no drafting is always an option")
    best_worst = max(j.worst for j in qualified)
    chosen = max((j for j in qualified if j.worst >= best_worst - WORST_KIND_BAND), key=lambda j: (j.fit, -j.option))
    candidate, index = options[chosen.option]
    return candidate, index, chosen.per_kind


# price factors tried, nearest first: a machine whose draft prices are this many times the tuned ones
CHANGE_ABOVE = (1.1, 1.25, 1.5, 2.0, 3.0)
CHANGE_BELOW = (0.9, 0.75, 0.5, 0.25)
CHANGE_RIVALS = 8  # options re-judged at each factor: the best ones by each key


def policy_change(
    options: list[tuple[Candidate, int]],
    chosen: Candidate,
    records: Records,
    held_out: dict[str, Records] | None,
    schedules: Schedules,
    cost: CostModel,
    scored: dict[int, float] | None = None,
    judged: dict[Candidate, Judged] | None = None,
) -> tuple[float | None, float | None]:
    """How far draft prices may move before tuning would choose another policy: the nearest price
    factors below and above 1 (CHANGE_BELOW, CHANGE_ABOVE; the cost model's wide passes scaled,
    `CostModel.wide_passes_scaled`) at which `never_slower` picks something else, None where none
    of them does (the policy held at every factor tried that way). Judged among the chosen option,
    plain decoding and the rivals that rank best under the tuned costs (CHANGE_RIVALS by the tuning
    score, as many by the worst kind), so that a machine's measured prices can be compared with
    where the policy stops being the right one. `judged`: as for `never_slower`."""
    if not chosen.drafts:
        return (None, None)  # no draft, no wide pass: nothing a machine's prices could show
    judged = judged if judged is not None else judge(options, records, held_out, schedules, cost, scored)
    drafting = [c for c, j in judged.items() if c.drafts and j.per_kind is not None]
    by_fit = sorted(drafting, key=lambda c: (-judged[c].fit, judged[c].option))[:CHANGE_RIVALS]
    by_worst = sorted(drafting, key=lambda c: (-judged[c].worst, judged[c].option))[:CHANGE_RIVALS]
    plain = next(c for c in judged if not c.drafts)
    keep = {chosen, plain, *by_fit, *by_worst}
    rivals = [options[j.option] for c, j in judged.items() if c in keep]

    def first(factors):
        for f in factors:
            if never_slower(rivals, records, held_out, schedules, cost.wide_passes_scaled(f))[0] != chosen:
                return f
        return None

    return (first(CHANGE_BELOW), first(CHANGE_ABOVE))

"""Tune the exit policy with Optuna against the simulator (recorded data, not the live model).

Searched: the draft head (plain short-list or with the fitted lens), the temperature schedule
(per-layer fitted, the paper's linear schedule with alpha fitted, or the paper's default alpha),
the exit threshold, which candidate layers are exit checks, the depth bound and the width bound.
The paper's defaults are enqueued as the first trial, so tuning can only match or beat them.
No check layer at all is a point of the space too: prompt lookup alone, or no drafting. Where the
records hold the fitted next-token head, whether to draft with it is searched too (a boolean: one
head draft in a round where prompt lookup proposes nothing). So is how prompt lookup sizes its
drafts: up to lookup_max always, or by the match's length from lookup_floor up to lookup_max.

Every trial is scored by its robust speedup: the least over the cost model's measured rounds
(`CostModel.samples`), so a policy wins only if it wins across the measurement's spread.

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

import numpy as np

from specbound_runtime.policy import PAPER_ALPHA, PAPER_THRESHOLD, PAPER_W_MAX, ExitPolicy, default_check_layers, paper_temperatures

from .collect import HEADS, LOOKUP_MAX, LOOKUP_RULES, Records, lookup_column
from .simulate import CostModel, Lookups, SimResult, decide_exits, guard_costs, oracle_exits, simulate

SCHEDULES = ("fitted", "paper-fitted", "paper")
# the search space's version, part of every study's key: a study holding another space's trials
# (an older release's, in a reused work folder) is another job's (2: lookup_floor, 8-token lookups;
# 3: every lookup or head policy replayed with the run-time guard)
SEARCH_SPACE = 3
# options whose worst kind is this close to the best worst kind count as equals there, and the
# tuning data decides between them: a step of 1% is below what a bench can tell apart on a kind
# (`ar` and `generate()` spread more than that from task to task), and a strict maximum would trade
# large gains on every kind for a noise-sized one on the worst
WORST_KIND_BAND = 0.01


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
    head_draft: bool = False
    lookup_min: int = 0  # prompt lookup backs off to this n-gram size (0: no backoff)
    lookup_floor: int = 0  # lookup drafts max(lookup_floor, matched) tokens, at most lookup_max (0: lookup_max)

    @property
    def early_exit(self) -> bool:
        return bool(self.checks)

    @property
    def drafts(self) -> bool:
        """Whether the policy drafts at all (else it is plain decoding)."""
        return self.early_exit or self.lookup_ngram > 0 or self.head_draft

    def guard_costs(self, cost: CostModel) -> tuple[float, ...]:
        """The run-time guard's prices under `cost` for a policy that drafts with prompt lookup or
        the head (specbound_runtime.guard); none otherwise."""
        return guard_costs(cost, self.w_max) if self.lookup_ngram or self.head_draft else ()

    def policy(self, schedules: Schedules, cost: CostModel | None = None) -> ExitPolicy:
        """The policy this candidate means; with the cost model tuned under, guarded (guard_costs)."""
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
            head_draft=self.head_draft,
            lookup_min=self.lookup_min,
            lookup_floor=self.lookup_floor,
            guard_costs=self.guard_costs(cost) if cost is not None else (),
        )


def paper_candidate(layers: tuple[int, ...], num_layers: int) -> Candidate:
    checks = tuple(l for l in default_check_layers(num_layers) if l in layers)
    return Candidate("plain", "paper", PAPER_THRESHOLD, checks, checks[-1], PAPER_W_MAX)


def no_exit_candidate(
    num_layers: int,
    w_max: int = 1,
    lookup_ngram: int = 0,
    lookup_max: int = 0,
    head_draft: bool = False,
    lookup_min: int = 0,
    lookup_floor: int = 0,
) -> Candidate:
    """A policy without early exit: prompt lookup alone, the next-token head (with or without
    lookup), or (neither) no drafting at all. Head, schedule and threshold mean nothing without
    check layers; they take fixed values."""
    return Candidate(
        "plain", "paper", PAPER_THRESHOLD, (), num_layers, w_max, lookup_ngram, lookup_max, head_draft, lookup_min,
        _floor(lookup_floor, lookup_ngram, lookup_max),
    )


LOOKUP_FLOORS = (0, 1, 2, 3)  # 0: lookup drafts up to lookup_max whatever it matched


def _floor(lookup_floor: int, lookup_ngram: int, lookup_max: int) -> int:
    """The canonical floor: 0 where it changes nothing (lookup off, or a floor at lookup_max)."""
    return lookup_floor if lookup_ngram and lookup_floor < lookup_max else 0


def lookup_rule_name(ngram: int, lookup_min: int = 0) -> str:
    """How tuning names a prompt-lookup rule: "off", "2" (exactly 2 tokens), "3-1" (3 backing off to 1)."""
    if not ngram:
        return "off"
    return f"{ngram}-{lookup_min}" if lookup_min and lookup_min != ngram else str(ngram)


def _lookup_rule(name: str) -> tuple[int, int]:
    if name == "off":
        return 0, 0
    ngram, _, lookup_min = str(name).partition("-")
    return int(ngram), int(lookup_min or 0)


LOOKUP_CHOICES = ["off"] + [lookup_rule_name(n, m) for n, m in LOOKUP_RULES]


def fallback_candidates(num_layers: int, with_head: bool = False) -> list[Candidate]:
    """No drafting, then prompt lookup alone under every rule (LOOKUP_RULES), width and way of sizing
    drafts (LOOKUP_FLOORS); with the head recorded, then the head alone and lookup + head under
    every one of those (the head drafts where lookup proposes nothing, so the width bound is
    lookup's)."""
    # (rule, width, floor) without repeats: a floor changes nothing on an exact rule (every match
    # has the same length), and every floor up to a backoff's lowest tail drafts alike
    sizes = [
        (g, b, m, f) for g, b in LOOKUP_RULES for m in range(1, LOOKUP_MAX + 1) for f in LOOKUP_FLOORS
        if f == 0 or (b and max(f, b) == f < m)
    ]
    out = [no_exit_candidate(num_layers)] + [
        no_exit_candidate(num_layers, m, g, m, lookup_min=b, lookup_floor=f) for g, b, m, f in sizes
    ]
    if with_head:
        out += [no_exit_candidate(num_layers, 1, head_draft=True)] + [
            no_exit_candidate(num_layers, m, g, m, True, b, f) for g, b, m, f in sizes
        ]
    return out


def score(result: SimResult) -> float:
    """What tuning maximises: the least predicted speedup over the measured cost rounds, to the 6
    decimals trials are compared at (plain decoding scores exactly 1.0)."""
    return round(result.speedup if result.robust_speedup is None else result.robust_speedup, 6)


def _lookups(records: Records, candidate: Candidate) -> Lookups | None:
    if not candidate.lookup_ngram or records.lookup_proposed is None:
        return None
    g = lookup_column(candidate.lookup_ngram, candidate.lookup_min)
    size = None if records.lookup_size is None else records.lookup_size[:, g]
    return Lookups(records.lookup_proposed[:, g], records.lookup_right[:, g], size)


def _head(records: Records, candidate: Candidate) -> np.ndarray | None:
    if not candidate.head_draft:
        return None
    if not records.has_head:
        raise ValueError("a policy with the next-token head needs records of it")
    return records.head_draft_right()


def evaluate(records: Records, candidate: Candidate, schedules: Schedules, cost: CostModel) -> SimResult:
    h = HEADS.index(candidate.head)
    policy = candidate.policy(schedules, cost)
    columns = [records.layers.index(l) for l in policy.check_layers]
    exits = decide_exits(
        records.conf[:, h], records.draft_right(h), columns, list(policy.check_layers), list(policy.temperatures), list(policy.thresholds)
    )
    return simulate(
        exits, records.bounds(), cost, policy.d_max, policy.w_max, _lookups(records, candidate), candidate.lookup_max,
        _head(records, candidate), candidate.lookup_floor, policy.guard_costs,
    )


def evaluate_oracle(records: Records, candidate: Candidate, cost: CostModel) -> SimResult:
    """The same drafts with every exit decided perfectly: the policy's own limit."""
    h = HEADS.index(candidate.head)
    columns = [records.layers.index(l) for l in candidate.checks]
    exits = oracle_exits(records.draft_right(h), columns, list(candidate.checks))
    return simulate(
        exits, records.bounds(), cost, candidate.d_max, candidate.w_max, _lookups(records, candidate), candidate.lookup_max,
        _head(records, candidate), candidate.lookup_floor, candidate.guard_costs(cost),
    )


def _suggest(trial, layers: tuple[int, ...], num_layers: int, with_head: bool = False) -> Candidate:
    head = trial.suggest_categorical("head", list(HEADS))
    schedule = trial.suggest_categorical("schedule", list(SCHEDULES))
    threshold = trial.suggest_float("threshold", 0.2, 0.995)
    use = [trial.suggest_categorical(f"check_{l}", [True, False]) for l in layers]
    d_max = trial.suggest_categorical("d_max", list(layers))
    w_max = trial.suggest_int("w_max", 1, 12)
    lookup_ngram, lookup_min = _lookup_rule(trial.suggest_categorical("lookup", LOOKUP_CHOICES))
    lookup_max = trial.suggest_int("lookup_max", 1, LOOKUP_MAX)
    lookup_floor = trial.suggest_categorical("lookup_floor", list(LOOKUP_FLOORS))
    head_draft = bool(trial.suggest_categorical("head_draft", [False, True])) if with_head else False
    checks = tuple(l for l, u in zip(layers, use) if u and l <= d_max)
    lookup_max = lookup_max if lookup_ngram else 0
    lookup_floor = _floor(lookup_floor, lookup_ngram, lookup_max)
    if not checks:
        return no_exit_candidate(num_layers, w_max, lookup_ngram, lookup_max, head_draft, lookup_min, lookup_floor)
    return Candidate(
        head, schedule, threshold, checks, checks[-1], w_max, lookup_ngram, lookup_max, head_draft, lookup_min, lookup_floor
    )


def _params(candidate: Candidate, layers: tuple[int, ...], with_head: bool = False) -> dict:
    params = {"head": candidate.head, "schedule": candidate.schedule, "threshold": candidate.threshold}
    params.update({f"check_{l}": l in candidate.checks for l in layers})
    params.update({"d_max": candidate.d_max, "w_max": candidate.w_max})
    params.update({"lookup": lookup_rule_name(candidate.lookup_ngram, candidate.lookup_min), "lookup_max": max(1, candidate.lookup_max)})
    params["lookup_floor"] = candidate.lookup_floor
    if with_head:
        params["head_draft"] = candidate.head_draft
    return params


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

    from .study import open_study, run_batches

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
    if multi_objective:
        front = [
            t for t in complete
            if not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in complete)
        ]
        best_trial = max(front or complete, key=lambda t: (t.values[0], -t.index))
    else:
        front = []
        best_trial = max(complete, key=lambda t: (t.values[0], -t.index))
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


def _candidate_from_params(params: dict, layers: tuple[int, ...], num_layers: int) -> Candidate:
    checks = tuple(l for l in layers if params[f"check_{l}"] and l <= params["d_max"])
    ngram, lookup_min = _lookup_rule(params.get("lookup", "off"))
    head_draft = bool(params.get("head_draft", False))
    lookup_max = int(params.get("lookup_max", 0)) if ngram else 0
    lookup_floor = _floor(int(params.get("lookup_floor", 0)), ngram, lookup_max)
    if not checks:
        return no_exit_candidate(num_layers, int(params["w_max"]), ngram, lookup_max, head_draft, lookup_min, lookup_floor)
    return Candidate(
        params["head"], params["schedule"], float(params["threshold"]), checks, checks[-1], int(params["w_max"]),
        ngram, lookup_max, head_draft, lookup_min, lookup_floor,
    )

"""The tuner's search space, and each point of it judged by the simulator.

Searched: the draft head (plain short-list or with the fitted lens), the temperature schedule
(per-layer fitted, the paper's linear schedule with alpha fitted, or the paper's default alpha),
the exit threshold, which candidate layers are exit checks, the depth bound and the width bound.
The paper's defaults are enqueued as the first trial, so tuning can only match or beat them.
No check layer at all is a point of the space too: prompt lookup alone, or no drafting. Where the
records hold the fitted next-token head, whether to draft with it is searched too (a boolean: one
head draft in a round where prompt lookup proposes nothing). So is how prompt lookup sizes its
drafts: always up to its width, or by the match's length from a floor up to it.

Every trial is scored by its robust speedup: the least over the cost model's measured rounds
(`CostModel.samples`), so a policy wins only if it wins across the measurement's spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from specbound_runtime.policy import (
    PAPER_ALPHA, PAPER_THRESHOLD, PAPER_W_MAX, ExitPolicy, default_check_layers, lookup_words, paper_temperatures,
)

from .collect import HEADS, LOOKUP_MAX, LOOKUP_RULES, Records
from .replay import replays
from .simulate import CostModel, Exits, SimResult, decide_exits, guard_prices, oracle_exits, simulate

SCHEDULES = ("fitted", "paper-fitted", "paper")
# the search space's version, part of every study's key: a study holding another space's trials
# (an older release's, in a reused work folder) is another job's (2: lookup_floor, 8-token lookups;
# 3: every lookup or head policy replayed with the run-time guard)
SEARCH_SPACE = 3
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

    def to_dict(self) -> dict:
        """The candidate as the artifact's `best_trial` and the report's `policy` record it."""
        return {
            "head": self.head,
            "schedule": self.schedule,
            "threshold": round(self.threshold, 6),
            "check_layers": list(self.checks),
            "d_max": self.d_max,
            "w_max": self.w_max,
            "lookup_ngram": self.lookup_ngram,
            "lookup_max": self.lookup_max,
            "lookup_min": self.lookup_min,
            "head_draft": self.head_draft,
            **({"lookup_floor": self.lookup_floor} if self.lookup_floor else {}),
        }

    def guard_costs(self, cost: CostModel) -> tuple[float, ...]:
        """The run-time guard's prices under `cost` for a policy that drafts with prompt lookup or
        the head (specbound_runtime.guard); none otherwise."""
        return guard_prices(cost, self.w_max) if self.lookup_ngram or self.head_draft else ()

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


def candidate_words(pol: dict) -> str:
    """A candidate's `to_dict` in words, for the calibration summary."""
    lookup = (
        f"prompt lookup {lookup_words(pol['lookup_ngram'], pol.get('lookup_min', 0), pol['lookup_max'], pol.get('lookup_floor', 0))}"
        if pol["lookup_ngram"]
        else "no prompt lookup"
    )
    if pol.get("head_draft"):
        lookup += ", the next-token head where lookup proposes nothing"
    if not pol["check_layers"]:
        plain = not (pol["lookup_ngram"] or pol.get("head_draft"))
        return f"no early exit, {lookup}" + (" (plain decoding: no draft source pays here)" if plain else "")
    return (
        f"head={pol['head']} schedule={pol['schedule']} threshold={pol['threshold']} checks={pol['check_layers']} "
        f"d_max={pol['d_max']} w_max={pol['w_max']}, {lookup}"
    )


COST_MARGIN = 0.1  # plain steps: a price this much beyond the measurement's own spread is drift


def cost_tolerance(cost: CostModel, prices: tuple[float, ...]) -> float:
    """How far the guard's prices may differ on a machine before decode warns: their spread over
    the cost model's measured rounds, plus COST_MARGIN."""
    spread = max((abs(a - b) for c in cost.variants() for a, b in zip(guard_prices(c, len(prices)), prices)), default=0.0)
    return spread + COST_MARGIN


def guard_metadata(candidate: Candidate, cost: CostModel, change: tuple[float | None, float | None]) -> dict[str, str]:
    """For a guarded policy, what decode's PassCostWatch reads from the artifact: how far prices
    may drift (cost_tolerance) and where tuning would choose another policy (policy_change)."""
    prices = candidate.guard_costs(cost)
    if not prices:
        return {}
    below, above = change
    return {"cost_tolerance": f"{cost_tolerance(cost, prices):.4f}", "policy_change": json.dumps({"below": below, "above": above}, sort_keys=True)}


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


def candidate_exits(records: Records, candidate: Candidate, schedules: Schedules, cost: CostModel) -> Exits:
    """The candidate's exit rule applied to every recorded position."""
    h = HEADS.index(candidate.head)
    policy = candidate.policy(schedules, cost)
    columns = [records.layers.index(l) for l in policy.check_layers]
    return decide_exits(
        records.conf[:, h], records.draft_right(h), columns, list(policy.check_layers), list(policy.temperatures), list(policy.thresholds)
    )


def evaluate(records: Records, candidate: Candidate, schedules: Schedules, cost: CostModel) -> SimResult:
    policy = candidate.policy(schedules, cost)
    exits = candidate_exits(records, candidate, schedules, cost)
    return simulate(exits, records.bounds(), cost, policy.d_max, policy.w_max, replays(records, policy), policy.guard_costs, records.context)


def evaluate_oracle(records: Records, candidate: Candidate, schedules: Schedules, cost: CostModel) -> SimResult:
    """The same drafts with every exit decided perfectly: the policy's own limit."""
    h = HEADS.index(candidate.head)
    policy = candidate.policy(schedules, cost)
    columns = [records.layers.index(l) for l in policy.check_layers]
    exits = oracle_exits(records.draft_right(h), columns, list(policy.check_layers))
    return simulate(exits, records.bounds(), cost, policy.d_max, policy.w_max, replays(records, policy), policy.guard_costs, records.context)


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

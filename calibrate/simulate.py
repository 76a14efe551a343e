"""A simulator of the decode loop over recorded per-layer statistics, under a measured cost model.

Pure numpy. It replays the runtime's round exactly as drafters.Speculator runs it: the no-layer
sources (`Replay`s, in the policy's order; the first that proposes opens the round), then early
exit (first check layer whose confidence passes its threshold; a hard token at the depth bound
ends drafting; the width bound; catch-up of earlier drafts to the frontier's depth), then one
verification pass from each position's depth, over the model's own greedy sequences. It charges
each layer call, exit check and LM-head read, by its width, what it costs on this machine. The one
approximation: after a wrong draft, later early-exit drafts of the same round are charged with
the statistics of the true context (they are rejected anyway). The no-layer sources draft from
committed tokens only, so their rounds are replayed exactly.

Under sampling the same replay runs over the model's own sampled sequences, with a draft "right"
when speculative sampling accepts it: drawn once per position from its recorded acceptance
probability 1 - TV(p, q) (`collect.Records.draft_right`); prompt lookup's one-hot drafts count as
accepted while they match the sampled continuation, which happens with probability p(x), their
acceptance probability. After a rejection the engine emits a residual token, the replay the
recorded one: both continue along a sample of the model, so the approximation is of the same kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from specbound_runtime.guard import SOURCES, DraftGuard

from .fit import confidence_at


COST_FIELDS = ("layer_base", "layer_extra", "head_base", "head_extra", "check", "round_overhead")


@dataclass(frozen=True)
class CostModel:
    """Milliseconds, measured by calibrate.costs on this machine for this model.

    The fields are the medians of independent measurement rounds; `samples` keeps each round's
    values (COST_FIELDS, then its layer_widths and head_widths), so a policy can be judged under
    the whole spread of the measurement (`robust_speedup`), not only under its median. A cost
    model written before rounds were kept has no samples: it is its own only sample.

    A call over n positions costs what was measured for n (`layer_widths`, `head_widths`: n = 1,
    2, ...): the BLAS picks a different kernel as the row count grows, so the cost is not linear
    in n (SmolLM2 on a 2-core CPU: a pass over 2 or 3 positions costs ~10-20% more than over one,
    over 4 positions ~60% more). Beyond the measured widths, and in a cost model without them, a
    call costs base + extra per further position."""

    num_layers: int
    layer_base: float  # one decoder-layer call over one position
    layer_extra: float  # each further position in the same call
    head_base: float  # the full LM head over one position
    head_extra: float  # each further position
    check: float  # one exit check (exit head over one position, confidence)
    round_overhead: float  # fixed cost of a verification round (embedding, acceptance, bookkeeping)
    samples: tuple[tuple[float, ...], ...] = ()
    layer_widths: tuple[float, ...] = ()  # one decoder-layer call over n = 1, 2, ... positions
    head_widths: tuple[float, ...] = ()  # the full LM head over n = 1, 2, ... positions
    # per-context pricing: the widths above were measured after `context` tokens; a layer call over
    # n positions after c tokens costs context_slopes[n - 1] ms more per token of c beyond it
    # (attention reads the cache). Measured at two contexts (calibrate.costs); none: every round
    # is priced at `context`, as cost models written before it were.
    context: int = 0
    context_slopes: tuple[float, ...] = ()
    # batches: a shared pass over batch_rows[i] rows of W = 1, 2, ... positions each costs
    # batch_passes[i][W - 1] ms, as the batch engine runs it (calibrate.costs.batch_passes; priced
    # by specbound_runtime.batch_policy.PassPrices). None measured: rows x positions priced as one
    # sequence's pass, as cost models written before batches were.
    batch_rows: tuple[int, ...] = ()
    batch_passes: tuple[tuple[float, ...], ...] = ()
    # whether the measuring engine packs a shared pass (runs each row's real positions only:
    # HFCausalLM.packs_batches, the fast CPU kernels) or pads every row to the round's width; the
    # batch replay runs the passes the same way
    batch_packed: bool = False

    def __post_init__(self) -> None:
        for k in COST_FIELDS:
            v = getattr(self, k)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"cost {k} must be finite and >= 0, got {v}")
        for name in ("layer_widths", "head_widths"):
            widths = tuple(float(x) for x in getattr(self, name))
            if not all(x >= 0 and np.isfinite(x) for x in widths):
                raise ValueError(f"{name} must be finite and >= 0, got {list(widths)}")
            object.__setattr__(self, name, widths)
        size = len(COST_FIELDS) + len(self.layer_widths) + len(self.head_widths)
        samples = tuple(tuple(float(x) for x in row) for row in self.samples)
        for row in samples:
            if len(row) != size or not all(x >= 0 and np.isfinite(x) for x in row):
                raise ValueError(f"each cost sample needs {size} finite values >= 0, got {list(row)}")
        object.__setattr__(self, "samples", samples)
        slopes = tuple(float(x) for x in self.context_slopes)
        if not all(np.isfinite(x) for x in slopes) or (slopes and self.context < 1):
            raise ValueError(f"context_slopes need a measured context >= 1 and finite values, got {self.context}, {list(slopes)}")
        object.__setattr__(self, "context_slopes", slopes)
        object.__setattr__(self, "batch_rows", tuple(int(r) for r in self.batch_rows))
        object.__setattr__(self, "batch_passes", tuple(tuple(float(x) for x in p) for p in self.batch_passes))
        object.__setattr__(self, "batch_packed", bool(self.batch_packed))
        self.pass_prices()  # validates the batch prices

    @classmethod
    def from_rounds(cls, num_layers: int, rounds: list[dict]) -> "CostModel":
        """The component-wise median of measurement rounds, keeping every round as a sample.
        A round may carry `layer_widths` and `head_widths` (the same lengths in every round)."""
        rows = [
            tuple(float(r[k]) for k in COST_FIELDS) + tuple(r.get("layer_widths", ())) + tuple(r.get("head_widths", ()))
            for r in rounds
        ]
        n_layer = len(rounds[0].get("layer_widths", ()))
        return cls._from_row(num_layers, tuple(float(x) for x in np.median(np.asarray(rows), axis=0)), n_layer, tuple(rows))

    @classmethod
    def _from_row(cls, num_layers: int, row: tuple[float, ...], n_layer: int, samples=(), context: int = 0, slopes=()) -> "CostModel":
        n = len(COST_FIELDS)
        return cls(
            num_layers, *row[:n], samples=samples, layer_widths=row[n : n + n_layer], head_widths=row[n + n_layer :],
            context=context, context_slopes=slopes,
        )

    def variants(self) -> list["CostModel"]:
        """The median and every measured round, as cost models (each round with the median's
        context slopes: they are measured once, beside the rounds)."""
        return [self] + [
            CostModel._from_row(self.num_layers, row, len(self.layer_widths), context=self.context, slopes=self.context_slopes)
            for row in self.samples
        ]

    def with_batch_passes(self, rows: tuple[int, ...], passes: tuple[tuple[float, ...], ...], packed: bool = False) -> "CostModel":
        """This cost model with measured batch passes (see batch_rows), packed or padded."""
        return replace(self, batch_rows=tuple(rows), batch_passes=tuple(tuple(p) for p in passes), batch_packed=packed)

    def pass_prices(self):
        """The runtime's prices of one sequence's and of a batch's passes, from this cost model
        (what the artifact's cost model gives the batch engine)."""
        from specbound_runtime.batch_policy import PassPrices

        return PassPrices(
            self.num_layers, self.layer_widths, self.head_widths, (self.layer_base, self.layer_extra),
            (self.head_base, self.head_extra), self.batch_rows, self.batch_passes,
        )

    def with_context(self, context: int, slopes: tuple[float, ...]) -> "CostModel":
        """This cost model with per-context pricing: measured after `context` tokens, `slopes` ms
        per layer call over n positions per further token of context."""
        return replace(self, context=int(context), context_slopes=tuple(slopes))

    def context_slope(self, n: int) -> float:
        """What one more token of context adds to a decoder-layer call over n positions (0 without
        per-context pricing; beyond the measured widths, the widest's)."""
        if not self.context_slopes:
            return 0.0
        return self.context_slopes[min(n, len(self.context_slopes)) - 1]

    def layer_call(self, n: int) -> float:
        """One decoder-layer call over n positions."""
        return _width_cost(self.layer_widths, self.layer_base, self.layer_extra, n)

    def head_call(self, n: int) -> float:
        """The full LM head over n positions."""
        return _width_cost(self.head_widths, self.head_base, self.head_extra, n)

    def pass_ms(self, n: int, context: int | None = None) -> float:
        """A full verification pass over n positions (every layer and the LM head), after `context`
        tokens where the cost model prices contexts (else at the one it was measured at)."""
        ms = self.num_layers * self.layer_call(n) + self.head_call(n)
        if context is not None and self.context_slopes:
            ms += self.num_layers * self.context_slope(n) * (context - self.context)
        return ms

    @property
    def spread(self) -> float:
        """Relative spread of plain decoding's per-token cost over the rounds: (max - min) / median."""
        per_token = [c.ar_token for c in self.variants()[1:]]
        return (max(per_token) - min(per_token)) / self.ar_token if len(per_token) > 1 and self.ar_token > 0 else 0.0

    @property
    def ar_token(self) -> float:
        """One token of plain greedy decoding through the engine."""
        return self.num_layers * self.layer_call(1) + self.head_call(1) + self.round_overhead

    def wide_passes_scaled(self, factor: float) -> "CostModel":
        """This cost model on a machine where every call's cost beyond its first position is
        `factor` times as much (the median and every round alike): each draft's price in plain
        steps (guard_prices) scales by `factor`, and a plain step stays what it was."""

        def row(c: "CostModel") -> tuple[float, ...]:
            fields = {k: getattr(c, k) for k in COST_FIELDS} | {"layer_extra": c.layer_extra * factor, "head_extra": c.head_extra * factor}
            widths = [tuple(w[0] + (x - w[0]) * factor for x in w) if w else () for w in (c.layer_widths, c.head_widths)]
            return tuple(fields[k] for k in COST_FIELDS) + widths[0] + widths[1]

        scaled = [row(c) for c in self.variants()]
        return CostModel._from_row(
            self.num_layers, scaled[0], len(self.layer_widths), tuple(scaled[1:]), self.context, self.context_slopes
        )

    def to_dict(self) -> dict:
        out = {"num_layers": self.num_layers, **{k: round(getattr(self, k), 6) for k in COST_FIELDS}}
        for name in ("layer_widths", "head_widths"):
            if getattr(self, name):
                out[name] = [round(x, 6) for x in getattr(self, name)]
        if self.samples:
            out["samples"] = [[round(x, 6) for x in row] for row in self.samples]
        if self.context_slopes:  # written only with per-context pricing: older cost files are unchanged
            out["context"] = self.context
            out["context_slopes"] = [round(x, 8) for x in self.context_slopes]
        if self.batch_rows:  # written only where batches were measured: older cost files are unchanged
            out["batch_rows"] = list(self.batch_rows)
            out["batch_passes"] = [[round(x, 6) for x in p] for p in self.batch_passes]
            if self.batch_packed:
                out["batch_packed"] = True
        return out


def guard_prices(cost: CostModel, w_max: int) -> tuple[float, ...]:
    """The run-time guard's prices (the policy's guard): what k drafts at depth 0 add to a
    verification pass, k = 1..w_max, in plain decoding steps (cost.ar_token), as the artifact
    stores them (float32), so the simulator and the engine guard with the same numbers."""
    one = cost.num_layers * cost.layer_call(1) + cost.head_call(1)
    return tuple(
        float(np.float32(max(0.0, cost.num_layers * cost.layer_call(k + 1) + cost.head_call(k + 1) - one) / cost.ar_token))
        for k in range(1, w_max + 1)
    )


def _width_cost(widths: tuple[float, ...], base: float, extra: float, n: int) -> float:
    if n <= len(widths):
        return widths[n - 1]
    if widths:
        return widths[-1] + extra * (n - len(widths))
    return base + extra * (n - 1)


@dataclass(frozen=True)
class Exits:
    """Per recorded position: exit layer (-1 for a hard token), whether its draft is right, and
    how many exit checks it costs."""

    layer: np.ndarray
    right: np.ndarray
    checks: np.ndarray


@dataclass(frozen=True)
class SimResult:
    speedup: float
    mean_accepted_length: float
    acceptance_rate: float
    waste: float  # rejected drafts per emitted token
    tokens: int
    rounds: int
    drafted: int
    accepted: int
    cost_ms: float
    # what the replay did, counted: the cost under any cost model is a sum over these
    layer_calls: int = 0  # decoder-layer calls
    extra_positions: int = 0  # further positions inside those calls
    exit_checks: int = 0
    head_reads: int = 0  # next-token head drafts (each a short-list head product, priced as an exit check)
    robust_speedup: float | None = None  # the least speedup over the cost model's measured rounds
    call_widths: tuple[int, ...] = ()  # [n - 1]: decoder-layer calls over n positions
    head_rows: tuple[int, ...] = ()  # [n - 1]: rounds whose LM head reads n positions (n - 1 drafts)
    # with per-context pricing: [n - 1], the contexts of those calls summed; and the contexts of
    # the plain decoding steps the emitted tokens stand for, summed (both empty without it)
    call_contexts: tuple[int, ...] = ()
    token_contexts: int = 0

    def speedup_under(self, cost: CostModel) -> float:
        """The predicted speedup of the same replay under another cost model."""
        total = price(cost, self.call_widths, self.head_rows, self.exit_checks + self.head_reads, self.rounds, self.call_contexts)
        return plain_price(cost, self.tokens, self.token_contexts) / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        out = {
            k: round(v, 6) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }
        if not self.call_contexts:  # priced at one context: as results were before per-context pricing
            del out["call_contexts"], out["token_contexts"]
        return out


def price(cost: CostModel, call_widths, head_rows, checks: int, rounds: int, call_contexts=()) -> float:
    """Milliseconds for the counted work under `cost`: layer calls and LM-head reads by width,
    exit checks (and head drafts), and each round's fixed overhead; with the calls' contexts and a
    cost model that prices them, each call at its own context."""
    total = (
        sum(count * cost.layer_call(n) for n, count in enumerate(call_widths, 1) if count)
        + sum(count * cost.head_call(n) for n, count in enumerate(head_rows, 1) if count)
        + cost.check * checks
        + cost.round_overhead * rounds
    )
    if call_contexts and cost.context_slopes:
        total += sum(
            cost.context_slope(n) * (summed - count * cost.context)
            for n, (count, summed) in enumerate(zip(call_widths, call_contexts), 1) if count
        )
    return total


def plain_price(cost: CostModel, tokens: int, token_contexts: int = 0) -> float:
    """Milliseconds plain decoding takes for `tokens` tokens (at the contexts summed in
    `token_contexts`, where the cost model prices contexts)."""
    total = cost.ar_token * tokens
    if token_contexts and cost.context_slopes:
        total += cost.num_layers * cost.context_slope(1) * (token_contexts - tokens * cost.context)
    return total


def _advance(blocks: list[list[int]], depth: int, widths: list[int], sums: list[int] | None = None, context: int = 0) -> None:
    """The engine's DecodeState.advance_to over run-length blocks [depth, count] of pending
    positions (depths non-increasing): climb the last block one layer per call, merging with the
    block before it on reaching its depth; count each call by its width (and, with `sums`, add
    its context there)."""
    while blocks[-1][0] < depth:
        d, n = blocks[-1]
        target = min(depth, blocks[-2][0]) if len(blocks) > 1 else depth
        widths[n] += target - d
        if sums is not None:
            sums[n] += (target - d) * context
        if len(blocks) > 1 and blocks[-2][0] == target:
            blocks.pop()
            blocks[-1][1] += n
        else:
            blocks[-1][0] = target


def _push(blocks: list[list[int]], m: int = 1) -> None:
    """m new pending positions at depth 0."""
    if blocks[-1][0] == 0:
        blocks[-1][1] += m
    else:
        blocks.append([0, m])


def decide_exits(
    conf_grid: np.ndarray,
    right: np.ndarray,
    columns: list[int],
    layers: list[int],
    temperatures: list[float],
    thresholds: list[float],
) -> Exits:
    """Apply the exit rule to recorded data. conf_grid [N, C, G], right [N, C]; `columns` index the
    candidate layers that are check layers (within the depth bound), in increasing depth."""
    if not columns:
        return _first_pass(np.zeros((conf_grid.shape[0], 0), bool), right[:, :0], layers)
    conf = np.stack([confidence_at(conf_grid[:, c], t) for c, t in zip(columns, temperatures)], axis=1)
    passes = conf >= np.asarray(thresholds)[None, :]
    return _first_pass(passes, right[:, columns], layers)


def oracle_exits(right: np.ndarray, columns: list[int], layers: list[int]) -> Exits:
    """Every exit decided perfectly: a token exits at the first check layer whose draft is right."""
    if not columns:  # no early exit: no exits to decide (as decide_exits)
        n = right.shape[0]
        return Exits(np.full(n, -1), np.zeros(n, bool), np.zeros(n, np.int64))
    return _first_pass(right[:, columns], right[:, columns], layers)


def _first_pass(passes: np.ndarray, right: np.ndarray, layers: list[int]) -> Exits:
    n = passes.shape[0]
    if passes.shape[1] == 0:  # no check layer: every token is hard, nothing exits early
        return Exits(np.full(n, -1), np.zeros(n, bool), np.zeros(n, np.int64))
    has = passes.any(axis=1)
    first = passes.argmax(axis=1)
    layer = np.where(has, np.asarray(layers)[first], -1)
    ok = has & right[np.arange(len(first)), first]
    checks = np.where(has, first + 1, passes.shape[1])
    return Exits(layer=layer, right=ok, checks=checks)


@dataclass(frozen=True)
class Replay:
    """A draft source that costs no layers, replayed (calibrate.replay builds one per source the
    policy uses): at each recorded position, how many drafts it proposes when a round starts
    there (already sized as the policy sizes them) and how many of those lead the true
    continuation. reads: short-list head products a proposal costs (priced as exit checks)."""

    source: str
    proposed: np.ndarray
    right: np.ndarray
    reads: int = 0


def simulate(
    exits: Exits,
    bounds: list[tuple[int, int]],
    cost: CostModel,
    d_max: int,
    w_max: int,
    free: Sequence[Replay] = (),
    guard: tuple[float, ...] = (),
    contexts: np.ndarray | None = None,
) -> SimResult:
    """Replay the decode loop over sequences [start, end) of recorded positions; position `start`
    is the last prompt token (its hidden state predicts the first generated token).

    free: the sources that cost no layers, in the order a round consults them
    (drafters.Speculator): the first open one that proposes at a round's first position opens
    the round with its drafts at depth 0; early exit drafts on from there.

    guard, when given: the run-time guard's prices (specbound_runtime.guard), the same class the
    engine runs, fresh for each sequence, fed what each round's opening drafts kept.

    contexts ([N]), when given with a cost model that prices contexts: how many tokens precede
    each recorded position (the cache a round starting there reads); each round's layer calls,
    and each plain step it stands for, are priced at their own context."""
    L = cost.num_layers
    layer = exits.layer.tolist()
    right = exits.right.tolist()
    checks = exits.checks.tolist()
    sources = [(f.source, f.proposed.tolist(), f.right.tolist(), f.reads) for f in free]
    widths = [0] * (w_max + 2)  # [n]: layer calls over n positions
    heads = [0] * (w_max + 2)  # [n]: rounds whose LM head reads n positions
    tokens = rounds = drafted = accepted = 0
    all_checks = all_heads = 0
    priced = contexts is not None and bool(cost.context_slopes)
    context = contexts.tolist() if priced else None
    sums = [0] * (w_max + 2) if priced else None  # [n]: the contexts of layer calls over n positions, summed
    token_contexts = 0
    for start, end in bounds:
        t = start
        watch = DraftGuard(guard) if guard else None
        while t < end:
            # the first position is the prompt's last token: its round is the prefill, which the
            # engine runs without drafting (priced as one position)
            limit = min(w_max, end - 1 - t) if t > start else 0
            # k drafts so far, a of them accepted (the leading right ones)
            k = a = n_checks = n_head = 0
            blocks = [[0, 1]]  # the pending positions by depth: the token emitted last round
            j = t
            open_ = watch.open_sources() if watch is not None and limit else SOURCES
            first = None  # (source, drafts) of the round's opening drafts, for the guard
            for source, proposed, proposed_right, reads in sources if limit else ():
                if source in SOURCES and source not in open_ or not proposed[j]:
                    continue
                # a no-layer source opens the round: drafts at depth 0 from the committed tokens,
                # no layer cost (the replay's context is the engine's: exact)
                k = min(proposed[j], limit)
                a = min(k, proposed_right[j])
                n_head = reads
                first = (source, k)
                j += k
                _push(blocks, k)
                break
            while k < limit:
                n_checks += checks[j]
                if layer[j] < 0:  # a hard token: drafting stops (its climb to the depth bound is the
                    break  # start of the verification pass's climb: the same calls, counted there)
                _advance(blocks, layer[j], widths, sums, context[t] if priced else 0)  # the frontier climbs to its exit layer
                if a == k and right[j]:
                    a += 1
                k += 1
                j += 1
                _push(blocks)
            _advance(blocks, L, widths, sums, context[t] if priced else 0)  # one verification pass finishes every pending position
            if watch is not None and first is not None and first[0] in SOURCES:
                watch.record(first[0], first[1], min(a, first[1]))
            heads[k + 1] += 1
            all_checks += n_checks
            all_heads += n_head
            tokens += a + 1
            if priced:
                token_contexts += sum(context[t : t + a + 1])
            rounds += 1
            drafted += k
            accepted += a
            t += a + 1
    call_widths = tuple(widths[1:])
    head_rows = tuple(heads[1:])
    call_contexts = tuple(sums[1:]) if priced else ()
    total = price(cost, call_widths, head_rows, all_checks + all_heads, rounds, call_contexts)
    ar = plain_price(cost, tokens, token_contexts)
    result = SimResult(
        speedup=ar / total if total > 0 else 0.0,
        mean_accepted_length=tokens / rounds if rounds else 0.0,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        waste=(drafted - accepted) / tokens if tokens else 0.0,
        tokens=tokens,
        rounds=rounds,
        drafted=drafted,
        accepted=accepted,
        cost_ms=total,
        layer_calls=sum(call_widths),
        extra_positions=sum((n - 1) * c for n, c in enumerate(call_widths, 1)),
        exit_checks=all_checks,
        head_reads=all_heads,
        call_widths=call_widths,
        head_rows=head_rows,
        call_contexts=call_contexts,
        token_contexts=token_contexts,
    )
    if not cost.samples:
        return result
    return replace(result, robust_speedup=min(result.speedup_under(c) for c in cost.variants()))


@dataclass(frozen=True)
class BatchSimResult:
    """A batch replay: speedup over plain batched decoding of the same batches (both without
    their prefills), and what the speculative replay did."""

    rows: int
    width: int
    speedup: float
    tokens: int
    passes: int
    drafted: int
    accepted: int
    cost_ms: float
    plain_ms: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def simulate_batch(
    free: Sequence[Replay],
    bounds: list[tuple[int, int]],
    prices,
    rows: int,
    width: int,
    guard: tuple[float, ...] = (),
    check_ms: float = 0.0,
    overhead_ms: float = 0.0,
    exits: Exits | None = None,
    num_layers: int = 0,
    packed: bool = False,
) -> BatchSimResult:
    """Replay the batch engine (specbound_runtime.batch.generate_batch) over the recorded
    sequences, taken `rows` at a time in order: every round, each active row drafts from the
    no-layer sources (the first that proposes, in the policy's order, under the row's own guard)
    up to `width`; the round's shared pass runs W positions a row (batch_policy.round_width, from
    the drafts and the acceptance rate so far, as the engine chooses it) and costs
    prices.batch_ms(active rows, W); each row keeps its leading right drafts plus one token; a row
    leaves the batch at its sequence's end. Plain batched decoding of the same batches: one
    position a row per pass. Each row also costs `overhead_ms` a round (its acceptance and
    bookkeeping) and `check_ms` per short-list head product its drafts read. prices: a
    batch_policy.PassPrices (CostModel.pass_prices()).

    exits (with the model's `num_layers`): early exit as a batch source, as the shared pass would
    run it: after its no-layer drafts, a row drafts on while each next position exits (the
    policy's exit rule over the records), one draft step at a time for all drafting rows
    together, each step a partial batch pass over those rows up to the deepest exit layer among
    them (priced as that share of a one-position pass) plus its exit checks; the verification
    pass then runs every position through every layer (a shared pass starts all rows at layer
    0: the drafts' shallow layers are computed again). The batch engine does not draft this way;
    the tuner uses it to judge whether it would pay.

    packed: the shared pass runs each row's real positions only (the engine on the fast
    kernels: adapter.batch_pass with lengths), priced by prices.packed_ms; False (the default, as
    for a cost model that does not say, CostModel.batch_packed): every row is padded to the
    round's width."""
    from specbound_runtime.batch_policy import round_width

    if rows < 1 or width < 0:
        raise ValueError(f"a batch replay needs rows >= 1 and width >= 0, got {rows}, {width}")
    sources = [(f.source, f.proposed.tolist(), f.right.tolist(), f.reads) for f in free]
    if exits is not None:
        if num_layers < 1:
            raise ValueError("early exit in a batch replay needs the model's num_layers")
        exit_layer, exit_right, exit_checks = exits.layer.tolist(), exits.right.tolist(), exits.checks.tolist()
    tokens = passes = drafted = accepted = 0
    spec = plain = 0.0
    for g in range(0, len(bounds), rows):
        group = bounds[g : g + rows]
        # after the prefill (the same in both, left out of both), each row stands at start + 1
        t = {i: s + 1 for i, (s, e) in enumerate(group) if s + 1 < e}
        tokens += len(group)
        ends = {i: e for i, (s, e) in enumerate(group)}
        watch = {i: DraftGuard(guard) if guard else None for i in t}
        lengths = [e - s - 1 for s, e in group]  # tokens after the first
        for step in range(max(lengths, default=0)):
            n = sum(1 for x in lengths if x > step)
            plain += prices.batch_ms(n, 1) + overhead_ms * n
        while t:
            proposals = {}
            reads = checks = 0
            steps: dict[int, list[int]] = {}  # early-exit draft step -> the exit layers of the rows drafting at it
            steps_of: dict[int, list[int]] = {}
            for i, at in t.items():
                limit = min(width, ends[i] - 1 - at)
                k = a = 0
                first = None
                if limit > 0:
                    open_ = watch[i].open_sources() if watch[i] is not None else SOURCES
                    for source, proposed, proposed_right, n_reads in sources:
                        if source in SOURCES and source not in open_ or not proposed[at]:
                            continue
                        k = min(proposed[at], limit)
                        a = min(k, proposed_right[at])
                        reads += n_reads
                        first = source
                        break
                    while exits is not None and k < limit:
                        j = at + k
                        checks += int(exit_checks[j])
                        if exit_layer[j] < 0:  # a hard token ends the row's drafting
                            break
                        steps.setdefault(len(steps_of.setdefault(i, [])), []).append(exit_layer[j])
                        steps_of[i].append(exit_layer[j])
                        if a == k and exit_right[j]:
                            a += 1
                        k += 1
                proposals[i] = (k, a, first)
            rate = (accepted + 1) / (drafted + 2)
            w = round_width([k for k, _, _ in proposals.values()], rate, prices, packed)
            if packed:
                shared = prices.packed_ms(len(t), sum(1 + min(k, w - 1) for k, _, _ in proposals.values()))
            else:
                shared = prices.batch_ms(len(t), w)
            spec += shared + overhead_ms * len(t) + check_ms * (reads + checks)
            for layers in steps.values():  # each early-exit draft step: a partial pass of the rows drafting
                spec += prices.batch_ms(len(layers), 1) * max(layers) / num_layers
            passes += 1
            for i, (k, a, first) in proposals.items():
                d = min(k, w - 1)
                a = min(a, d)
                if watch[i] is not None and first in SOURCES:
                    watch[i].record(first, d, a)
                drafted += d
                accepted += a
                tokens += a + 1
                t[i] += a + 1
            t = {i: at for i, at in t.items() if at < ends[i]}
    return BatchSimResult(
        rows=rows, width=width, speedup=plain / spec if spec > 0 else 1.0, tokens=tokens, passes=passes,
        drafted=drafted, accepted=accepted, cost_ms=spec, plain_ms=plain,
    )

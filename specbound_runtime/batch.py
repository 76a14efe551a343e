"""Speculative decoding of many prompts at once: each row drafts and accepts on its own, all rows
share one verification pass.

Each row keeps its own committed tokens, drafts and KV length (`BatchKVCache` holds every row's
keys at the row's own positions, so rows of different prompt lengths need no left padding inside
the cache). A round: every active row drafts from the sources that cost no layers (prompt lookup,
the fitted next-token head: one product for all rows, `HeadDrafts`), up to its draft bound; the
round keeps as many drafts a row as pay for their positions (`batch_policy.round_width`); the
rows' pending blocks (the committed token not yet cached, then the drafts) run through every
layer in one pass (`HFCausalLM.batch_pass`): on the fast kernels the projections run over the
real positions only (packed), elsewhere padded to the longest block. Each row then accepts its
longest agreeing prefix (greedy) or runs speculative sampling, exactly as the one-sequence engine
does, and moves its own length. A finished row (end-of-sequence, a stop criterion, its token
limit) leaves the batch: its keys are dropped and it costs no more work.

Early exit is not a batch source: a row drafting at a shallow layer would need partial passes
of its own before the shared one, which would run its drafts' shallow layers again; calibration
prices that (calibrate.batches, `early_exit` in the artifact's batch policy) to say whether it
would pay. Every row is answered as if it were decoded alone: greedy rows are token-identical to
`generate()` on that prompt alone up to the rounding of a batched pass (measured as an identity
rate), sampled rows are distributed exactly as `generate(do_sample=True)` on it alone.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .batch_policy import BatchPolicy, PassPrices, batch_draft_width, round_width  # noqa: F401 (the batch API)
from .engine import DraftChain, GenerationResult, LogitsProcessor, StoppingCriteria, emitted, verify
from .host import to_device
from .sampling import Sampler


class RoundClock:
    """Whether the next batch round drafts, by what rounds cost on this machine: the seconds per
    emitted token of rounds that drafted (drafting included) against rounds that did not. Until
    each kind has `SAMPLES` rounds, they alternate; then the cheaper kind runs, and now and then
    a round of the other kind probes whether that still holds (rows finish, contexts grow). Each
    probe that confirms the choice doubles the wait for the next one (from `PROBE` rounds up to
    `MAX_PROBE`), so a settled batch pays for few probes; a probe that flips the choice starts
    over. The cost model picks each round's width; this guard keeps a batch from paying for
    drafts that, on this machine, cost more than they give."""

    SAMPLES = 3
    PROBE = 12
    MAX_PROBE = 96

    def __init__(self) -> None:
        self.costs: dict[bool, list[float]] = {True: [], False: []}
        self.interval = self.PROBE
        self.since_probe = 0
        self.choice: bool | None = None

    def _cheaper(self) -> bool:
        return statistics.median(self.costs[True][-8:]) < statistics.median(self.costs[False][-8:])

    def drafts_next(self) -> bool:
        spec, plain = self.costs[True], self.costs[False]
        if len(spec) < self.SAMPLES or len(plain) < self.SAMPLES:
            return len(spec) <= len(plain)
        better = self._cheaper()
        if better != self.choice:  # a new choice (or the first): probe again soon
            self.choice, self.interval, self.since_probe = better, self.PROBE, 0
        self.since_probe += 1
        if self.since_probe >= self.interval:
            self.since_probe = 0
            self.interval = min(2 * self.interval, self.MAX_PROBE)
            return not better
        return better

    def record(self, drafted: bool, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.costs[drafted].append(seconds / tokens)


class BatchKVCache:
    """Keys and values of B rows, each row at its own positions: slot p of row b holds position p
    of row b's sequence. A pass writes W slots per row from that row's start (`begin`); what a
    row keeps is the engine's business (its length), so rollback moves a number and copies
    nothing. Implements `update`, the one method transformers' attention modules call."""

    def __init__(self, num_layers: int, rows: int, max_length: int) -> None:
        self.max_length = max_length
        self.rows = rows
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.starts: list[int] = [0] * rows
        self.width = 0

    def begin(self, starts: Sequence[int], width: int) -> None:
        """The next pass writes slots starts[b]..starts[b]+width-1 of row b."""
        if len(starts) != self.rows:
            raise ValueError(f"{len(starts)} starts for a cache of {self.rows} rows")
        if max(starts) + width > self.max_length:
            raise RuntimeError(f"KV cache overflow: {max(starts) + width} > {self.max_length}")
        self.starts, self.width = list(starts), width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write [B, heads, W, dim] keys/values at each row's slots; return every row's slots up to
        the furthest one written (the mask hides what a row must not see)."""
        keys = self._keys[layer_idx]
        if keys is None:
            shape = (self.rows, key_states.shape[1], self.max_length, key_states.shape[-1])
            # zeros, not empty memory: a row's slots past its length are masked, but a NaN there
            # would still poison its attention (masked scores are added to, not replaced)
            keys = self._keys[layer_idx] = key_states.new_zeros(shape)
            vshape = (self.rows, value_states.shape[1], self.max_length, value_states.shape[-1])
            self._values[layer_idx] = value_states.new_zeros(vshape)
        values = self._values[layer_idx]
        width = key_states.shape[-2]
        if len(set(self.starts)) == 1:
            s = self.starts[0]
            keys[:, :, s : s + width] = key_states
            values[:, :, s : s + width] = value_states
        else:
            for b, s in enumerate(self.starts):
                keys[b, :, s : s + width] = key_states[b]
                values[b, :, s : s + width] = value_states[b]
        end = max(self.starts) + width
        return keys[:, :, :end], values[:, :, :end]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the current rows, in order): finished rows leave."""
        index = None
        for i, keys in enumerate(self._keys):
            if keys is None:
                continue
            if index is None:
                index = torch.tensor(list(rows), dtype=torch.long, device=keys.device)
            self._keys[i] = keys.index_select(0, index)
            self._values[i] = self._values[i].index_select(0, index)
        self.rows = len(rows)
        self.starts = [self.starts[r] for r in rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.starts) if self.starts else 0


class BatchRow(DraftChain):
    """One row of a batch: its committed tokens, the round's drafts and how much of it is cached
    (what the drafters read, as they read a DecodeState)."""

    def __init__(self, lm, index: int, prompt_ids: list[int], sampler: Sampler | None, logits_processor) -> None:
        if not prompt_ids:
            raise ValueError(f"row {index}: the prompt needs at least one token")
        self.lm = lm
        self.index = index  # the row's place in the caller's batch
        self.prompt = list(prompt_ids)
        self.tokens = list(prompt_ids)
        self.sampler = sampler
        self.logits_processor = logits_processor
        self.cached = 0  # positions in the cache; tokens[cached:] are pending (the prompt, then one)
        self.redo = False  # the last pass's decision rested on non-finite values: next pass without drafts
        self.verified_state: torch.Tensor | None = None  # [1, 1, H], as DecodeState keeps it
        self.head_drafts: HeadDrafts | None = None  # this round's next-token head drafts, shared by its rows
        self._clear_drafts()
        # what the row's result reports
        self.out: list[int] = []
        self.accept_lengths: list[int] = []
        self.exit_layers: list[int] = []
        self.drafted_sources: list[str] = []
        self.accepted_sources: list[str] = []
        self.drafted = self.accepted = self.fallbacks = 0
        self.finished_s: float | None = None

    def block(self) -> list[int]:
        """The pending positions of this round: uncached committed tokens, then the drafts."""
        return self.tokens[self.cached :] + self.drafts

    def next_token_draft(self) -> int | None:
        if self.verified_state is None or self.drafts:
            return None
        if self.head_drafts is not None:
            return self.head_drafts.draft(self)
        return self.lm.next_token_draft(self.verified_state, self.lm.embed([self.tokens[-1]]))


    def result(self, started: float) -> GenerationResult:
        return GenerationResult(
            prompt_ids=tuple(self.prompt),
            token_ids=tuple(self.out),
            accept_lengths=tuple(self.accept_lengths),
            exit_layers=tuple(self.exit_layers),
            drafted=self.drafted,
            accepted=self.accepted,
            fallbacks=self.fallbacks,
            wall_time_s=(self.finished_s or time.perf_counter()) - started,  # this row's latency
            drafted_sources=tuple(self.drafted_sources),
            accepted_sources=tuple(self.accepted_sources),
        )


class HeadDrafts:
    """The fitted next-token head's drafts of one round, for every row at once: computed when the
    first row asks (a row asks only where prompt lookup proposed nothing), in one product over
    the head's weights for all the round's rows instead of one product a row (the head reads
    its weights whatever the row count: 19 MB for SmolLM2's 4,096-token short-list)."""

    def __init__(self, lm, rows: list["BatchRow"]) -> None:
        self.lm, self.rows = lm, rows
        self.drafts: dict[int, int] | None = None

    def draft(self, row: "BatchRow") -> int | None:
        if self.drafts is None:
            ready = [r for r in self.rows if r.verified_state is not None]
            states = torch.cat([r.verified_state.reshape(1, -1) for r in ready])
            embedded = self.lm.embed([r.tokens[-1] for r in ready])[0]
            self.drafts = dict(zip((r.index for r in ready), self.lm.next_token_drafts(states, embedded)))
        return self.drafts.get(row.index)


@dataclass(frozen=True)
class BatchResult:
    """A batch's run: each row's result (in the caller's order; a row's wall time is its latency,
    from the start of the batch to its last token) and the shared passes."""

    rows: tuple[GenerationResult, ...]
    wall_time_s: float
    pass_rows: tuple[int, ...]  # active rows in each pass (after the prefill)
    pass_widths: tuple[int, ...]  # positions per row in each pass (the longest row's block)
    pass_seconds: tuple[float, ...]  # (a batch of one: its timed passes only, see GenerationResult)

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.rows)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def verify_passes(self) -> int:
        """Shared passes after the prefill."""
        return len(self.pass_rows)

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rows)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rows)


def row_processors(logits_processor, row: int, prompt_length: int):
    """The batch's processors as they apply to row `row` decoded alone: a processor that takes a
    row index (prefix_allowed_tokens_fn) gets the row's own index in the batch, one that counts
    new tokens from the prompt's end counts from this row's prompt, and one that skips the
    batch's padding (the repetition penalty) skips none: a row is decoded without its padding."""
    if not isinstance(logits_processor, list):  # a LogitsProcessorList, or one callable used as it is
        return logits_processor
    out = []
    for processor in logits_processor:
        name = type(processor).__name__
        if name == "PrefixConstrainedLogitsProcessor":
            processor = copy.copy(processor)
            fn = processor._prefix_allowed_tokens_fn
            processor._prefix_allowed_tokens_fn = lambda _batch_id, sent, fn=fn, row=row: fn(row, sent)
        elif name == "MinNewTokensLengthLogitsProcessor":
            processor = copy.copy(processor)
            processor.prompt_length_to_skip = prompt_length
        elif name == "RepetitionPenaltyLogitsProcessor" and isinstance(getattr(processor, "prompt_ignore_length", None), torch.Tensor):
            processor = copy.copy(processor)  # the batch's padding lengths; a row alone has none
            processor.prompt_ignore_length = None
        out.append(processor)
    return type(logits_processor)(out)


def generate_batch(
    lm,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    make_drafter: Callable[[], object],
    eos_token_ids=(),
    *,
    logits_processor: LogitsProcessor | None = None,
    stopping_criteria: StoppingCriteria | None = None,
    sampler: Sampler | None = None,
    prices: PassPrices | None = None,
    adaptive: bool = True,
) -> BatchResult:
    """Speculative decoding of several prompts in shared passes. make_drafter(): a fresh drafter
    per row (a drafters.Speculator without a layer source, or engine.NoDrafter); its width bound
    is the round's per-row bound. Each row gets up to max_new_tokens, stops on its own EOS or
    stopping criteria, and is answered as if decoded alone (see the module's docstring). prices:
    the artifact's pass prices; with them each round's width is chosen (`round_width`) from the
    drafts the rows proposed and the acceptance rate so far. adaptive=False drafts every round
    (no RoundClock): for tests that need drafts whatever they cost."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = frozenset(eos_token_ids)
    started = time.perf_counter()
    pass_rows: list[int] = []
    pass_widths: list[int] = []
    pass_seconds: list[float] = []
    with torch.inference_mode():
        rows = [
            BatchRow(lm, i, list(p), sampler, row_processors(logits_processor, i, len(p))) for i, p in enumerate(prompts)
        ]
        drafters = [make_drafter() for _ in rows]
        if lm.kernels is not None:
            lm.kernels.refresh()  # once per generation: weights edited or hooked since load?
        width_bound = max((getattr(d, "w_max", 0) for d in drafters), default=0)
        longest = max(len(p) for p in prompts)
        cache = BatchKVCache(lm.num_layers, len(rows), longest + max_new_tokens + width_bound + 1)
        active = list(range(len(rows)))
        first = True
        clock = RoundClock()
        packs = bool(getattr(lm, "packs_batches", False))  # a pass costs by its real positions
        while active:
            round_started = time.perf_counter()
            drafting = False
            if not first and (not adaptive or clock.drafts_next()):
                if lm.has_next_token_head:
                    shared = HeadDrafts(lm, [rows[i] for i in active if not rows[i].redo])
                    for i in active:
                        rows[i].head_drafts = shared
                for i in active:
                    budget = max_new_tokens - len(rows[i].out) - 1
                    if budget > 0 and not rows[i].redo:
                        drafters[i].draft(rows[i], budget)
                lengths = [len(rows[i].drafts) for i in active]
                drafting = any(lengths)
                if drafting:
                    rate = (sum(r.accepted for r in rows) + 1) / (sum(r.drafted for r in rows) + 2)
                    keep = round_width(lengths, rate, prices, packs) - 1
                    for i, n in zip(active, lengths):
                        if n > keep:
                            rows[i].keep_drafts(keep)
                            if hasattr(drafters[i], "trim"):
                                drafters[i].trim(keep)
            blocks = [rows[i].block() for i in active]
            width = max(len(b) for b in blocks)
            ids = to_device([b + [b[-1]] * (width - len(b)) for b in blocks], lm.device)
            pass_started = time.perf_counter()
            final = lm.batch_pass(lm.embed_rows(ids), [rows[i].cached for i in active], cache, [len(b) for b in blocks])
            # the head only over the positions verification reads: each row's last k + 1
            spans = [(n, len(rows[i].drafts) + 1, len(b)) for n, (i, b) in enumerate(zip(active, blocks))]
            picked = torch.cat([final[n, size - k : size] for n, k, size in spans])
            logits = lm.rows_logits(picked)
            finite = torch.isfinite(logits).all(-1)
            offset = 0
            done = []
            round_tokens = 0
            for (n, k, size), i in zip(spans, active):
                row = rows[i]
                row.redo = False
                acceptance = verify(row, logits[offset : offset + k], finite[offset : offset + k])
                offset += k
                if not acceptance.trusted:
                    # Never trust a token chosen from non-finite values: this row redoes the
                    # step without drafts in the next pass (its cached length does not move).
                    row.fallbacks += 1
                    row.redo = True
                    row._clear_drafts()
                    drafters[i].observe(acceptance)
                    continue
                row.exit_layers.extend(row.draft_exit_layers)
                row.drafted_sources.extend(row.draft_sources)
                row.accepted_sources.extend(row.draft_sources[: acceptance.accepted_length])
                row.drafted += len(row.drafts)
                row.accepted += acceptance.accepted_length
                drafters[i].observe(acceptance)
                kept = row.drafts[: acceptance.accepted_length]
                row.verified_state = final[n, size - k + acceptance.accepted_length].view(1, 1, -1).clone()
                row.cached = len(row.tokens) + acceptance.accepted_length
                row.tokens.extend(kept + [acceptance.next_token])
                row._clear_drafts()
                new, stop = emitted(
                    kept + [acceptance.next_token], row.prompt + row.out, max_new_tokens - len(row.out), eos, stopping_criteria, lm.device
                )
                row.out.extend(new)
                row.accept_lengths.append(len(new))
                round_tokens += len(new)
                if stop:
                    row.finished_s = time.perf_counter()
                    done.append(i)
            if not first:
                pass_rows.append(len(active))
                pass_widths.append(width)
                pass_seconds.append(time.perf_counter() - pass_started)
                clock.record(drafting, time.perf_counter() - round_started, round_tokens)
            first = False
            if done:
                keep = [n for n, i in enumerate(active) if i not in done]
                active = [active[n] for n in keep]
                if active:
                    cache.keep(keep)
    return BatchResult(
        rows=tuple(r.result(started) for r in rows),
        wall_time_s=time.perf_counter() - started,
        pass_rows=tuple(pass_rows),
        pass_widths=tuple(pass_widths),
        pass_seconds=tuple(pass_seconds),
    )

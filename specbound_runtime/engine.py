"""The decode loop: draft, verify in one parallel pass, keep what verification accepts.

One loop for both decoding modes. Greedy: drafts are argmaxes and verification keeps the longest
prefix the full model's argmax agrees with (`acceptance.accept`). Sampling: drafts are drawn from
the drafter's distribution q and verification is speculative sampling (`acceptance.speculative_accept`),
whose output is distributed exactly as sampling from the full model token by token.

A `DecodeState` holds one generation's state. Positions not yet run through every layer are
"pending"; each keeps its hidden state at its current depth (the hidden-state cache). Depth never
increases along the pending positions, so at any layer the positions still to run form one
contiguous block, and each layer's KV cache is a prefix of the sequence.

Drafting is drafters.py's: its sources propose, and the state pushes their drafts. Every draft
carries its source: "lookup" (prompt lookup), "head" (the fitted next-token head) or
"early-exit". The first two cost no layers. After each verification the state keeps the final
hidden state of the row that predicted the emitted token, which the next-token head reads at the
start of the next round; nothing is run again for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

from .acceptance import Acceptance, accept, speculative_accept
from .adapter import LayerModel
from .host import read, to_device
from .sampling import Sampler, exact_dtype, probabilities


class DraftChain:
    """A round's drafts on one sequence, as verification needs them: the tokens, where each came
    from (source and exit layer) and, under sampling, q of each. `DecodeState` (one sequence,
    layered cache) and batch.py's rows (one row of a shared pass) keep their drafts in one."""

    tokens: list[int]  # committed tokens (prompt and accepted output)
    sampler: Sampler | None
    logits_processor: "LogitsProcessor | None"
    lm: LayerModel

    def _clear_drafts(self) -> None:
        self.drafts: list[int] = []
        self.draft_exit_layers: list[int] = []
        self.draft_sources: list[str] = []  # which drafter proposed each draft ("lookup", "head", "early-exit", ...)
        self.draft_probs: list[torch.Tensor | None] = []  # under sampling: q of each draft, None = one-hot

    def extend(self, proposal, eos_token_ids: frozenset[int] = frozenset()) -> tuple[int, bool]:
        """Push a proposal's drafts (a drafters.Proposal), stopping after an end-of-sequence token:
        (how many were pushed, whether one was). Only chains are verified: a proposal whose
        parents branch is refused."""
        if not proposal.is_chain:
            raise ValueError(
                f"{proposal.source} proposed a tree (parents {list(proposal.parents)}); verification takes chains only"
            )
        for i, token in enumerate(proposal.tokens):
            q = proposal.q[i] if proposal.q else None
            self.push_draft(token, proposal.depths[i], q, proposal.source)
            if token in eos_token_ids:
                return i + 1, True
        return len(proposal.tokens), False

    def push_draft(
        self, token: int, exit_layer: int, probs: torch.Tensor | None = None, source: str | None = None
    ) -> None:
        """Add a draft. probs: under sampling, the distribution over the vocabulary ([V]) the
        token was drawn from; None for a deterministic proposal (q is one-hot). source: the name of
        what proposed it, reported per token in the result; None: "lookup" at exit layer 0 (a
        draft that cost no layers), "early-exit" at any other layer."""
        self.drafts.append(token)
        self.draft_exit_layers.append(exit_layer)
        self.draft_sources.append(source if source is not None else ("lookup" if exit_layer == 0 else "early-exit"))
        self.draft_probs.append(probs)

    def keep_drafts(self, n: int) -> None:
        """Keep only the first n drafts (a chain's prefix is a chain)."""
        for chain in (self.drafts, self.draft_exit_layers, self.draft_sources, self.draft_probs):
            del chain[n:]

    def prefix_ids(self) -> torch.Tensor:
        """[1, n]: the committed tokens and the drafts so far (what a processor sees next)."""
        return to_device([self.tokens + self.drafts], self.lm.device)

    def draft_matrix(self) -> torch.Tensor:
        """q of every draft as rows [k, V] (one-hot rows for deterministic proposals)."""
        V = self.lm.vocab_size
        out = torch.zeros(len(self.drafts), V, dtype=exact_dtype(self.lm.device), device=self.lm.device)
        for i, (token, q) in enumerate(zip(self.drafts, self.draft_probs)):
            if q is None:
                out[i, token] = 1.0
            else:
                out[i] = q
        return out


class DecodeState(DraftChain):
    """One generation: committed tokens, the layered KV cache and the pending positions."""

    def __init__(
        self,
        lm: LayerModel,
        prompt_ids: list[int],
        max_length: int,
        sampler: Sampler | None = None,
        logits_processor: "LogitsProcessor | None" = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the prompt needs at least one token")
        self.lm = lm
        self.sampler = sampler  # None: greedy decoding
        self.logits_processor = logits_processor  # what generate() applies to every position
        self.tokens = list(prompt_ids)  # committed tokens (prompt and accepted output)
        self.cache = lm.new_cache(max_length)
        self.pending_start = 0  # position of the first pending token
        self.pending_hidden = lm.embed(list(prompt_ids))
        self.pending_depth = [0] * len(prompt_ids)
        self._clear_drafts()
        # [1, 1, H]: the final state (before the final norm) of the row that predicted the last
        # committed token, kept from its verification pass; None before the first one
        self.verified_state: torch.Tensor | None = None

    @property
    def frontier_depth(self) -> int:
        return self.pending_depth[-1]

    def advance_to(self, depth: int) -> None:
        """Run every pending position up to `depth` layers, each from where it stands."""
        depths = self.pending_depth
        while depths[-1] < depth:
            layer = depths[-1]
            first = len(depths) - 1
            while first > 0 and depths[first - 1] == layer:
                first -= 1
            block = self.pending_hidden[:, first:]
            out = self.lm.run_layer(layer, block, self.pending_start + first, self.cache)
            self.pending_hidden[:, first:] = out
            for i in range(first, len(depths)):
                depths[i] = layer + 1

    def frontier_hidden(self) -> torch.Tensor:
        return self.pending_hidden[:, -1:]

    def exit_logits(self, layer: int) -> torch.Tensor:
        """The frontier's exit-head logits at `layer` ([V']), running pending positions up to it."""
        self.advance_to(layer)
        return self.lm.exit_logits(self.frontier_hidden(), layer)[-1]

    def push_draft(
        self, token: int, exit_layer: int, probs: torch.Tensor | None = None, source: str | None = None
    ) -> None:
        """DraftChain.push_draft, and the draft's embedding as a pending position at depth 0."""
        super().push_draft(token, exit_layer, probs, source)
        hidden = self.lm.embed([token])
        self.pending_hidden = torch.cat([self.pending_hidden, hidden], dim=1)
        self.pending_depth.append(0)

    def discard_drafts(self) -> None:
        """Drop every draft and every layer's work on pending positions; start them from depth 0."""
        self.cache.truncate(self.pending_start)
        self._clear_drafts()
        ids = self.tokens[self.pending_start :]
        self.pending_hidden = self.lm.embed(ids)
        self.pending_depth = [0] * len(ids)

    def verify_logits(self) -> torch.Tensor:
        """Finish every pending position in one pass; the full model's logits for the draft slots."""
        self.advance_to(self.lm.num_layers)
        k = len(self.drafts)
        return self.lm.final_logits(self.pending_hidden[:, -(k + 1) :])

    def commit(self, acceptance: Acceptance) -> list[int]:
        """Keep the accepted drafts and the full model's token; roll the rest back everywhere."""
        new = self.drafts[: acceptance.accepted_length] + [acceptance.next_token]
        last_kept = self.pending_start + (len(self.pending_depth) - len(self.drafts) - 1) + acceptance.accepted_length
        row = last_kept - self.pending_start  # the pending row that predicted next_token (at full depth: verified)
        self.verified_state = self.pending_hidden[:, row : row + 1].clone()
        self.cache.truncate(last_kept + 1)
        self.tokens.extend(new)
        self.pending_start = last_kept + 1
        self.pending_hidden = self.lm.embed([acceptance.next_token])
        self.pending_depth = [0]
        self._clear_drafts()
        return new

    def next_token_draft(self) -> int | None:
        """The fitted next-token head's draft at the start of a round: from the kept final state
        and the embedding of the token it predicted (the frontier, still at depth 0); None when
        there is no kept state (before the first verification) or drafting has begun."""
        if self.verified_state is None or self.drafts:
            return None
        return self.lm.next_token_draft(self.verified_state, self.pending_hidden)


class Drafter(Protocol):
    """Proposes draft tokens onto a sequence, and learns from what was accepted (a
    drafters.Speculator composes the policy's sources; NoDrafter drafts nothing)."""

    def draft(self, seq: DecodeState, budget: int) -> None: ...

    def observe(self, acceptance: Acceptance) -> None: ...


class NoDrafter:
    """Plain autoregressive decoding through the same engine: the fair baseline."""

    def draft(self, seq: DecodeState, budget: int) -> None:
        return None

    def observe(self, acceptance: Acceptance) -> None:
        return None


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # generated tokens only
    accept_lengths: tuple[int, ...]  # tokens emitted per verification pass (the full model's own counts); sums to new_tokens
    exit_layers: tuple[int, ...]  # exit layer of every drafted token
    drafted: int
    accepted: int
    fallbacks: int  # passes redone at full depth because of non-finite values
    wall_time_s: float
    drafted_sources: tuple[str, ...] = ()  # what proposed each drafted token (push_draft's source)
    accepted_sources: tuple[str, ...] = ()  # the same for each accepted draft, in order (len == accepted)
    # the verification passes after the prefill that ran every layer over every position (no
    # early-exit work before them): how many positions each ran and how long it took
    # (guard.PassCostWatch compares them with the artifact's prices)
    pass_widths: tuple[int, ...] = ()
    pass_seconds: tuple[float, ...] = ()

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def verify_passes(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accepted_length(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


# (input_ids [1, n], scores [1, V]) -> scores [1, V]: transformers' LogitsProcessorList fits.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (input_ids [1, n], scores) -> bool tensor [1]: transformers' StoppingCriteriaList fits.
StoppingCriteria = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def target_scores(
    logits: torch.Tensor, tokens: list[int], drafts: list[int], logits_processor: LogitsProcessor | None
) -> torch.Tensor:
    """The scores greedy decoding takes its argmax over, one row per draft slot (and one after).

    As `generate()` does: the logits in float32, then the logits processors, row i seeing its own
    prefix (tokens + drafts[:i]), so a repetition penalty or a length rule applies to each
    verified position exactly as it would have one token at a time."""
    scores = logits.float()
    if logits_processor is None:
        return scores
    prefix = to_device([tokens + drafts], scores.device)
    n = len(tokens)
    rows = [logits_processor(prefix[:, : n + i], scores[i : i + 1].clone()) for i in range(scores.shape[0])]
    return torch.cat(rows, dim=0)


def verify(seq: DecodeState, logits: torch.Tensor, finite_rows: torch.Tensor | None = None) -> Acceptance:
    """The acceptance step of the decoding mode: greedy `accept`, or `speculative_accept` with p
    the full model's processed distributions, q the drafts' own, and fresh uniform numbers."""
    scores = target_scores(logits, seq.tokens, seq.drafts, seq.logits_processor)
    if seq.sampler is None:
        return accept(torch.tensor(seq.drafts, dtype=torch.long), scores, finite_rows)
    k = len(seq.drafts)
    drafts = to_device(seq.drafts, scores.device)
    return speculative_accept(drafts, seq.draft_matrix(), probabilities(scores), seq.sampler.uniforms(k + 1), finite_rows)


def first_stop(stopping_criteria, sequence: list[int], new: int, device) -> int | None:
    """Index among the last `new` tokens of the first one after which the stopping criteria fire,
    as generate() checks them after every token; all prefixes in one host read."""
    ids = to_device([sequence], device)
    start = len(sequence) - new
    fired = torch.cat([stopping_criteria(ids[:, : start + i + 1], None).reshape(-1)[:1] for i in range(new)])
    hits = [i for i, f in enumerate(read(fired)) if f]
    return hits[0] if hits else None


def emitted(verified: list[int], sequence: list[int], room: int, eos: frozenset[int], stopping_criteria, device) -> tuple[list[int], bool]:
    """What a verification pass emits of its verified tokens, after `sequence` (prompt and output
    so far), with `room` new tokens left, as generate() would stop token by token: at the limit,
    after an end-of-sequence token, or after the first token on which the stopping criteria
    fire. Returns (the tokens, whether generation stops)."""
    new = verified[:room]
    stop = len(new) >= room
    for i, token in enumerate(new):
        if token in eos:
            new, stop = new[: i + 1], True
            break
    if stopping_criteria is not None and new:
        fired = first_stop(stopping_criteria, sequence + new, len(new), device)
        if fired is not None:
            new, stop = new[: fired + 1], True
    return new, stop


def generate(
    lm: LayerModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    drafter: Drafter,
    eos_token_ids: Iterable[int] = (),
    on_tokens: Callable[[list[int]], None] | None = None,
    *,
    logits_processor: LogitsProcessor | None = None,
    stopping_criteria: StoppingCriteria | None = None,
    sampler: Sampler | None = None,
) -> GenerationResult:
    """Decoding with speculation. Greedy (sampler None): token-identical to plain greedy
    decoding. Sampling (a Sampler, holding the run's generator): distributed exactly as
    `generate(do_sample=True)` with the same processors and warpers.

    logits_processor and stopping_criteria are what `generate()` prepares from a generation
    config (under sampling, with its warpers); each is applied position by position, as in
    transformers' own decoding loop."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = frozenset(eos_token_ids)
    started = time.perf_counter()
    out: list[int] = []
    accept_lengths: list[int] = []
    exit_layers: list[int] = []
    drafted_sources: list[str] = []
    accepted_sources: list[str] = []
    drafted = accepted = fallbacks = 0
    pass_widths: list[int] = []
    pass_seconds: list[float] = []
    with torch.inference_mode():
        seq = DecodeState(lm, prompt_ids, len(prompt_ids) + max_new_tokens, sampler, logits_processor)
        first = True
        while True:
            if not first:
                budget = max_new_tokens - len(out) - 1
                if budget > 0:
                    drafter.draft(seq, budget)
            timed = not first and not any(seq.pending_depth)  # the pass runs every layer over every position
            first = False
            pass_started = time.perf_counter()
            logits = seq.verify_logits()
            acceptance = verify(seq, logits, torch.isfinite(logits).all(-1))  # reads the host: the pass is done
            if timed and acceptance.trusted:
                pass_widths.append(len(seq.drafts) + 1)
                pass_seconds.append(time.perf_counter() - pass_started)
            if not acceptance.trusted:
                # Never trust a token chosen from non-finite values: redo this step at full depth.
                fallbacks += 1
                seq.discard_drafts()
                acceptance = verify(seq, seq.verify_logits())
            exit_layers.extend(seq.draft_exit_layers)
            drafted_sources.extend(seq.draft_sources)
            accepted_sources.extend(seq.draft_sources[: acceptance.accepted_length])
            drafted += len(seq.drafts)
            accepted += acceptance.accepted_length
            drafter.observe(acceptance)
            new, stop = emitted(seq.commit(acceptance), list(prompt_ids) + out, max_new_tokens - len(out), eos, stopping_criteria, lm.device)
            out.extend(new)
            accept_lengths.append(len(new))  # what this pass emitted, after any stop
            if on_tokens is not None and new:
                on_tokens(new)
            if stop or len(out) >= max_new_tokens:
                break
    return GenerationResult(
        prompt_ids=tuple(prompt_ids),
        token_ids=tuple(out),
        accept_lengths=tuple(accept_lengths),
        exit_layers=tuple(exit_layers),
        drafted=drafted,
        accepted=accepted,
        fallbacks=fallbacks,
        wall_time_s=time.perf_counter() - started,
        drafted_sources=tuple(drafted_sources),
        accepted_sources=tuple(accepted_sources),
        pass_widths=tuple(pass_widths),
        pass_seconds=tuple(pass_seconds),
    )

"""Collect: run the model over a corpus and record, per position and candidate layer, what fitting
and simulation need, shard by shard (the pipeline writes each shard once, whichever worker makes
it; an interrupted run resumes where it stopped).

What a record keeps, per position and candidate exit layer, for two draft heads (the plain
short-list head, and the short-list head after the fitted ridge lens):
  - right: whether the head's short-list argmax equals the full model's argmax (the final token);
  - conf: max softmax(z / T) at each temperature of fit.TEMPERATURE_GRID, computed exactly and
    kept to calibrate.precision.STAT_BITS significant bits;
  - accept (calibrating for a sampling mode only): the probability that speculative sampling
    accepts the head's draft, sum_x min(p(x), q(x)) = 1 - TV(p, q), with p the full model's
    distribution and q the head's (over its short-list), both after the mode's warpers.
And per position, for the fitted next-token head (specbound_runtime/exit_head.py): whether its
draft for the position's next token, read from the previous position's final state and this
position's token embedding, is right (greedy) and, under sampling, its acceptance probability
p(draft) (a one-hot proposal). Plus the sequence id, held-out flag, whether the text is the model's own greedy output, and the
final token. What it loses: the logits themselves (30 layers x 49,152 floats a token), so a new
head or a temperature outside the grid's range needs a new collection.

Three disjoint splits, by sha256 of the sequence id: the held-out split (evaluation only); of
the rest, half fits the lens and the short-list ("lens" split) and half fits temperatures and
tunes the policy ("calibration" split). Fitting a temperature on the data its lens was fitted to
makes it overconfident: the lens looks better there than anywhere else.

Two passes: pass A accumulates, over the lens split only, the moments of the ridge lens
([x 1]^T [x 1] and [x 1]^T y, exact int64 sums of rounded states: calibrate.precision) and the
counts of the final tokens (for the short-list), and the moments of the next-token head's ridge
map, over every position of those sequences, prompts included; pass B records the calibration and
held-out splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.exit_head import ExitHeadWeights, FittedExitHead
from specbound_runtime.policy import lookup_sizes

from .fit import TEMPERATURE_GRID, ridge_lens
from .precision import compute_dtype, exact_moments, moments_as_float, round_bits

HEADS = ("plain", "lens")
# what a work folder's pass-A and pass-B shards hold; part of its key, so a folder from another
# format is never mixed in. 2: the next-token head's moments and per-position drafts.
RECORDS_FORMAT = 2


@dataclass(frozen=True)
class RecordedSequence:
    id: str
    held_out: bool
    own: bool  # the model's own greedy answer (its decode trajectory), else human text
    ids: tuple[int, ...]
    record_from: int  # first position recorded (own answers: the last prompt token)

    @property
    def lens_split(self) -> bool:
        """Fits the lens and short-list (half of the non-held-out sequences, by hashed id)."""
        digest = hashlib.sha256(f"lens-split:{self.id}".encode()).digest()
        return not self.held_out and digest[0] < 128

    @property
    def recorded(self) -> int:
        return len(self.ids) - self.record_from


@dataclass(frozen=True)
class CollectSettings:
    candidate_layers: tuple[int, ...]
    shortlist_size: int
    ridge_lambda: float = 1.0
    # the next-token head's ridge strength, relative to the mean power of its input features
    head_lambda: float = 1e-4


def fingerprint_sequences(sequences: list[RecordedSequence]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(f"{s.id}|{int(s.held_out)}|{int(s.own)}|{s.record_from}|".encode())
        h.update(np.asarray(s.ids, dtype=np.int64).tobytes())
    return h.hexdigest()


# -- pass A: lens moments and short-list counts (summed over shards by the pipeline) -----------


@dataclass(frozen=True)
class Moments:
    """Pass A's sums, all exact int64 (calibrate.precision), so any order or sharding of the
    sequences gives the same bits: the lens moments per candidate layer (gram [C, H+1, H+1],
    cross [C, H+1, H]), the final tokens' counts [V], and the next-token head's moments
    (head_gram [2H+1, 2H+1], head_cross [2H+1, H])."""

    gram: np.ndarray
    cross: np.ndarray
    counts: np.ndarray
    head_gram: np.ndarray
    head_cross: np.ndarray

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def to_npz(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def embedding_scale(lm: HFCausalLM) -> float:
    """The power of two that brings the input embeddings to unit RMS (over the whole vocabulary),
    so that their rounding to multiples of 2^-STATE_BITS in the exact moments keeps ~10 bits. A
    property of the weights alone: every shard and worker uses the same one. The fitted map is
    scaled back exactly (a power of two)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, lm.vocab_size, 4096):
            e = lm.embed(torch.arange(start, min(lm.vocab_size, start + 4096)))[0].double()
            total += float((e * e).sum())
            count += e.numel()
    rms = (total / count) ** 0.5 if count else 1.0
    return float(2.0 ** round(-np.log2(rms))) if rms > 0 else 1.0


def head_inputs(lm: HFCausalLM, ids, final_states: torch.Tensor, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The next-token head's regression over one sequence, positions 1..n-1: inputs
    [norm(h_{p-1}); scale * e(x_p)] ([n-1, 2H]) and targets norm(h_p) ([n-1, H]), float64."""
    normed = lm.normed(final_states).double()
    emb = lm.embed(list(ids))[0].double() * scale
    return torch.cat([normed[:-1], emb[1:]], dim=-1).numpy(), normed[1:].numpy()


def lens_moments(lm: HFCausalLM, seq: RecordedSequence, layers, scale: float = 1.0) -> Moments:
    """One lens-split sequence's exact moments per candidate layer ([x 1]^T [x 1] and [x 1]^T y
    of the normalised layer state x and final state y, in calibrate.precision's int64 units), the
    counts of its final tokens, and the next-token head's moments over all its positions (the
    prompt's too: they are text the model reads); `scale`: embedding_scale."""
    with torch.inference_mode():
        states, logits = lm.layer_states(list(seq.ids))
        rows = slice(seq.record_from, len(seq.ids))
        counts = np.bincount(logits[rows].argmax(-1).numpy(), minlength=lm.vocab_size).astype(np.int64)
        y = lm.normed(states[-1][rows]).double().numpy()
        moments = [exact_moments(lm.normed(states[layer - 1][rows]).double().numpy(), y) for layer in layers]
        head_gram, head_cross = exact_moments(*head_inputs(lm, seq.ids, states[-1], scale))
    return Moments(np.stack([g for g, _ in moments]), np.stack([c for _, c in moments]), counts, head_gram, head_cross)


def fit_next_head(head_gram: np.ndarray, head_cross: np.ndarray, scale: float, relative_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token head's ridge map from its exact moments: W [2H, H] (the embedding rows
    scaled back by `scale`) and b [H], STAT_BITS significant bits. The ridge strength is
    relative_lambda times the mean power of the input features (the trace of their moments over
    their count), so it does not depend on how many positions were summed."""
    from threadpoolctl import threadpool_limits

    gram, cross = moments_as_float(head_gram), moments_as_float(head_cross)
    features = gram.shape[0] - 1
    lam = relative_lambda * float(np.trace(gram[:features, :features])) / features
    with threadpool_limits(1):
        w, b = ridge_lens(gram, cross, lam)
    w = w.copy()
    w[features // 2 :] *= scale  # the map reads e(x), fitted on scale * e(x): exact, a power of two
    return torch.from_numpy(round_bits(w)).float(), torch.from_numpy(round_bits(b)).float()


def fit_exit_head(lm: HFCausalLM, moments: Moments, settings: CollectSettings, eos_ids, scale: float = 1.0) -> ExitHeadWeights:
    """The ridge lens per candidate layer, the short-list (the most frequent final tokens) and the
    next-token head.

    The moments are exact int64 (lens_moments, summed); the solves run on one BLAS thread and the
    weights keep STAT_BITS significant bits, so they do not depend on threads."""
    from threadpoolctl import threadpool_limits

    gram, cross, counts = moments.gram, moments.cross, moments.counts
    lens = {}
    for c, layer in enumerate(settings.candidate_layers):
        with threadpool_limits(1):
            w, b = ridge_lens(moments_as_float(gram[c]), moments_as_float(cross[c]), settings.ridge_lambda)
        lens[layer] = (torch.from_numpy(round_bits(w)).float(), torch.from_numpy(round_bits(b)).float())
    size = min(settings.shortlist_size, lm.vocab_size)
    # most frequent first; ties by token id, so the choice is deterministic
    order = np.lexsort((np.arange(len(counts)), -counts))
    chosen = set(int(t) for t in order[:size])
    chosen.update(int(e) for e in eos_ids if 0 <= int(e) < lm.vocab_size)
    shortlist = torch.tensor(sorted(chosen), dtype=torch.int64)
    next_head = fit_next_head(moments.head_gram, moments.head_cross, scale, settings.head_lambda)
    return ExitHeadWeights(shortlist=shortlist, lens=lens, next_head=next_head)


def shortlist_coverage(counts: np.ndarray, shortlist: torch.Tensor) -> float:
    total = counts.sum()
    return float(counts[shortlist.numpy()].sum() / total) if total else 0.0


# -- pass B: records ------------------------------------------------------------------------------


def _confidences(z: torch.Tensor) -> torch.Tensor:
    """max softmax(z / T) for every T of the grid: [k, S] -> [k, G]."""
    z = z.to(compute_dtype(z.dtype))
    top = z.max(dim=-1, keepdim=True).values
    out = []
    for t in TEMPERATURE_GRID:
        out.append(torch.exp(-torch.logsumexp((z - top) / float(t), dim=-1)))
    return torch.stack(out, dim=-1)


def _warped_probs(scores: torch.Tensor, warpers) -> torch.Tensor:
    """softmax after value-only warpers, rows at once ([k, n] -> [k, n], float64). Value-only
    warpers ignore input_ids (sampling.VALUE_ONLY_WARPERS), so none are passed."""
    scores = scores.to(compute_dtype(scores.dtype))
    if warpers:
        scores = warpers(torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device), scores.clone())
    return torch.softmax(scores.double(), dim=-1)


@torch.inference_mode()
def record_sequence(lm: HFCausalLM, heads: dict[str, FittedExitHead], seq: RecordedSequence, layers, warpers=None) -> dict[str, np.ndarray]:
    states, logits = lm.layer_states(list(seq.ids))
    rows = slice(seq.record_from, len(seq.ids))
    final = logits[rows].argmax(-1)
    k = final.shape[0]
    right = np.zeros((k, len(HEADS), len(layers)), dtype=bool)
    conf = np.zeros((k, len(HEADS), len(layers), len(TEMPERATURE_GRID)), dtype=np.float32)
    accept = np.zeros((k, len(HEADS), len(layers)), dtype=np.float32) if warpers is not None else None
    p = _warped_probs(logits[rows], warpers) if warpers is not None else None
    for c, layer in enumerate(layers):
        normed = lm.normed(states[layer - 1][rows])
        for h, name in enumerate(HEADS):
            head = heads[name]
            z = head.logits(normed, layer)
            draft = head.token_ids[z.argmax(-1)]
            right[:, h, c] = (draft == final).numpy()
            conf[:, h, c] = round_bits(_confidences(z).float().numpy())
            if p is not None:  # q lives on the short-list; p's mass elsewhere is never drafted
                q = _warped_probs(z, warpers)
                overlap = torch.minimum(p[:, head.token_ids], q).sum(-1).clamp(0.0, 1.0)
                accept[:, h, c] = round_bits(overlap.float().numpy())
    out = {"final": final.numpy().astype(np.int32), "right": right, "conf": conf}
    if accept is not None:
        out["accept"] = accept
    next_head = next((h for h in heads.values() if h.has_next_head), None)
    if next_head is not None:
        # row r (position p = record_from + r) predicts x_{p+1}; the head drafts it from position
        # p-1's final state and x_p's embedding (none for position 0)
        x, _ = head_inputs(lm, seq.ids, states[-1])
        H = x.shape[1] // 2
        inputs = torch.from_numpy(x[max(0, seq.record_from - 1) :]).to(states[-1].dtype)
        z = next_head.next_logits(inputs[:, :H], inputs[:, H:])
        column = z.argmax(-1)
        draft = column if next_head.token_ids is None else next_head.token_ids[column]
        draft = torch.cat([torch.full((k - len(draft),), -1, dtype=draft.dtype), draft])  # -1: no draft
        out["head_right"] = (draft == final).numpy()
        if p is not None:
            out["head_accept"] = round_bits(torch.where(draft >= 0, p[torch.arange(k), draft.clamp(min=0)], 0.0).float().numpy())
    return out


def exit_heads(lm: HFCausalLM, weights: ExitHeadWeights) -> dict[str, FittedExitHead]:
    """The two draft heads recorded: the plain short-list head and the one after the lens."""
    return {
        "plain": FittedExitHead(ExitHeadWeights(weights.shortlist, {}), lm.normed, lm.lm_head_weight, lm.softcap),
        "lens": FittedExitHead(weights, lm.normed, lm.lm_head_weight, lm.softcap),
    }


def records_shard(
    lm: HFCausalLM, heads: dict[str, FittedExitHead], group: list[RecordedSequence], first: int, layers,
    progress: Callable[[int], None], warpers=None,
) -> bytes:
    """Record sequences first, first+1, ... (of the calibration and held-out splits, in order) as
    one Arrow stream. With a sampling mode's warpers, also each draft's acceptance probability."""
    import pyarrow as pa

    columns: dict[str, list] = {
        k: [] for k in ("seq", "held_out", "own", "final", "right", "conf", "accept", "head_right", "head_accept")
    }
    for index, seq in enumerate(group, start=first):
        rec = record_sequence(lm, heads, seq, layers, warpers)
        k = len(rec["final"])
        columns["seq"].append(np.full(k, index, dtype=np.int32))
        columns["held_out"].append(np.full(k, seq.held_out))
        columns["own"].append(np.full(k, seq.own))
        columns["final"].append(rec["final"])
        columns["right"].append(rec["right"].reshape(k, -1))
        columns["conf"].append(rec["conf"].reshape(k, -1))
        if "accept" in rec:
            columns["accept"].append(rec["accept"].reshape(k, -1))
        for name in ("head_right", "head_accept"):
            if name in rec:
                columns[name].append(rec[name])
        progress(seq.recorded)
    table = {
        "seq": pa.array(np.concatenate(columns["seq"])),
        "held_out": pa.array(np.concatenate(columns["held_out"])),
        "own": pa.array(np.concatenate(columns["own"])),
        "final": pa.array(np.concatenate(columns["final"])),
        "right": _fixed_list(np.concatenate(columns["right"])),
        "conf": _fixed_list(np.concatenate(columns["conf"])),
    }
    if columns["accept"]:
        table["accept"] = _fixed_list(np.concatenate(columns["accept"]))
    for name in ("head_right", "head_accept"):
        if columns[name]:
            table[name] = pa.array(np.concatenate(columns[name]))
    table = pa.table(table)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _fixed_list(matrix: np.ndarray):
    import pyarrow as pa

    flat = pa.array(matrix.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


@dataclass(frozen=True)
class Records:
    """All recorded positions, as arrays (shapes: right [N, heads, C], conf [N, heads, C, G])."""

    seq: np.ndarray
    held_out: np.ndarray
    own: np.ndarray
    final: np.ndarray
    right: np.ndarray
    conf: np.ndarray
    layers: tuple[int, ...]
    lookup_proposed: np.ndarray | None = None  # [N, rules]: prompt lookup per rule of LOOKUP_RULES
    lookup_right: np.ndarray | None = None
    accept: np.ndarray | None = None  # [N, heads, C]: acceptance probability under sampling
    draws: np.ndarray | None = None  # [N]: a uniform number per position, deciding acceptance in replay
    head_right: np.ndarray | None = None  # [N]: the next-token head's draft equals the full model's argmax
    head_accept: np.ndarray | None = None  # [N]: under sampling, its acceptance probability p(draft)
    lookup_size: np.ndarray | None = None  # [N, rules]: how many tokens prompt lookup matched (0: none)
    context: np.ndarray | None = None  # [N]: how many tokens precede each position (`with_contexts`)

    def select(self, mask: np.ndarray) -> "Records":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Records(
            self.seq[mask], self.held_out[mask], self.own[mask], self.final[mask], self.right[mask],
            self.conf[mask], self.layers, pick(self.lookup_proposed), pick(self.lookup_right),
            pick(self.accept), pick(self.draws), pick(self.head_right), pick(self.head_accept), pick(self.lookup_size),
            pick(self.context),
        )

    @property
    def has_head(self) -> bool:
        """Whether the next-token head was recorded (and so can be replayed)."""
        return self.head_right is not None

    def head_draft_right(self) -> np.ndarray:
        """[N]: whether the next-token head's draft at each position is kept in replay: greedy,
        it equals the full model's argmax; sampling, accepted by the position's draw (as
        draft_right: the replay drafts a position once, by one source)."""
        if self.accept is None:
            return self.head_right
        return self.draws < self.head_accept

    def draft_right(self, head: int) -> np.ndarray:
        """[N, C]: whether head `head`'s draft at each position and candidate layer is kept in
        replay. Greedy: it equals the full model's argmax. Sampling: speculative sampling
        accepts it, drawn once per position from its acceptance probability (`draws`; a position
        is drafted at most once on the path the replay follows)."""
        if self.accept is None:
            return self.right[:, head]
        return self.draws[:, None] < self.accept[:, head]

    def with_draws(self, seed: int) -> "Records":
        """The same records with the acceptance draws of another seed (replay variance)."""
        return dataclasses.replace(self, draws=np.random.default_rng(seed).random(len(self.seq)))

    def bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each sequence's decode trajectory (records are stored sequence by
        sequence). A sequence's last row predicts a token past its end, never generated: it
        counts for calibration but is not replayed."""
        return [(a, b - 1) for a, b in self.blocks()]

    def blocks(self) -> list[tuple[int, int]]:
        """[start, end) of each sequence's rows."""
        if len(self.seq) == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.seq)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(self.seq)]])
        return list(zip(starts.tolist(), ends.tolist()))


def load_records(paths: list[Path], layers: tuple[int, ...]) -> Records:
    """Read the shards back with `datasets` (memory-mapped Arrow), column by column as Arrow
    arrays: numpy formatting would build every row as a Python object first (15 s of a default
    calibration's 10 minutes went there)."""
    from datasets import Dataset, concatenate_datasets

    table = concatenate_datasets([Dataset.from_file(str(p)) for p in paths]).with_format("arrow")[:]
    n = table.num_rows
    C, G = len(layers), len(TEMPERATURE_GRID)

    def column(name: str) -> np.ndarray | None:
        if name not in table.column_names:
            return None
        chunks = table.column(name).chunks
        values = [c.flatten() if hasattr(c, "flatten") else c for c in chunks]  # fixed-size lists: their values
        return np.concatenate([v.to_numpy(zero_copy_only=False) for v in values]) if values else np.zeros(0)

    accept = column("accept")
    head_right = column("head_right")
    records = Records(
        seq=column("seq"),
        held_out=column("held_out").astype(bool),
        own=column("own").astype(bool),
        final=column("final"),
        right=column("right").reshape(n, len(HEADS), C).astype(bool),
        conf=column("conf").reshape(n, len(HEADS), C, G),
        layers=tuple(layers),
        accept=None if accept is None else accept.reshape(n, len(HEADS), C),
        head_right=None if head_right is None else head_right.astype(bool),
        head_accept=column("head_accept"),
    )
    return records if accept is None else records.with_draws(REPLAY_SEED)


REPLAY_SEED = 0  # the acceptance draws of a sampling replay: fixed, so tuning is deterministic


LOOKUP_NGRAMS = (1, 2, 3)  # prompt lookup on exactly this many last tokens
# (ngram, shortest): lookup on this many last tokens, backing off down to `shortest`; backing
# off only to 2 leaves the 1-token matches to the next-token head, where the policy has one
LOOKUP_BACKOFF = ((2, 1), (3, 1), (4, 1), (3, 2), (4, 2), (8, 1), (8, 2))
# the rules tuning chooses among, (ngram, shortest: 0 = no backoff), in the order of the
# columns of Records.lookup_proposed and lookup_right
LOOKUP_RULES = tuple((n, 0) for n in LOOKUP_NGRAMS) + LOOKUP_BACKOFF
LOOKUP_MAX = 10


def lookup_column(ngram: int, shortest: int = 0) -> int:
    """The column of a prompt-lookup rule in Records.lookup_proposed / lookup_right."""
    return LOOKUP_RULES.index((ngram, 0 if shortest in (0, ngram) else shortest))


def with_lookups(records: Records, recorded: list[RecordedSequence]) -> Records:
    """Add, per recorded position and rule of LOOKUP_RULES, what prompt lookup proposes from the
    true context (as specbound_runtime.policy.lookup_match finds it, up to LOOKUP_MAX tokens), how
    much of it is right and how many tokens the match took (a policy may size drafts by it). `recorded` are the sequences in the order their shards (records_shard) stored them."""
    n = len(records.seq)
    sizes = range(1, max(n for n, _ in LOOKUP_RULES) + 1)
    by_size = {size: (np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)) for size in sizes}
    for start, end in records.blocks():
        seq = recorded[int(records.seq[start])]
        ids = list(seq.ids)
        for size in sizes:
            proposed, right = by_size[size]
            last_end: dict[tuple, int] = {}
            for p in range(len(ids)):
                tail = tuple(ids[p - size + 1 : p + 1]) if p >= size - 1 else None
                row = start + p - seq.record_from
                if tail is not None and start <= row < end and tail in last_end:
                    q = last_end[tail]
                    cont = ids[q + 1 : min(p + 1, q + 1 + LOOKUP_MAX)]
                    proposed[row] = len(cont)
                    truth = ids[p + 1 : p + 1 + len(cont)]
                    k = 0
                    while k < len(truth) and cont[k] == truth[k]:
                        k += 1
                    right[row] = k
                if tail is not None:
                    last_end[tail] = p
    proposed = np.zeros((n, len(LOOKUP_RULES)), dtype=np.int64)
    right = np.zeros((n, len(LOOKUP_RULES)), dtype=np.int64)
    matched = np.zeros((n, len(LOOKUP_RULES)), dtype=np.int64)
    for g, (ngram, shortest) in enumerate(LOOKUP_RULES):
        found = np.zeros(n, dtype=bool)
        for size in lookup_sizes(ngram, shortest):  # the longest tail that occurred wins
            take = ~found & (by_size[size][0] > 0)
            proposed[take, g] = by_size[size][0][take]
            right[take, g] = by_size[size][1][take]
            matched[take, g] = size
            found |= take
    return dataclasses.replace(records, lookup_proposed=proposed, lookup_right=right, lookup_size=matched)


def with_contexts(records: Records, recorded: list[RecordedSequence]) -> Records:
    """Add how many tokens precede each recorded position (its sequence's prompt and what came
    before it), so that the simulator can price each round at its own context. `recorded` as for
    `with_lookups`."""
    context = np.zeros(len(records.seq), dtype=np.int64)
    for start, end in records.blocks():
        first = recorded[int(records.seq[start])].record_from
        context[start:end] = np.arange(first, first + end - start)
    return dataclasses.replace(records, context=context)


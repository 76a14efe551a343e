"""Stage 1, recording: the model's own answers to the corpus prompts, then the lens moments
(pass A) and the per-layer records (pass B), shard by shard in the work folder, each shard made
once by whichever worker claims it (calibrate.shards)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.decoder import token_ids
from specbound_runtime.errors import InputError
from specbound_runtime.sampling import prompt_seed

from . import collect as C
from .corpus import NO_KIND, Corpus
from .precision import recording_model
from .progress import bar, log
from .shards import make_shards

if TYPE_CHECKING:
    from .pipeline import Plan

MIN_FIT_POSITIONS = 200  # below this, per-layer temperatures are not meaningful


def _chat_ids(tokenizer, text: str) -> list[int]:
    """A corpus prompt as the model's user turn: through the chat template where there is one."""
    return token_ids(tokenizer, [{"role": "user", "content": text}], bool(getattr(tokenizer, "chat_template", None)))


ANSWER_BATCH = 8  # prompts answered together: a shard of answers (padding makes batches part of the result)
LENS_SHARD = 16  # lens-split sequences per pass-A shard (exact sums: any size gives the same lens)
RECORD_SHARD = 8  # sequences per pass-B shard


def answers_shard(model, tok, group, eos_ids, max_new_tokens: int, mode=None, seed: int = 0) -> bytes:
    """The model's own answers to one batch of prompts, as JSON lines {id, answer}: greedy, or
    under a sampling mode sampled (seeded by `seed`, torch's global generator restored after),
    so that the records follow the trajectories decoding in that mode takes."""
    from specbound_runtime.sampling import DecodingMode

    mode = mode or DecodingMode()
    pad = eos_ids[0] if eos_ids else 0
    encoded = [_chat_ids(tok, p.text) for p in group]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            ids, attention_mask=mask, **mode.generate_kwargs(), max_new_tokens=max_new_tokens,
            eos_token_id=list(eos_ids) or None, pad_token_id=pad,
        )
    lines = []
    for p, row in zip(group, out[:, width:].tolist()):
        answer = []
        for t in row:
            answer.append(int(t))
            if t in eos_ids:
                break
        lines.append(json.dumps({"id": p.id, "answer": answer}) + "\n")
    return "".join(lines).encode()

def read_answers(paths: list[Path]) -> dict[str, list[int]]:
    done = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["id"]] = row["answer"]
    return done

def build_sequences(loaded, corpus: Corpus, answers, chunk_tokens: int) -> list[C.RecordedSequence]:
    tok = loaded.tokenizer
    sequences = []
    for p in corpus.prompts:
        prompt_ids = _chat_ids(tok, p.text)
        answer = answers[p.id]
        if answer:
            sequences.append(C.RecordedSequence(p.id, p.held_out, True, tuple(prompt_ids + answer), len(prompt_ids) - 1))
    for d in corpus.documents:
        ids = [int(i) for i in tok(d.text)["input_ids"]][:chunk_tokens]
        if len(ids) >= 2:
            sequences.append(C.RecordedSequence(d.id, d.held_out, False, tuple(ids), 0))
    # lens split first, then calibration, then held-out; stable within each
    return sorted(sequences, key=lambda s: (s.held_out, not s.lens_split))

def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]

def _moments_shard(lm, group, layers, scale: float) -> bytes:
    total = None
    for seq in group:
        m = C.lens_moments(lm, seq, layers, scale)
        total = m if total is None else total + m
    buf = io.BytesIO()
    np.savez(buf, **total.to_npz())
    return buf.getvalue()

def held_out_kinds(records: C.Records, recorded: list[C.RecordedSequence], corpus: Corpus) -> dict[str, C.Records]:
    """The held-out answers' records, by the kind of their prompt (records.seq indexes `recorded`)."""
    kind_of = {p.id: p.kind or NO_KIND for p in corpus.prompts if p.held_out}
    seq_kind = np.array([kind_of.get(s.id, "") if s.own and s.held_out else "" for s in recorded] + [""], dtype=object)
    kinds = seq_kind[np.minimum(records.seq, len(recorded))]
    names = sorted(set(kind_of.values()))
    return {k: records.select(kinds == k) for k in names if (kinds == k).any()}


@dataclass(frozen=True)
class Recording:
    """What recording leaves for fitting, tuning and the export."""

    sequences: list  # every recorded sequence (lens split, calibration, held-out)
    recorded: list  # those pass B recorded (records.seq indexes them)
    records: C.Records
    shard_paths: list[Path]  # pass B's shards: their bytes key the study
    weights: Any  # the exit head's short-list, lenses and next-token head
    coverage: float
    n_lens: int
    lm: HFCausalLM  # what recorded (calibrate.precision.recording_model)


def record(plan: "Plan", worker: int = 0, workers: int = 1, quiet: bool = False) -> Recording:
    """One worker's share of recording; every worker returns the same Recording."""
    opts, loaded, layers, work = plan.opts, plan.loaded, plan.layers, plan.work
    # records come from the modules' own forwards (no prepacked kernels): the artifact must not
    # depend on which kernel path this machine picked (the cost model, measured on loaded.lm, is
    # what follows the kernels); in float64 on a copy where the job asks (calibrate.precision)
    model = recording_model(loaded.model, opts.record_dtype)
    lm, eos = HFCausalLM(model), loaded.eos_token_ids
    share = {"worker": worker, "workers": workers}
    if not quiet:
        log(f"calibrating {loaded.fingerprint.short()} on corpus {opts.corpus!r}; work folder {work}")
    groups = _chunks(list(plan.corpus.prompts), ANSWER_BATCH)
    with bar(len(plan.corpus.prompts), "own answers", "prompt", quiet) as progress:
        paths = make_shards(
            work / "answers", len(groups), ".jsonl",
            lambda i: answers_shard(model, loaded.tokenizer, groups[i], eos, opts.answer_tokens, plan.mode, prompt_seed(opts.seed, i)),
            progress=lambda i: progress.update(len(groups[i])), **share,
        )
    sequences = build_sequences(loaded, plan.corpus, read_answers(paths), opts.chunk_tokens)
    n_lens = sum(s.recorded for s in sequences if s.lens_split)
    n_fit = sum(s.recorded for s in sequences if not s.held_out and not s.lens_split)
    if min(n_lens, n_fit) < MIN_FIT_POSITIONS:
        raise InputError(
            f"the corpus gives {n_lens} lens-fitting and {n_fit} calibration positions; at least "
            f"{MIN_FIT_POSITIONS} of each are needed (add text or prompts)"
        )
    settings = C.CollectSettings(candidate_layers=layers, shortlist_size=opts.shortlist_size)
    lens_groups = _chunks([s for s in sequences if s.lens_split], LENS_SHARD)
    scale = C.embedding_scale(lm)  # of the weights alone: the same in every worker
    with bar(n_lens, "pass A: lens moments", "tok", quiet) as progress:
        paths = make_shards(
            work / "pass_a", len(lens_groups), ".npz", lambda i: _moments_shard(lm, lens_groups[i], layers, scale),
            progress=lambda i: progress.update(sum(s.recorded for s in lens_groups[i])), **share,
        )
    moments = None
    for path in paths:  # int64: exact, so the order and the shards do not matter
        with np.load(path) as part:
            m = C.Moments(**{name: part[name] for name in part.files})
        moments = m if moments is None else moments + m
    weights = C.fit_exit_head(lm, moments, settings, eos, scale)
    coverage = C.shortlist_coverage(moments.counts, weights.shortlist)
    recorded = [s for s in sequences if not s.lens_split]
    record_groups = _chunks(recorded, RECORD_SHARD)
    heads = C.exit_heads(lm, weights)
    with bar(sum(s.recorded for s in recorded), "pass B: per-layer records", "tok", quiet) as progress:
        paths = make_shards(
            work / "shards", len(record_groups), ".arrow",
            lambda i: C.records_shard(lm, heads, record_groups[i], i * RECORD_SHARD, layers, lambda n: None, plan.warpers),
            progress=lambda i: progress.update(sum(s.recorded for s in record_groups[i])), **share,
        )
    records = C.with_contexts(C.with_lookups(C.load_records(paths, layers), recorded), recorded)
    return Recording(sequences, recorded, records, paths, weights, coverage, n_lens, lm)

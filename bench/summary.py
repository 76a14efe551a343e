"""The figures a bench reports, computed from its measurements.

Per task and overall, per method:
  - tokens/s: new tokens / median over repeats of the task's wall time (sum over its answers);
  - speedup: the method's tokens/s / the reference's (same run). Greedy: every method emits the
    same tokens, so it is the reference's median wall time / the method's. Sampling: answers
    differ in length between methods, and time per token is what compares;
  - mean accepted length: new tokens / verification passes, the full model's own token counted
    (plain decoding scores 1.00). For transformers' assisted methods the passes are counted from
    outside (`hf_hooks`); where that fails it says n/a;
  - acceptance rate: accepted drafts / drafted tokens (n/a without drafts);
  - exactness: the share of answers whose token ids equal hf-greedy's in every repeat; for any
    that differ, the first divergence and the logit margin there (exactness.divergence);
  - token sources: the share of emitted tokens each draft source gave (accepted drafts by what
    proposed them: "lookup", "early-exit", ...), the rest "model", the full model's own token of
    each pass. Our engine labels every draft; transformers' assisted methods are put down whole to
    their one source (hf-prompt-lookup: lookup; hf-early-exit: early-exit); None where a method's
    passes could not be counted.

Overall, per method, the worst task: the task with the lowest speedup (`worst_tasks`).
"""

from __future__ import annotations

import statistics

from .answers import Answer
from .measurements import Measurement


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def relative_speed(figures: dict, base: dict) -> float | None:
    """How fast one method decodes against another (two `summarise` results): tokens per second
    over tokens per second. Under greedy decoding both emit the same tokens, so it is the ratio of
    wall times; under sampling each emits its own answer, and only the rate compares them."""
    return ratio(figures.get("tokens_per_s"), base.get("tokens_per_s"))


def answer_divergence(model, prompt_ids, answer: Answer, runs: list[Measurement], reference: Measurement) -> dict | None:
    """None when every repeat of a method produced the reference's token ids; otherwise where the
    first differing repeat departs from it, and the full model's logit margin there."""
    from specbound_runtime.exactness import divergence

    want = reference.generation.token_ids
    bad = next((x for x in runs if x.generation.token_ids != want), None)
    if bad is None:
        return None
    d = divergence(model, list(prompt_ids), list(bad.generation.token_ids), list(want))
    return {
        "answer": answer.index, "question_id": answer.prompt.id, "turn": answer.turn, "repeat": bad.key.repeat,
        "position": d.position, "ours": d.ours, "reference": d.reference, "margin": d.margin, "describe": d.describe(),
    }


def summarise(method_runs: list[list[Measurement]], ref_runs: list[list[Measurement]], divergences: list[dict | None], idx: list[int]) -> dict:
    """One method's figures over the answers `idx` (see the module docstring). `method_runs[i]`
    and `ref_runs[i]` are answer i's measurements by repeat; `divergences[i]` its divergence."""
    n_rep = len(method_runs[idx[0]])
    wall = [sum(method_runs[i][r].wall_time_s for i in idx) for r in range(n_rep)]
    ref_wall = [sum(ref_runs[i][r].wall_time_s for i in idx) for r in range(len(ref_runs[idx[0]]))]
    first = [method_runs[i][0].generation for i in idx]
    tokens = sum(x.new_tokens for x in first)
    ref_tokens = sum(ref_runs[i][0].generation.new_tokens for i in idx)
    med, ref_med = statistics.median(wall), statistics.median(ref_wall)
    passes = [x.passes for x in first]
    drafted = [x.drafted for x in first]
    mal = tokens / sum(passes) if None not in passes and sum(passes) else None
    rate = None
    if None not in drafted and None not in passes and sum(drafted):
        rate = sum(x.accepted for x in first) / sum(drafted)
    found = [divergences[i] for i in idx if divergences[i] is not None]
    sources = token_sources(first)
    return {
        "answers": len(idx),
        "new_tokens": tokens,
        "repeats": n_rep,
        "wall_time_s": [round(w, 4) for w in wall],
        "median_wall_time_s": round(med, 4),
        "tokens_per_s": round(tokens / med, 3) if med > 0 else None,
        # tokens per second against the reference's: under greedy decoding every method emits the
        # same tokens, so this is the ratio of wall times; under sampling the answers differ in length
        "speedup": ratio(tokens / med if med > 0 else None, ref_tokens / ref_med if ref_med > 0 else None),
        "mean_accepted_length": None if mal is None else round(mal, 4),
        "acceptance_rate": None if rate is None else round(rate, 4),
        "drafted": None if None in drafted else sum(drafted),
        "exact": round(1 - len(found) / len(idx), 4),
        "exact_answers": len(idx) - len(found),
        "divergences": found,
        "token_sources": sources,
    }


def token_sources(generations) -> dict[str, float] | None:
    """The share of all emitted tokens of `generations` from each draft source, and "model" for
    the rest (see the module docstring); None when any of them has no sources."""
    if not generations or any(g.accepted_by_source is None for g in generations):
        return None
    tokens = sum(g.new_tokens for g in generations)
    if not tokens:
        return None
    counts: dict[str, int] = {}
    for g in generations:
        for source, n in g.accepted_by_source:
            counts[source] = counts.get(source, 0) + n
    counts["model"] = tokens - sum(counts.values())
    return {source: round(n / tokens, 4) for source, n in counts.items()}


def worst_tasks(summary: dict, tasks) -> dict[str, dict]:
    """Per method of the overall row: the task among `tasks` with the lowest speedup, and that
    speedup (ties: the first task). Methods with no speedup on any task are left out."""
    out = {}
    for method in summary["overall"]:
        speedups = [(summary[t][method]["speedup"], t) for t in tasks if (summary[t].get(method) or {}).get("speedup") is not None]
        if speedups:
            speedup, task = min(speedups, key=lambda st: st[0])
            out[method] = {"task": task, "speedup": speedup}
    return out

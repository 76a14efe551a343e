"""The bench on batches: `specbound bench --batch-size 1,4,16`.

The prompts are the first turns of `prompts_per_task` prompts of each task (13 tasks x 3 = 39 by
default), ordered task by task in turn (every task's first prompt, then every task's second, ...)
so that a batch mixes prompt lengths, and cut into batches of N in that order before anything
runs: the same batches for every method, listed in results.json. Methods, each on every batch:

- `hf-greedy`: transformers' own `generate()` on the left-padded batch (the reference);
- `ar`: SpecBound's plain batched decoding (no drafts, the same engine and kernels);
- `specbound`: SpecBound's batched speculation under the artifact's policy.

Only tokens up to and including each row's end-of-sequence token count, never padding. Every
row of every method is compared with greedy `generate()` on that prompt alone (computed once and
kept in <out>/alone.jsonl): SpecBound's rows must equal it; transformers' batched rows are
reported as an identity rate with the first divergence and its margin.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from specbound_runtime.files import atomic_write_bytes

BATCH_METHODS = ("hf-greedy", "ar", "specbound")


@dataclass(frozen=True)
class BatchPrompt:
    index: int
    label: str  # task/prompt id
    task: str
    text: str


def batch_prompts(tasks: tuple[str, ...], per_task: int, seed: int = 0) -> list[BatchPrompt]:
    """First turns of `per_task` prompts of each task, taken task by task in turn."""
    from specbound.data.tasks import task_prompts, task_size

    by_task = {t: task_prompts(t, min(per_task, task_size(t)), seed) for t in tasks}
    out: list[BatchPrompt] = []
    for i in range(per_task):
        for task in tasks:
            if i < len(by_task[task]):
                p = by_task[task][i]
                out.append(BatchPrompt(len(out), f"{task}/{p.id}", task, p.turns[0]))
    return out


def form_batches(prompts: list[BatchPrompt], size: int) -> list[list[int]]:
    return [[p.index for p in prompts[i : i + size]] for i in range(0, len(prompts), size)]


def _until_eos(tokens: list[int], eos) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _hf_batch(model, encoded: list[list[int]], max_new_tokens: int, eos) -> list[list[int]]:
    import torch

    from specbound_runtime.generation import generate_arguments

    width = max(len(e) for e in encoded)
    pad = eos[0] if eos else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, **generate_arguments(max_new_tokens, eos))
    return [_until_eos(row[width:].tolist(), set(eos)) for row in out]


def _alone(model, path: Path, encoded: dict[int, list[int]], max_new_tokens: int, eos, bar) -> dict[int, list[int]]:
    """Greedy generate() on each prompt alone, kept in `path` (a rerun reads it back)."""
    from specbound_runtime.exactness import reference_greedy

    done: dict[int, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("ids") == encoded.get(row["index"]) and row.get("max_new_tokens") == max_new_tokens:
                done[row["index"]] = row["tokens"]
    with path.open("a") as f:
        for index, ids in encoded.items():
            if index not in done:
                done[index] = reference_greedy(model, ids, max_new_tokens, eos)
                f.write(json.dumps({"index": index, "ids": ids, "max_new_tokens": max_new_tokens, "tokens": done[index]}) + "\n")
                f.flush()
            bar.update(1)
    return done


def run_batch_bench(
    model: str, artifact: Path | None, tasks, per_task: int, max_new_tokens: int, sizes: list[int], out: Path,
    seed: int = 0, show_progress: bool = True, device: str | None = None, dtype: str | None = None,
) -> dict:
    """Every batch size in `sizes`, every method on the same batches; writes results.json and
    table.md into `out` and returns the results."""
    from tqdm import tqdm

    import specbound_runtime as sb
    from specbound_runtime.batch_policy import predicted_speedup
    from specbound_runtime.decoder import Decoder, peak_rss_mb
    from specbound_runtime.errors import UsageError
    from specbound_runtime.exactness import divergence, first_divergence

    if artifact is None:
        raise UsageError("bench --batch-size measures SpecBound's batched speculation: give --artifact (from `specbound calibrate`)")
    prompts = batch_prompts(tuple(tasks), per_task, seed)
    loaded = sb.load(model, device=device, dtype=dtype)
    m = loaded.with_artifact(artifact)
    ours = Decoder(m)
    eos = list(loaded.eos_token_ids)
    chat = ours.has_chat_template
    encodings = {p.index: ours.encode([{"role": "user", "content": p.text}], chat, max_new_tokens) for p in prompts}
    max_new = min(e.max_new_tokens for e in encodings.values())
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(prompts), desc="generate() alone", disable=not show_progress) as bar:
        alone = _alone(loaded.model, out / "alone.jsonl", {i: list(e.ids) for i, e in encodings.items()}, max_new, eos, bar)
    results: dict = {
        "model": model,
        "artifact": str(artifact),
        "max_new_tokens": max_new,
        "prompts": [{"index": p.index, "label": p.label, "tokens": len(encodings[p.index].ids)} for p in prompts],
        "kernels": loaded.kernels.report.describe(),
        "policy": m.policy.to_dict(),
        "sizes": {},
    }
    for size in sizes:
        batches = form_batches(prompts, size)
        totals = {name: {"tokens": 0, "seconds": 0.0, "exact_rows": 0, "rows": 0, "divergences": []} for name in BATCH_METHODS}
        passes = drafted = accepted = 0
        latencies: list[float] = []
        with tqdm(total=len(batches) * len(BATCH_METHODS), desc=f"batch size {size}", disable=not show_progress) as bar:
            for number, batch in enumerate(batches):
                enc = [encodings[i] for i in batch]
                order = BATCH_METHODS if number % 2 == 0 else tuple(reversed(BATCH_METHODS))
                for name in order:
                    started = time.perf_counter()
                    if name == "hf-greedy":
                        rows = _hf_batch(loaded.model, [list(e.ids) for e in enc], max_new, eos)
                        seconds = time.perf_counter() - started
                    else:
                        r = ours.generate_batch(enc, speculation=name == "specbound")
                        seconds = time.perf_counter() - started
                        rows = [list(x.token_ids) for x in r.rows]
                        if name == "specbound":
                            passes += r.verify_passes
                            drafted += r.drafted
                            accepted += r.accepted
                            latencies += [x.wall_time_s for x in r.rows]
                    t = totals[name]
                    t["tokens"] += sum(len(x) for x in rows)
                    t["seconds"] += seconds
                    t["rows"] += len(rows)
                    for i, row in zip(batch, rows):
                        if first_divergence(row, alone[i]) is None:
                            t["exact_rows"] += 1
                        else:
                            d = divergence(loaded.model, list(encodings[i].ids), row, alone[i])
                            t["divergences"].append({"prompt": prompts[i].label, "divergence": d.describe()})
                    bar.update(1)
        entry = {"batches": [[prompts[i].label for i in b] for b in batches], "methods": {}}
        for name, t in totals.items():
            entry["methods"][name] = {
                "tokens": t["tokens"],
                "seconds": round(t["seconds"], 3),
                "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
                "identity_rate": round(t["exact_rows"] / t["rows"], 4),
                "divergences": t["divergences"],
            }
        ref = entry["methods"]["hf-greedy"]["tokens_per_s"]
        plain = entry["methods"]["ar"]["tokens_per_s"]
        for name in BATCH_METHODS:
            e = entry["methods"][name]
            e["speedup_vs_hf"] = round(e["tokens_per_s"] / ref, 3)
            e["speedup_vs_ar"] = round(e["tokens_per_s"] / plain, 3)
        entry["specbound"] = {
            "draft_width_bound": m.batch_width(size),
            "predicted_vs_ar": predicted_speedup(m.artifact_metadata, size),
            "shared_passes": passes,
            "drafted": drafted,
            "accepted": accepted,
            "row_latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
        }
        entry["peak_rss_mb"] = peak_rss_mb()
        results["sizes"][str(size)] = entry
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    table = batch_table(results)
    atomic_write_bytes(out / "table.md", table.encode())
    return results


def batch_table(results: dict) -> str:
    lines = [
        "| batch size | method | tokens/s | vs hf-greedy (batched) | vs ar (batched) | predicted vs ar | rows identical to alone | SpecBound draft bound, passes, accepted/drafted |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for size, entry in results["sizes"].items():
        s = entry["specbound"]
        for name, e in entry["methods"].items():
            extra = f"{s['draft_width_bound']} a row, {s['shared_passes']} passes, {s['accepted']}/{s['drafted']}" if name == "specbound" else ""
            predicted = s.get("predicted_vs_ar") if name == "specbound" else None
            lines.append(
                f"| {size} | {name} | {e['tokens_per_s']:.1f} | {e['speedup_vs_hf']:.2f}x | {e['speedup_vs_ar']:.2f}x | "
                f"{'' if predicted is None else f'{predicted:.2f}x'} | {e['identity_rate']:.0%} | {extra} |"
            )
    return "\n".join(lines) + "\n"

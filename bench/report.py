"""What a bench writes: table.md, results.json, speedup.png and Spec-Bench-style <method>.jsonl.

Everything here reads the results dict (and, for the per-answer records, the measurements); none
of it runs a model. The plot needs matplotlib (the calibrate extra), imported when it is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from specbound_runtime.files import atomic_write_bytes

from .answers import Answer
from .measurements import Measurement
from .methods import METHODS, REFERENCE, SIMULATED


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "%":
        return f"{value:.0%}"
    if kind == "tps":
        return f"{value:.1f}"
    if kind == "p":
        return f"{value:.3g}"
    return f"{value:.2f}"


def _sources(shares: dict | None) -> str:
    """"lookup 31%, early-exit 4%, model 65%": draft sources by name, then the model's own."""
    if not shares:
        return "n/a"
    order = sorted(s for s in shares if s != "model") + ["model"]
    return ", ".join(f"{s} {shares[s]:.0%}" for s in order if s in shares)


def _worst(w: dict | None) -> str:
    return "n/a" if not w else f"{_fmt(w['speedup'], 'x')} ({w['task']})"


def render_table(results: dict) -> str:
    s = results["settings"]
    summary = results["summary"]
    groups = list(summary)
    methods = [m for m in METHODS if m in summary["overall"]]
    reference = s.get("reference", REFERENCE)
    sampling = reference != REFERENCE
    lines = [
        f"# specbound bench: {results['model']['short']}",
        "",
        f"{s['answers']} answers ({', '.join(s['tasks'])}; {s['prompts_per_task']} per task), "
        f"{s['max_new_tokens']} new tokens max, median of {s['repeats']} repeats, interleaved; "
        f"{results['machine']['cpu_count']} CPUs, {results['machine']['torch_threads']} torch threads"
        + (f"; {s['decoding']}, seed {s['sample_seed']} (answer i seeded from (seed, i), the same for every method)." if sampling else "."),
        "",
        f"## Speedup over {reference}",
        "",
        "| method | " + " | ".join(groups) + " | worst task |",
        "| --- | " + " | ".join("---:" for _ in groups) + " | ---: |",
    ]
    worst = results.get("worst_task", {})
    for m in methods:
        label = m + (" (simulated)" if m in SIMULATED else "")
        cells = [_fmt(summary[g].get(m, {}).get("speedup"), "x") for g in groups] + [_worst(worst.get(m))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    last = "distribution check p-value (tokens)" if sampling else "exact"
    lines += [
        "",
        "## Per task",
        "",
        f"| task | method | tokens/s | speedup | mean accepted length | acceptance | tokens from | {last} |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for g in groups:
        for m in methods:
            if m in SIMULATED:
                continue
            r = summary[g][m]
            check = (
                f"{_fmt(r['distribution_pvalue'], 'p')} ({r['distribution_tokens']})"
                if sampling
                else f"{r['exact']:.0%} ({r['exact_answers']}/{r['answers']})"
            )
            lines.append(
                f"| {g} | {m} | {_fmt(r['tokens_per_s'], 'tps')} | {_fmt(r['speedup'], 'x')} | "
                f"{_fmt(r['mean_accepted_length'], 'f')} | {_fmt(r['acceptance_rate'], '%')} | {_sources(r.get('token_sources'))} | {check} |"
            )
    if any(m in methods for m in SIMULATED):
        lines += [
            "",
            "## Simulator: specbound against its prediction, the oracle and the limit (speedups over ar)",
            "",
            "| task | specbound measured | predicted | oracle | specbound / oracle | oracle mean accepted length | limit |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for g in groups:
            o = summary[g].get("oracle") or {}
            pred = (o.get("predicted_specbound") or {}).get("speedup_vs_ar")
            measured = o.get("specbound_measured_speedup_vs_ar", summary[g].get("specbound", {}).get("speedup_vs_ar"))
            lines.append(
                f"| {g} | {_fmt(measured, 'x')} | {_fmt(pred, 'x')} | "
                f"{_fmt(o.get('speedup_vs_ar'), 'x')} | {_fmt(o.get('specbound_over_oracle'), 'f')} | "
                f"{_fmt(o.get('mean_accepted_length'), 'f')} | {_fmt((summary[g].get('limit') or {}).get('speedup_vs_ar'), 'x')} |"
            )
    notes = []
    grid = results["grid"]
    if "hf-prompt-lookup" in grid:
        notes.append(f"hf-prompt-lookup: k={grid['hf-prompt-lookup']['chosen']} of {grid['hf-prompt-lookup']['values']} (least total time).")
    if "hf-early-exit" in grid:
        notes.append(f"hf-early-exit: layer {grid['hf-early-exit']['chosen']} of {grid['hf-early-exit']['layers']} (fastest on the first answer), one run per answer.")
    warm = results.get("compiled_warm_up")
    if warm:
        notes.append(
            f"hf-greedy-compiled: transformers' static cache and torch.compile; one-time warm-up {warm['total_s']:.1f} s "
            f"(load {warm['load_s']:.1f} s, compile {warm['first_call_s']:.1f} s, dynamic-shape recompile {warm['second_call_s']:.1f} s), outside every timed answer."
        )
    peers = (results.get("peers_warm_up") or {}).get("ort-genai")
    if peers:
        notes.append(
            f"ort-genai, ort-genai-ngram: ONNX Runtime GenAI on its own fp32 CPU export (n-gram size 3 for -ngram); other kernels, "
            f"so their tokens are compared, not assumed; export {peers['export_s']:.1f} s (0: cached), load {peers['load_s']:.1f} s, outside every timed answer."
        )
    if "oracle" in methods:
        notes.append("oracle: not run; the simulator replays the reference outputs under the artifact's cost model; its hf-greedy-scale speedup multiplies by ar's measured speedup.")
    if "limit" in methods:
        w_max = summary["overall"]["limit"].get("w_max")
        notes.append(
            f"limit: not run; the speed if every draft were free and right at the tuned width (w_max={w_max}): each pass emits "
            "w_max+1 tokens for one verification pass and a round's overhead, under the artifact's cost model (the cost of "
            "verification alone); on the hf-greedy scale as the oracle."
        )
    notes.append(
        "tokens from: the share of emitted tokens (first repeat) from each draft source, and from the full model's own "
        "token of each pass (model). Our engine labels every draft (lookup: prompt lookup, no layers; early-exit: an "
        "exit at a check layer); transformers' methods report no sources, so hf-prompt-lookup's accepted drafts count "
        "as lookup and hf-early-exit's as early-exit; n/a where passes could not be counted."
    )
    if worst:
        notes.append("worst task: per method, the task with the lowest speedup over the reference.")
    notes.append("n/a: not reported by the method (or no drafts).")
    if sampling:
        notes.append(
            "distribution check: Kolmogorov-Smirnov p-value of the randomized probability integral transform of every "
            "generated token under the model's own distribution (after generate()'s warpers); uniform on [0, 1] for a "
            "method that samples exactly, near 0 for one that does not."
        )
        impossible = sum(summary["overall"][m].get("distribution_impossible") or 0 for m in methods if m not in SIMULATED)
        if impossible:
            notes.append(f"{impossible} sampled token(s) fell outside the top-p/top-k set as re-scored teacher-forced (rounding); scored at its edge.")
    for m in methods:
        for d in summary["overall"].get(m, {}).get("divergences", []):
            notes.append(f"{m} NOT exact on {d['question_id']} turn {d['turn']}: {d['describe']}")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def spec_bench_records(answers: list[Answer], method_runs: list[list[Measurement]], tokenizer) -> list[dict]:
    """One record per question, Spec-Bench's answer shape; one choice per repeat."""
    records: dict[str, dict] = {}
    for a in answers:
        rec = records.setdefault(a.prompt.id, {"question_id": a.prompt.id, "category": a.task, "turns_asked": [], "choices": []})
        rec["turns_asked"].append(a.turn)
        for r, run in enumerate(method_runs[a.index]):
            if r == len(rec["choices"]):
                rec["choices"].append({"index": r, "turns": [], "new_tokens": [], "wall_time": [], "decoding_steps": [], "accept_lengths": []})
            c, g = rec["choices"][r], run.generation
            c["turns"].append(tokenizer.decode(list(g.token_ids), skip_special_tokens=True))
            c["new_tokens"].append(g.new_tokens)
            c["wall_time"].append(round(run.wall_time_s, 6))
            c["decoding_steps"].append(g.passes)
            c["accept_lengths"].extend(g.accept_lengths or [])
    out = []
    for rec in records.values():
        del rec["turns_asked"]
        out.append(rec)
    return out


def write_outputs(
    out_dir: Path, results: dict, table: str, answers: list[Answer], runs: dict[str, list[list[Measurement]]], reported: dict[str, str], tokenizer
) -> list[Path]:
    """Write every output file atomically; `reported` maps each method to the variant name that
    stands for it, `runs` each variant name to its measurements by answer and repeat."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for m, name in reported.items():
        path = out_dir / f"{m}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in spec_bench_records(answers, runs[name], tokenizer)]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        files.append(path)
    atomic_write_bytes(out_dir / "results.json", json.dumps(results, indent=1, sort_keys=True).encode())
    atomic_write_bytes(out_dir / "table.md", table.encode())
    speedup_png(results, out_dir / "speedup.png")
    files += [out_dir / "results.json", out_dir / "table.md", out_dir / "speedup.png"]
    return files


def speedup_png(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    groups = list(summary)
    reference = results["settings"].get("reference", REFERENCE)
    methods = [m for m in METHODS if m in summary["overall"] and m != reference]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 5))
    for i, m in enumerate(methods):
        values = [summary[g].get(m, {}).get("speedup") or 0.0 for g in groups]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        simulated = m in SIMULATED
        ax.bar(xs, values, width, label=m + (" (simulated)" if simulated else ""), hatch="//" if simulated else None)
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(f"speedup over {reference}")
    ax.set_title(f"{results['model']['short']}: {results['settings']['max_new_tokens']} tokens, median of {results['settings']['repeats']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)

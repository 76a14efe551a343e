"""`run_bench`: every method on the same answers, interleaved, timed, recorded as it goes.

Interleaving: for each answer, every method runs in turn, and that is repeated `repeats` times;
the method order rotates by one each repeat. Machine drift then hits all methods alike. Before
its first timed run, a process generates `WARMUP_TOKENS` tokens once with every method, untimed
(first-call allocations). Every method is timed by the same clock around `MethodRunner.generate`.

Grids. hf-prompt-lookup runs every k of the grid on every answer and repeat; the one reported is
the k with the least total wall time over the whole run (the others are in results.json under
`grid`; picking the best of two after the fact flatters it slightly). hf-early-exit is 2.5-6x
slower than greedy on a 2-core CPU (0.17x-0.39x on SmolLM2), so its cost is capped: each grid
layer (`early_exit_layers`) generates the first answer once, the fastest layer is kept, and that
layer then runs once per answer (repeat 0 only; its "median" is that one run).

Resuming. Each measurement is appended to `<out>/measurements.jsonl` the moment it is taken
(`measurements.MeasurementLog`); rerunning the same command skips every stored one, and the
tables are always built from the log, so a resumed bench reports what an uninterrupted one would
(its timings are the stored ones). Without --out the folder is named by the settings hash, so the
same command finds its own folder again.

Default size and its time arithmetic (2-core CPU, SmolLM2-135M, fp32; plain greedy ~29 tok/s,
so one 128-token answer takes T ~ 4.5 s). Per answer and repeat: hf-greedy 1.0 T, ar 1.0 T,
hf-prompt-lookup 2 x ~1.0 T (0.93x-1.5x of greedy), specbound-paper ~1.7 T (0.59x, measured by
`calibrate`), specbound ~1.05 T (0.96x): ~6.8 T; x 3 repeats = 20.4 T. hf-early-exit once at its
best layer: ~2.6 T (0.39x). The oracle's teacher-forced recording: ~0.05 T; the limit needs only
the answers' lengths. So ~23 T ~ 104 s per answer. With `DEFAULT_PROMPTS_PER_TASK` = 1 answer per
task (an MT-Bench category: its first question's first turn), the 13 `DEFAULT_TASKS` give 13
answers ~ 22.5 min, plus the early-exit grid on the first answer (layers 15, 19, 22 and 26 of 30
at 0.17x-0.39x: ~16 T ~ 72 s), warm-up (~5 s) and loading: ~24 min < 30 min. The peers add per
answer and repeat hf-greedy-compiled ~0.93 T, ort-genai ~0.5 T and ort-genai-ngram ~0.4 T (their
speeds in docs/results.md, fifth session): ~5.5 T x 13 ~ 5.5 min, plus hf-greedy-compiled's
warm-up (1-3 min) and the ONNX export (once, ~10 s): ~31 min by default. Two per task would
give 26 answers ~ 60 min. Answers that stop at EOS earlier only make it shorter.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specbound.data.tasks import DEFAULT_TASKS, TASKS
from specbound_runtime.errors import UsageError
from specbound_runtime.files import library_versions, sha256_file
from specbound_runtime.models import cache_root
from specbound_runtime.sampling import prompt_seed

from .answers import Answer, bench_answers
from .compiled import METHOD as COMPILED, CompileUnavailable, compiled_reference
from .peers import PEERS, PeerUnavailable, ort_peer
from .measurements import MEASUREMENTS_FILE, Measurement, MeasurementKey, MeasurementLog, settings_hash
from .methods import (
    GREEDY_ONLY, METHODS, NEEDS_ARTIFACT, PROMPT_LOOKUP_GRID, REFERENCE, SAMPLING_REFERENCE, SIMULATED, MethodRunner, Variant, early_exit_layers,
    reference_method,
)
from .report import render_table, write_outputs
from .summary import answer_divergence, relative_speed, summarise, worst_tasks

DEFAULT_PROMPTS_PER_TASK = 1
DEFAULT_REPEATS = 3
DEFAULT_MAX_NEW_TOKENS = 128
WARMUP_TOKENS = 8


def parse_names(text: str | None, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """A comma-separated flag value as names from `allowed` (None: all of them), in `allowed`'s
    order, without repeats. An unknown name is a UsageError that lists the choices."""
    if text is None:
        return allowed
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError(f"{flag} needs at least one name; choose from: {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise UsageError(f"unknown name {name!r} in {flag}; choose from: {', '.join(allowed)}")
    return tuple(n for n in allowed if n in names)


@dataclass(frozen=True)
class BenchOptions:
    model: str = "smollm2-135m"
    artifact: Path | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] = METHODS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repeats: int = DEFAULT_REPEATS
    prompts_per_task: int = DEFAULT_PROMPTS_PER_TASK
    out: Path | None = None
    seed: int = 0  # which prompts of each task (data.tasks' seeded subsets)
    prompt_lookup_grid: tuple[int, ...] = PROMPT_LOOKUP_GRID
    command: str | None = None  # the command line, recorded in results.json
    device: str | None = None  # cpu (default), cuda, mps
    dtype: str | None = None  # default float32 on cpu, the checkpoint's own on a GPU
    # sampling (every method, the same settings): on when any is given; answer i is seeded from (sample_seed, i)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    sample_seed: int = 0

    def mode(self):
        from specbound_runtime.sampling import DecodingMode

        try:
            return DecodingMode.sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        except ValueError as e:
            raise UsageError(f"sampling settings: {e}") from None

    @property
    def reference(self) -> str:
        """The method every speedup is measured against: hf-greedy, or hf-sample when sampling."""
        return reference_method(self.mode().do_sample)

    def validate(self) -> None:
        self.mode()
        if self.sample_seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.sample_seed}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise UsageError(f"--tasks must name tasks among: {', '.join(TASKS)}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise UsageError(f"--methods must name methods among: {', '.join(METHODS)}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {self.repeats}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompts_per_task < 1:
            raise UsageError(f"--prompts-per-task must be >= 1, got {self.prompts_per_task}")
        if not self.prompt_lookup_grid or any(k < 1 for k in self.prompt_lookup_grid):
            raise UsageError("the prompt-lookup grid needs values >= 1")


@dataclass(frozen=True)
class BenchOutcome:
    results: dict
    table: str
    out_dir: Path
    files: tuple[Path, ...]


# -- measuring -------------------------------------------------------------------------------------


class _Measurer:
    """Takes the measurements the log does not hold yet, each timed by one clock around
    `MethodRunner.generate` and appended to the log at once; returns stored ones as they are.
    Warms every variant up once, untimed, before this process's first timed run."""

    def __init__(self, runner: MethodRunner, log: MeasurementLog, warm_up: list[Variant], bar, sample_seed: int = 0):
        self.runner = runner
        self.log = log
        self.warm_up = warm_up
        self.bar = bar
        self.sample_seed = sample_seed

    def measure(self, key: MeasurementKey, answer: Answer, encoded) -> Measurement:
        stored = self.log.get(key)
        if stored is not None:
            return stored
        if self.warm_up:
            self.bar.set_postfix_str("warm-up")
            for v in self.warm_up:
                self.runner.generate(v, encoded, WARMUP_TOKENS)
            self.warm_up = []
        self.bar.set_postfix_str(f"{answer.task} #{answer.index} rep {key.repeat + 1}: {key.variant.name}")
        started = time.perf_counter()
        generation = self.runner.generate(key.variant, encoded, seed=prompt_seed(self.sample_seed, answer.index))
        measurement = Measurement(key, generation, time.perf_counter() - started)
        self.log.append(measurement, answer)
        self.bar.update(1)
        return measurement


@dataclass(frozen=True)
class _Walked:
    """What walking the plan gives besides the log: each answer's encoded prompt (turn 2 of
    MT-Bench follows the reference's first answer) and the hf-early-exit layer chosen on the first
    answer (None without the method)."""

    encodings: tuple
    early_exit: Variant | None


def _measure_all(
    measurer: _Measurer, answers: list[Answer], timed: list[Variant], ee_grid: tuple[int, ...], repeats: int, encode, tokenizer,
    reference: str = REFERENCE,
) -> _Walked:
    """Walk the whole plan in its interleaved order, measuring what the log does not hold."""
    encodings = []
    ee_variant = None
    contexts: dict[str, list[dict]] = {}  # per prompt id: the conversation so far
    for answer in answers:
        messages = contexts.setdefault(answer.prompt.id, [])
        messages.append({"role": "user", "content": answer.prompt.turns[answer.turn]})
        encoded = encode(messages)
        encodings.append(encoded)
        if answer.index == 0 and ee_grid:
            grid = {layer: measurer.measure(_grid_key(layer), answer, encoded) for layer in ee_grid}
            ee_variant = Variant("hf-early-exit", min(ee_grid, key=lambda layer: (grid[layer].wall_time_s, layer)))
        for r in range(repeats):
            shift = r % len(timed)
            order = timed[shift:] + timed[:shift]
            if r == 0 and ee_variant is not None:
                order = order + [ee_variant]
            for v in order:
                measurer.measure(MeasurementKey("timed", answer.index, v, r), answer, encoded)
        ref = measurer.log.get(MeasurementKey("timed", answer.index, Variant(reference), 0))
        messages.append({"role": "assistant", "content": tokenizer.decode(list(ref.generation.token_ids), skip_special_tokens=True)})
    return _Walked(tuple(encodings), ee_variant)


def _grid_key(layer: int) -> MeasurementKey:
    return MeasurementKey("grid", 0, Variant("hf-early-exit", layer), 0)


# -- the run ---------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


BENCH_LIBRARIES = ("specbound", "torch", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib", "tqdm", "onnxruntime-genai", "onnxruntime")


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def bench_settings(opts: BenchOptions, methods: tuple[str, ...], loaded, artifact_sha: str | None, answers: list[Answer]) -> dict:
    """Everything that decides what a bench measures; its hash names the default folder and is
    checked when a bench resumes. The command line and the folder are not in it."""
    return {
        "model": loaded.fingerprint.to_dict(),
        "tokenizer_sha256": loaded.tokenizer_fingerprint.sha256,
        "artifact_sha256": artifact_sha,
        "tasks": list(opts.tasks),
        "methods": list(methods),
        "answers": [a.label for a in answers],
        "max_new_tokens": opts.max_new_tokens,
        "repeats": opts.repeats,
        "seed": opts.seed,
        "prompt_lookup_grid": list(opts.prompt_lookup_grid),
        "warmup_tokens": WARMUP_TOKENS,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        # a greedy bench's settings (and so its folder) are as they were before sampling existed
        **({"decoding": opts.mode().to_json(), "sample_seed": opts.sample_seed} if opts.mode().do_sample else {}),
    }


def default_out_dir(fingerprint, settings_sha: str) -> Path:
    """runs/bench-<model>-<settings hash>: the same settings write, and resume, the same folder."""
    return Path("runs") / f"bench-{fingerprint.model_type}-L{fingerprint.num_layers}-{fingerprint.weights_sha256[:8]}-{settings_sha[:8]}"


def run_bench(opts: BenchOptions, show_progress: bool = True) -> BenchOutcome:
    """Run the benchmark, resuming from `<out>/measurements.jsonl`; write results.json, table.md,
    speedup.png and <method>.jsonl."""
    from tqdm import tqdm

    import specbound_runtime as sb
    from specbound_runtime.decoder import Decoder

    opts.validate()
    mode = opts.mode()
    reference = opts.reference
    other = REFERENCE if mode.do_sample else SAMPLING_REFERENCE  # the other mode's reference never runs
    if other in opts.methods and tuple(opts.methods) != METHODS:
        _warn(f"warning: {other} is the reference of a {'greedy' if other == REFERENCE else 'sampling'} bench; this one uses {reference}")
    methods = tuple(m for m in METHODS if (m in opts.methods or m == reference) and m != other)
    if mode.do_sample and any(m in methods for m in GREEDY_ONLY):
        # the oracle replays greedy decoding; the limit is kept beside it, on the greedy bench's scale;
        # the compiled reference is transformers' greedy recipe
        skipped = [m for m in GREEDY_ONLY if m in methods]
        _warn(f"warning: {', '.join(skipped)} run in a greedy bench only; skipping them in a sampling bench")
        methods = tuple(m for m in methods if m not in GREEDY_ONLY)
    answers = bench_answers(opts.tasks, opts.prompts_per_task, opts.seed)  # UsageError before loading
    # the plot needs matplotlib, the oracle the calibration code (the calibrate extra): fail now, not after the run
    import matplotlib  # noqa: F401

    oracle = importlib.import_module(".oracle", __package__) if any(m in methods for m in SIMULATED) else None
    loaded = sb.load(opts.model, device=opts.device, dtype=opts.dtype)
    eos = loaded.eos_token_ids
    artifact = artifact_sha = None
    if opts.artifact is not None:
        artifact = loaded.with_artifact(opts.artifact)  # the calibrated model
        artifact_sha = sha256_file(opts.artifact)
    elif any(m in methods for m in NEEDS_ARTIFACT):
        skipped = [m for m in NEEDS_ARTIFACT if m in methods]
        _warn(f"warning: no --artifact given; skipping {', '.join(skipped)} (run `specbound calibrate` to make one)")
        methods = tuple(m for m in methods if m not in NEEDS_ARTIFACT)
    cost = oracle.cost_model(artifact) if any(m in methods for m in SIMULATED) else None  # both need the artifact's
    if cost is None:
        methods = tuple(m for m in methods if m not in SIMULATED)
    oracle_replay = oracle.oracle_setup(loaded, artifact, cost) if "oracle" in methods else None
    limit_cost = cost if "limit" in methods else None
    decoders = {"specbound-paper": Decoder(loaded)}
    if "specbound" in methods:
        decoders["specbound"] = Decoder(artifact)
    decoder = decoders["specbound-paper"]
    chat = decoder.has_chat_template
    compiled = compile_warm_up = None
    if COMPILED in methods:
        first = answers[0]
        ids = decoder.encode([{"role": "user", "content": first.prompt.turns[first.turn]}], chat, opts.max_new_tokens).ids
        try:
            compiled, compile_warm_up = compiled_reference(opts.model, opts.device, opts.dtype, list(ids), eos, WARMUP_TOKENS)
        except CompileUnavailable as exc:
            _warn(f"warning: skipping {COMPILED}: {exc}")
            methods = tuple(m for m in methods if m != COMPILED)
    ort = None
    if any(m in methods for m in PEERS):
        try:
            ort = ort_peer(loaded.source, loaded.fingerprint, cache_root())
        except PeerUnavailable as exc:
            _warn(f"warning: skipping {', '.join(m for m in PEERS if m in methods)}: {exc}")
            methods = tuple(m for m in methods if m not in PEERS)
    runner = MethodRunner(loaded.model, eos, decoders, mode, compiled, ort)
    ee_grid = early_exit_layers(int(loaded.fingerprint.num_layers)) if "hf-early-exit" in methods else ()

    timed: list[Variant] = []  # run every repeat; hf-early-exit runs in repeat 0 only
    for m in methods:
        if m == "hf-prompt-lookup":
            timed += [Variant(m, k) for k in opts.prompt_lookup_grid]
        elif m != "hf-early-exit" and m not in SIMULATED:
            timed.append(Variant(m))
    settings = bench_settings(opts, methods, loaded, artifact_sha, answers)
    out_dir = opts.out or default_out_dir(loaded.fingerprint, settings_hash(settings))
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(answers) * (opts.repeats * len(timed) + (1 if ee_grid else 0)) + len(ee_grid)
    with MeasurementLog.open(out_dir / MEASUREMENTS_FILE, settings) as log:
        if log.loaded:
            _warn(f"resuming: {log.loaded} of {total} measurements already in {log.path}")
        warm_up = timed + [Variant("hf-early-exit", layer) for layer in ee_grid[:1]]
        with tqdm(total=total, initial=log.loaded, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True, disable=not show_progress) as bar:
            walked = _measure_all(
                _Measurer(runner, log, warm_up, bar, opts.sample_seed), answers, timed, ee_grid, opts.repeats,
                lambda messages: decoder.encode(messages, chat, opts.max_new_tokens), loaded.tokenizer, reference,
            )
        encodings, ee_variant = walked.encodings, walked.early_exit
        # from here on, every figure comes from the log: the same whether or not the run resumed
        variants = timed + ([ee_variant] if ee_variant is not None else [])
        runs = {
            v.name: [
                [log.get(MeasurementKey("timed", a.index, v, r)) for r in range(1 if v.method == "hf-early-exit" else opts.repeats)]
                for a in answers
            ]
            for v in variants
        }
        grid_times = {layer: log.get(_grid_key(layer)).wall_time_s for layer in ee_grid}

    if mode.do_sample:  # samples differ token by token; their distribution is checked instead
        exact = {name: [None] * len(answers) for name in runs}
        pits = distribution_check(loaded.model, mode, runs, encodings, answers)
    else:
        exact = {
            name: [answer_divergence(loaded.model, encodings[a.index].ids, a, runs[name][a.index], runs[reference][a.index][0]) for a in answers]
            for name in runs
        }
        pits = None
    oracle_recs = [oracle.oracle_record(oracle_replay, encodings[a.index].ids, runs[reference][a.index][0].generation.token_ids) for a in answers] if oracle_replay else []

    grid_report: dict = {}
    if ee_variant is not None:
        grid_report["hf-early-exit"] = {
            "layers": list(ee_grid),
            "first_answer_wall_time_s": {str(k): round(v, 4) for k, v in grid_times.items()},
            "chosen": ee_variant.value,
            "rule": "fastest on the first answer; then run once per answer (repeat 0 only)",
        }
    # the prompt-lookup value with the least total time over the run stands for the method
    pl_variants = [v for v in timed if v.method == "hf-prompt-lookup"]
    chosen_pl = None
    if pl_variants:
        totals = {v: sum(x.wall_time_s for a in runs[v.name] for x in a) for v in pl_variants}
        chosen_pl = min(pl_variants, key=lambda v: (totals[v], v.value))
        grid_report["hf-prompt-lookup"] = {
            "values": list(opts.prompt_lookup_grid),
            "total_wall_time_s": {v.name: round(t, 4) for v, t in totals.items()},
            "chosen": chosen_pl.value,
            "rule": "least total wall time over all answers and repeats",
        }
    reported = {}
    for m in methods:
        if m == "hf-prompt-lookup":
            reported[m] = chosen_pl.name
        elif m == "hf-early-exit":
            reported[m] = ee_variant.name
        elif m not in SIMULATED:
            reported[m] = m

    groups = {task: [a.index for a in answers if a.task == task] for task in opts.tasks}
    groups["overall"] = [a.index for a in answers]
    summary: dict = {}
    for group, idx in groups.items():
        row = {m: summarise(runs[name], runs[reference], exact[name], idx) for m, name in reported.items()}
        if pits is not None:
            for m, name in reported.items():
                row[m].update(exact=None, exact_answers=None, **pooled_check(pits[name], idx))
        if "ar" in reported:
            for m in row:
                row[m]["speedup_vs_ar"] = relative_speed(row[m], row["ar"])
        if oracle_replay is not None:
            sim = oracle.oracle_simulate(oracle_replay, [oracle_recs[i] for i in idx])
            row["oracle"] = oracle.oracle_row(sim, row)
        if limit_cost is not None:
            w_max = artifact.policy.w_max
            sim = oracle.limit_simulate(limit_cost, w_max, [runs[reference][i][0].generation.new_tokens for i in idx])
            row["limit"] = oracle.limit_row(sim, w_max, row)
        summary[group] = row
    worst = worst_tasks(summary, opts.tasks)
    for m, w in worst.items():
        summary["overall"][m]["worst_task"] = w
    for v in pl_variants + ([ee_variant] if ee_variant else []):
        grid_report.setdefault("by_value", {})[v.name] = summarise(runs[v.name], runs[reference], exact[v.name], groups["overall"])

    fp = loaded.fingerprint
    results = {
        "command": opts.command,
        "model": {"spec": opts.model, "source": loaded.source, "short": fp.short(), "fingerprint": fp.to_dict()},
        # SpecBound's one-time set-up at load (prepacking, the path measurement), apart from every timed answer
        "kernels": dataclasses.asdict(loaded.kernels.report),
        # hf-greedy-compiled's one-time costs (loading its copy, compiling), apart from every timed answer
        "compiled_warm_up": None if compile_warm_up is None else compile_warm_up.to_dict(),
        # ort-genai's one-time costs (its ONNX export, made once per checkpoint and cached; loading it)
        "peers_warm_up": None if ort is None else {"ort-genai": ort.warm_up.to_dict()},
        "artifact": None if artifact is None else {"path": str(opts.artifact), "sha256": artifact_sha, "policy": artifact.policy.to_dict()},
        "settings": {
            "tasks": list(opts.tasks),
            "methods": list(methods),
            "prompts_per_task": opts.prompts_per_task,
            "answers": len(answers),
            "max_new_tokens": opts.max_new_tokens,
            "repeats": opts.repeats,
            "seed": opts.seed,
            "chat_template": chat,
            "prompt_lookup_grid": list(opts.prompt_lookup_grid),
            "early_exit_grid": list(ee_grid),
            "settings_hash": log.settings_hash,
            "reference": reference,
            "decoding": mode.describe(),
            "sample_seed": opts.sample_seed if mode.do_sample else None,
        },
        "machine": _machine(),
        "versions": library_versions(BENCH_LIBRARIES),
        "grid": grid_report,
        "summary": summary,
        "worst_task": worst,
        "out_dir": str(out_dir),
    }
    table = render_table(results)
    files = write_outputs(out_dir, results, table, answers, runs, reported, loaded.tokenizer)
    return BenchOutcome(results=results, table=table, out_dir=out_dir, files=(log.path, *files))


def distribution_check(model, mode, runs: dict, encodings, answers) -> dict[str, list]:
    """Per variant and answer, the PIT values of its first repeat's tokens (bench.distribution)."""
    from specbound_runtime.generation import prepared_by_generate

    from .distribution import pit_values

    _, processors = prepared_by_generate(model, mode)
    return {
        name: [
            pit_values(model, processors, encodings[a.index].ids, per_answer[a.index][0].generation.token_ids, seed=a.index)
            for a in answers
        ]
        for name, per_answer in runs.items()
    }


def pooled_check(pits: list, idx: list[int]) -> dict:
    """The distribution check's p-value over the answers `idx`, pooled (bench.distribution)."""
    import numpy as np

    from .distribution import uniformity_pvalue

    values = np.concatenate([pits[i].values for i in idx]) if idx else np.zeros(0)
    p = uniformity_pvalue(values)
    return {
        "distribution_pvalue": None if p is None else round(p, 4),
        "distribution_tokens": int(len(values)),
        "distribution_impossible": int(sum(pits[i].impossible for i in idx)),
    }

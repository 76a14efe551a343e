"""`specbound bench`: every decoding method on the same prompts, interleaved, timed on this machine.

Methods (`METHODS`), each on the same chat-templated prompts with the same token budget:

| method | what runs |
| --- | --- |
| hf-greedy | `model.generate(do_sample=False)`: the reference for speed and for tokens (always runs) |
| ar | our engine without speculation (`Decoder.generate(speculation=False)`) |
| hf-prompt-lookup | transformers `generate(prompt_lookup_num_tokens=k)`, k in `PROMPT_LOOKUP_GRID` |
| hf-early-exit | transformers `generate(assistant_early_exit=layer)`, layer from `EARLY_EXIT_FRACTIONS` |
| specbound-paper | our runtime with the paper's default schedule (no artifact) |
| specbound | our runtime with the calibrated `--artifact` (skipped, with a warning, without one) |
| oracle | not run: the simulator's bound for the artifact's drafts with every exit decided perfectly |

Interleaving: for each answer, every method runs in turn, and that is repeated `repeats` times;
the method order rotates by one each repeat. Machine drift then hits all methods alike. Each
method first generates `WARMUP_TOKENS` tokens once, untimed (first-call allocations).

Grids. hf-prompt-lookup runs every k of the grid on every answer and repeat; the one reported is
the k with the least total wall time over the whole run (the others are in results.json under
`grid`; picking the best of two after the fact flatters it slightly). hf-early-exit is 2.5-6x
slower than greedy on a 2-core CPU (0.17x-0.39x on SmolLM2), so its cost is capped: each grid
layer generates the first answer once, the fastest layer is kept, and that layer then runs once
per answer (repeat 0 only; its "median" is that one run).

Answers. `prompts_per_task` is a count of answers: MT-Bench is multi-turn, so it takes
ceil(N / 2) questions and answers both turns (turn 2 is asked after the model's own first answer:
the hf-greedy reference text, identical for every exact method). Other tasks take N prompts.

What is reported, per task and overall, per method:
  - tokens/s: new tokens / median over repeats of the task's wall time (sum over its answers);
  - speedup: median wall time of hf-greedy / median wall time of the method (same run);
  - mean accepted length: new tokens / verification passes, the full model's own token counted
    (plain decoding scores 1.00). For transformers' assisted methods, the passes are counted with
    a forward pre-hook on the model (full-depth calls only; early-exit draft calls run with fewer
    layers and are skipped), and per-pass lengths and drafted counts are read from the cache
    length and input width of each call; where that fails it says n/a;
  - acceptance rate: accepted drafts / drafted tokens (n/a without drafts);
  - exactness: the share of answers whose token ids equal hf-greedy's in every repeat; for any
    that differ, the first divergence and the logit margin there (exactness.divergence).
The oracle: for each answer, the per-layer statistics of the reference output are recorded with
`collect.record_sequence` (the artifact's exit head, candidate layers = its check layers), then
replayed through `simulate` under the artifact's cost model, once with `decide_exits` (the
simulator's prediction for the calibrated policy) and once with `oracle_exits`. Both are
speedups over our plain engine (`ar`); `specbound`'s measured speedup over `ar` is set beside them.

Default size and its time arithmetic (2-core CPU, SmolLM2-135M, fp32; plain greedy ~29 tok/s,
so one 128-token answer takes T ~ 4.5 s). Per answer and repeat: hf-greedy 1.0 T, ar 1.0 T,
hf-prompt-lookup 2 x ~1.0 T (0.93x-1.5x of greedy), specbound-paper ~1.7 T (0.59x, measured by
`calibrate`), specbound ~1.05 T (0.96x): ~6.8 T; x 3 repeats = 20.4 T. hf-early-exit once at its
best layer: ~2.6 T (0.39x). The oracle's teacher-forced recording: ~0.05 T. So ~23 T ~ 104 s per
answer. With `DEFAULT_PROMPTS_PER_TASK` = 2 answers per task (MT-Bench: 1 question, both turns),
6 tasks give 12 answers ~ 21 min, plus the early-exit grid on the first answer (layers 15 and 22
of 30 at 0.17x-0.39x: ~8.5 T ~ 38 s), warm-up (~5 s) and loading: ~22 min < 30 min. Three per
task would give 19 answers (MT-Bench: 2 questions) ~ 33 min. Answers that stop at EOS earlier
only make it shorter.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specbound.data.tasks import TASKS, TaskPrompt, task_prompts, task_size
from specbound_runtime.errors import UsageError
from specbound_runtime.files import atomic_write_bytes

from . import collect as C
from .simulate import CostModel, Lookups, decide_exits, oracle_exits, simulate

METHODS = ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound", "oracle")
REFERENCE = "hf-greedy"
NEEDS_ARTIFACT = ("specbound", "oracle")
PROMPT_LOOKUP_GRID = (3, 10)
EARLY_EXIT_FRACTIONS = (15 / 30, 22 / 30)  # layers 15 and 22 of SmolLM2's 30, scaled to depth
DEFAULT_PROMPTS_PER_TASK = 2
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


def early_exit_layers(num_layers: int) -> tuple[int, ...]:
    """`EARLY_EXIT_FRACTIONS` of the depth, within 1..L-1."""
    return tuple(sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in EARLY_EXIT_FRACTIONS}))


@dataclass(frozen=True)
class BenchOptions:
    model: str = "smollm2-135m"
    artifact: Path | None = None
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repeats: int = DEFAULT_REPEATS
    prompts_per_task: int = DEFAULT_PROMPTS_PER_TASK
    out: Path | None = None
    seed: int = 0  # which prompts of each task (data.tasks' seeded subsets)
    prompt_lookup_grid: tuple[int, ...] = PROMPT_LOOKUP_GRID
    command: str | None = None  # the command line, recorded in results.json

    def validate(self) -> None:
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
class Answer:
    """One generation to benchmark: a turn of a task prompt."""

    index: int
    task: str
    prompt: TaskPrompt
    turn: int


@dataclass(frozen=True)
class Run:
    """One timed generation. Statistics a method cannot report are None."""

    token_ids: tuple[int, ...]
    wall_time_s: float
    accept_lengths: tuple[int, ...] | None  # per verification pass, the full model's token counted
    passes: int | None
    drafted: int | None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def accepted(self) -> int | None:
        return None if self.passes is None else self.new_tokens - self.passes


@dataclass
class BenchOutcome:
    results: dict
    table: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)


# -- answers ---------------------------------------------------------------------------------------


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


# -- running one method ----------------------------------------------------------------------------


class _VerifyPasses:
    """Counts the full-depth forward calls of transformers' (assisted) generation: one per
    verification pass. Early-exit draft calls run with config.num_hidden_layers lowered and are
    skipped. Records (input width, cache length) per pass."""

    def __init__(self, model):
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        self.calls: list[tuple[int | None, int | None]] = []

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def _hook(self, module, args, kwargs):
        if int(module.config.num_hidden_layers) != self.num_layers:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        length = None
        if cache is not None and hasattr(cache, "get_seq_length"):
            length = int(cache.get_seq_length())
        self.calls.append((None if ids is None else int(ids.shape[-1]), length))
        return None


def _pass_statistics(calls, prompt_len: int, new_tokens: int) -> tuple[tuple[int, ...] | None, int | None, int | None]:
    """(accept lengths per pass, passes, drafted) from the recorded full-depth calls.

    Before pass i > 0 the cache holds every committed token but the last, which is the call's
    first input; so the tokens committed before pass i are cache length + 1 (the prompt before
    pass 0), and the rest of a call's inputs are drafts."""
    passes = len(calls) or None
    if not calls:
        return None, None, None
    try:
        bounds = [prompt_len] + [c[1] + 1 for c in calls[1:]] + [prompt_len + new_tokens]
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        drafted = [calls[0][0] - prompt_len] + [c[0] - 1 for c in calls[1:]]
    except TypeError:  # a call without input ids or cache length
        return None, passes, None
    if sum(lengths) != new_tokens or min(lengths) < 1 or min(drafted) < 0:
        return None, passes, None
    return lengths, passes, sum(drafted)


def _hf_generate(model, prompt_ids, max_new_tokens, eos, count_passes: bool, **kwargs) -> Run:
    from specbound_runtime.exactness import reference_greedy

    counter = _VerifyPasses(model) if count_passes else None
    if counter is not None:
        counter.__enter__()
    try:
        started = time.perf_counter()
        tokens = tuple(reference_greedy(model, list(prompt_ids), max_new_tokens, eos, **kwargs))
        wall = time.perf_counter() - started
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    if counter is None:  # plain greedy: one pass per token, no drafts
        return Run(tokens, wall, (1,) * len(tokens), len(tokens), 0)
    lengths, passes, drafted = _pass_statistics(counter.calls, len(prompt_ids), len(tokens))
    return Run(tokens, wall, lengths, passes, drafted)


def _engine_run(decoder, encoded, speculation: bool) -> Run:
    r = decoder.generate(encoded, speculation=speculation)
    return Run(tuple(r.token_ids), r.wall_time_s, tuple(r.accept_lengths), r.verify_passes, r.drafted)


@dataclass(frozen=True)
class _Variant:
    """A runnable configuration: a method and its grid value, if any."""

    method: str
    value: int | None = None

    @property
    def name(self) -> str:
        if self.method == "hf-prompt-lookup":
            return f"hf-prompt-lookup(k={self.value})"
        if self.method == "hf-early-exit":
            return f"hf-early-exit(layer={self.value})"
        return self.method


class _Runner:
    def __init__(self, loaded, eos, decoders: dict):
        self.model = loaded.model
        self.eos = tuple(eos)
        self.decoders = decoders

    def run(self, variant: _Variant, encoded, max_new_tokens: int | None = None) -> Run:
        n = encoded.max_new_tokens if max_new_tokens is None else min(max_new_tokens, encoded.max_new_tokens)
        if n != encoded.max_new_tokens:
            encoded = type(encoded)(ids=encoded.ids, max_new_tokens=n, clamped=encoded.clamped)
        m = variant.method
        if m == "hf-greedy":
            return _hf_generate(self.model, encoded.ids, n, self.eos, False)
        if m == "hf-prompt-lookup":
            return _hf_generate(self.model, encoded.ids, n, self.eos, True, prompt_lookup_num_tokens=variant.value)
        if m == "hf-early-exit":
            return _hf_generate(self.model, encoded.ids, n, self.eos, True, assistant_early_exit=variant.value)
        if m == "ar":
            return _engine_run(self.decoders["specbound-paper"], encoded, speculation=False)
        return _engine_run(self.decoders[m], encoded, speculation=True)


# -- the oracle's recordings -----------------------------------------------------------------------


@dataclass(frozen=True)
class _OracleSetup:
    lm: object
    heads: dict
    layers: tuple[int, ...]
    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    d_max: int
    w_max: int
    cost: CostModel
    lookup_ngram: int = 0
    lookup_max: int = 0


def _oracle_setup(loaded, artifact) -> _OracleSetup | None:
    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.exit_head import ExitHeadWeights, FittedExitHead

    raw = artifact.metadata.get("cost_model")
    try:
        cost = CostModel(**json.loads(raw))
    except (TypeError, ValueError):
        _warn("warning: the artifact has no usable cost_model metadata; skipping oracle (recalibrate to get one)")
        return None
    lm = HFCausalLM(loaded.model)
    weights = artifact.exit_weights
    shortlist = weights.shortlist if weights is not None and weights.shortlist is not None else torch.arange(lm.vocab_size)
    lens = weights.lens if weights is not None else {}
    # as write_records builds them; "lens" is exactly the runtime's exit head for this artifact
    heads = {
        "plain": FittedExitHead(ExitHeadWeights(shortlist, {}), lm.normed, lm.lm_head_weight, lm.softcap),
        "lens": FittedExitHead(ExitHeadWeights(shortlist, lens), lm.normed, lm.lm_head_weight, lm.softcap),
    }
    active = artifact.policy.active_checks
    return _OracleSetup(
        lm=lm,
        heads=heads,
        layers=tuple(l for l, _, _ in active),
        temperatures=tuple(t for _, t, _ in active),
        thresholds=tuple(p for _, _, p in active),
        d_max=artifact.policy.d_max,
        w_max=artifact.policy.w_max,
        cost=cost,
        lookup_ngram=artifact.policy.lookup_ngram,
        lookup_max=artifact.policy.lookup_max,
    )


def _oracle_record(setup: _OracleSetup, prompt_ids, answer_ids) -> dict:
    seq = C.RecordedSequence("bench", False, True, tuple(prompt_ids) + tuple(answer_ids), len(prompt_ids) - 1)
    rec = C.record_sequence(setup.lm, setup.heads, seq, setup.layers)
    h = C.HEADS.index("lens")
    out = {"conf": rec["conf"][:, h], "right": rec["right"][:, h], "tokens": len(answer_ids)}
    if setup.lookup_ngram:
        k = len(rec["final"])
        rows = C.Records(np.zeros(k, np.int32), np.zeros(k, bool), np.ones(k, bool), rec["final"], rec["right"], rec["conf"], setup.layers)
        rows = C.with_lookups(rows, [seq])
        g = C.LOOKUP_NGRAMS.index(setup.lookup_ngram)
        out["lookup_proposed"], out["lookup_right"] = rows.lookup_proposed[:, g], rows.lookup_right[:, g]
    return out


def _oracle_simulate(setup: _OracleSetup, recs: list[dict]) -> dict | None:
    recs = [r for r in recs if r["tokens"] > 0]
    if not recs:
        return None
    conf = np.concatenate([r["conf"] for r in recs])
    right = np.concatenate([r["right"] for r in recs])
    bounds, offset = [], 0
    for r in recs:
        bounds.append((offset, offset + r["tokens"]))
        offset += len(r["conf"])
    columns = list(range(len(setup.layers)))
    layers = list(setup.layers)
    policy = decide_exits(conf, right, columns, layers, list(setup.temperatures), list(setup.thresholds))
    oracle = oracle_exits(right, columns, layers)
    lookups = None
    if setup.lookup_ngram:
        lookups = Lookups(
            np.concatenate([r["lookup_proposed"] for r in recs]), np.concatenate([r["lookup_right"] for r in recs])
        )
    sim = dict(lookups=lookups, lookup_max=setup.lookup_max)
    return {
        "predicted": simulate(policy, bounds, setup.cost, setup.d_max, setup.w_max, **sim).to_dict(),
        "oracle": simulate(oracle, bounds, setup.cost, setup.d_max, setup.w_max, **sim).to_dict(),
    }


# -- the run ---------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _library_versions() -> dict[str, str]:
    from .pipeline import library_versions

    return library_versions(("specbound", "torch", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib", "tqdm"))


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def default_out_dir(fingerprint, opts: BenchOptions, artifact_sha: str | None) -> Path:
    """runs/bench-<model>-<hash of the settings>: the same settings write the same folder."""
    key = json.dumps(
        [list(opts.tasks), list(opts.methods), opts.prompts_per_task, opts.max_new_tokens, opts.repeats, opts.seed, artifact_sha]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return Path("runs") / f"bench-{fingerprint.model_type}-L{fingerprint.num_layers}-{fingerprint.weights_sha256[:8]}-{digest}"


def run_bench(opts: BenchOptions, show_progress: bool = True) -> BenchOutcome:
    """Run the benchmark, write results.json, table.md, speedup.png and <method>.jsonl."""
    from tqdm import tqdm

    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import divergence
    from specbound_runtime.models import eos_token_ids, resolve_model

    opts.validate()
    methods = tuple(m for m in METHODS if m in opts.methods or m == REFERENCE)
    answers = bench_answers(opts.tasks, opts.prompts_per_task, opts.seed)  # UsageError before loading
    loaded = resolve_model(opts.model)
    eos = eos_token_ids(loaded)
    artifact = artifact_sha = None
    if opts.artifact is not None:
        from specbound_runtime.artifact import load_artifact

        artifact = load_artifact(opts.artifact, loaded.fingerprint, loaded.tokenizer_fingerprint)
        artifact_sha = _sha256_file(Path(opts.artifact))
    elif any(m in methods for m in NEEDS_ARTIFACT):
        skipped = [m for m in NEEDS_ARTIFACT if m in methods]
        _warn(f"warning: no --artifact given; skipping {', '.join(skipped)} (run `specbound calibrate` to make one)")
        methods = tuple(m for m in methods if m not in NEEDS_ARTIFACT)
    oracle = _oracle_setup(loaded, artifact) if "oracle" in methods else None
    if oracle is None:
        methods = tuple(m for m in methods if m != "oracle")
    decoders = {"specbound-paper": Decoder(loaded.model, loaded.tokenizer, eos)}
    if "specbound" in methods:
        decoders["specbound"] = Decoder(loaded.model, loaded.tokenizer, eos, artifact.policy, artifact.exit_weights)
    runner = _Runner(loaded, eos, decoders)
    decoder = decoders["specbound-paper"]
    chat = decoder.has_chat_template
    L = int(loaded.fingerprint.num_layers)
    ee_grid = early_exit_layers(L) if "hf-early-exit" in methods else ()

    timed: list[_Variant] = []  # run every repeat; hf-early-exit runs in repeat 0 only
    for m in methods:
        if m == "hf-prompt-lookup":
            timed += [_Variant(m, k) for k in opts.prompt_lookup_grid]
        elif m not in ("hf-early-exit", "oracle"):
            timed.append(_Variant(m))
    per_answer = opts.repeats * len(timed) + (1 if ee_grid else 0)
    total = len(answers) * per_answer + len(ee_grid)
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True, disable=not show_progress)

    runs: dict[str, list[list[Run]]] = {}
    exact: dict[str, list[dict | None]] = {}
    oracle_recs: list[dict] = []
    ee_variant = None
    grid_report: dict = {}
    contexts: dict[str, list[dict]] = {}  # per prompt id: the conversation so far

    for answer in answers:
        messages = contexts.setdefault(answer.prompt.id, [])
        messages.append({"role": "user", "content": answer.prompt.turns[answer.turn]})
        encoded = decoder.encode(messages, chat, opts.max_new_tokens)
        if answer.index == 0:
            variants = timed + [_Variant("hf-early-exit", layer) for layer in ee_grid[:1]]
            for v in variants:  # warm-up, untimed
                runner.run(v, encoded, WARMUP_TOKENS)
            if ee_grid:
                grid_times = {}
                for layer in ee_grid:
                    bar.set_postfix_str(f"{answer.task}: early-exit grid, layer {layer}")
                    r = runner.run(_Variant("hf-early-exit", layer), encoded)
                    grid_times[layer] = r.wall_time_s
                    bar.update(1)
                best = min(ee_grid, key=lambda layer: (grid_times[layer], layer))
                ee_variant = _Variant("hf-early-exit", best)
                grid_report["hf-early-exit"] = {
                    "layers": list(ee_grid),
                    "first_answer_wall_time_s": {str(k): round(v, 4) for k, v in grid_times.items()},
                    "chosen": best,
                    "rule": "fastest on the first answer; then run once per answer (repeat 0 only)",
                }
        this = {v.name: [] for v in timed}
        if ee_variant is not None:
            this[ee_variant.name] = []
        for r in range(opts.repeats):
            shift = r % len(timed)
            order = timed[shift:] + timed[:shift]
            if r == 0 and ee_variant is not None:
                order = order + [ee_variant]
            for v in order:
                bar.set_postfix_str(f"{answer.task} #{answer.index} rep {r + 1}: {v.name}")
                this[v.name].append(runner.run(v, encoded))
                bar.update(1)
        ref = this[REFERENCE][0]
        for name, answer_runs in this.items():
            runs.setdefault(name, []).append(answer_runs)
            bad = next((x for x in answer_runs if x.token_ids != ref.token_ids), None)
            div = None
            if bad is not None:
                d = divergence(loaded.model, list(encoded.ids), list(bad.token_ids), list(ref.token_ids))
                div = {"answer": answer.index, "question_id": answer.prompt.id, "turn": answer.turn, "position": d.position, "ours": d.ours, "reference": d.reference, "margin": d.margin, "describe": d.describe()}
            exact.setdefault(name, []).append(div)
        ref_text = loaded.tokenizer.decode(list(ref.token_ids), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": ref_text})
        if oracle is not None:
            oracle_recs.append(_oracle_record(oracle, encoded.ids, ref.token_ids))
    bar.close()

    # the prompt-lookup value with the least total time over the run stands for the method
    pl_names = [v.name for v in timed if v.method == "hf-prompt-lookup"]
    if pl_names:
        totals = {n: sum(x.wall_time_s for a in runs[n] for x in a) for n in pl_names}
        chosen = min(pl_names, key=lambda n: (totals[n], n))
        grid_report["hf-prompt-lookup"] = {
            "values": list(opts.prompt_lookup_grid),
            "total_wall_time_s": {n: round(t, 4) for n, t in totals.items()},
            "chosen": int(chosen.split("=")[1].rstrip(")")),
            "rule": "least total wall time over all answers and repeats",
        }
    reported = {}
    for m in methods:
        if m == "hf-prompt-lookup":
            reported[m] = chosen
        elif m == "hf-early-exit":
            reported[m] = ee_variant.name
        elif m != "oracle":
            reported[m] = m

    groups = {task: [a.index for a in answers if a.task == task] for task in opts.tasks}
    groups["overall"] = [a.index for a in answers]
    summary: dict = {}
    for group, idx in groups.items():
        row = {}
        for m, name in reported.items():
            row[m] = _summarise(runs[name], runs[reported[REFERENCE]], exact[name], idx)
        if "ar" in reported:
            for m in row:
                row[m]["speedup_vs_ar"] = _ratio(row["ar"]["median_wall_time_s"], row[m]["median_wall_time_s"])
        if oracle is not None:
            sim = _oracle_simulate(oracle, [oracle_recs[i] for i in idx])
            row["oracle"] = _oracle_row(sim, row)
        summary[group] = row
    for name in pl_names + ([ee_variant.name] if ee_variant else []):
        grid_report.setdefault("by_value", {})[name] = _summarise(runs[name], runs[REFERENCE], exact[name], groups["overall"])

    fp = loaded.fingerprint
    out_dir = opts.out or default_out_dir(fp, opts, artifact_sha)
    results = {
        "command": opts.command,
        "model": {"spec": opts.model, "source": loaded.source, "short": fp.short(), "fingerprint": fp.to_dict()},
        "artifact": None if artifact is None else {"path": str(opts.artifact), "sha256": artifact_sha, "policy": _policy_dict(artifact.policy)},
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
        },
        "machine": _machine(),
        "versions": _library_versions(),
        "grid": grid_report,
        "summary": summary,
        "out_dir": str(out_dir),
    }
    table = render_table(results)
    files = write_outputs(out_dir, results, table, answers, runs, reported, loaded.tokenizer)
    return BenchOutcome(results=results, table=table, out_dir=out_dir, files=files)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def _policy_dict(p) -> dict:
    return {"check_layers": list(p.check_layers), "temperatures": [round(t, 6) for t in p.temperatures], "thresholds": [round(t, 6) for t in p.thresholds], "d_max": p.d_max, "w_max": p.w_max}


def _summarise(method_runs: list[list[Run]], ref_runs: list[list[Run]], exact: list[dict | None], idx: list[int]) -> dict:
    """Per-group figures of one method (see the module docstring for the definitions)."""
    n_rep = len(method_runs[idx[0]])
    wall = [sum(method_runs[i][r].wall_time_s for i in idx) for r in range(n_rep)]
    ref_wall = [sum(ref_runs[i][r].wall_time_s for i in idx) for r in range(len(ref_runs[idx[0]]))]
    first = [method_runs[i][0] for i in idx]
    tokens = sum(x.new_tokens for x in first)
    med, ref_med = statistics.median(wall), statistics.median(ref_wall)
    passes = [x.passes for x in first]
    drafted = [x.drafted for x in first]
    mal = tokens / sum(passes) if None not in passes and sum(passes) else None
    rate = None
    if None not in drafted and None not in passes and sum(drafted):
        rate = sum(x.accepted for x in first) / sum(drafted)
    divergences = [exact[i] for i in idx if exact[i] is not None]
    return {
        "answers": len(idx),
        "new_tokens": tokens,
        "repeats": n_rep,
        "wall_time_s": [round(w, 4) for w in wall],
        "median_wall_time_s": round(med, 4),
        "tokens_per_s": round(tokens / med, 3) if med > 0 else None,
        "speedup": _ratio(ref_med, med),
        "mean_accepted_length": None if mal is None else round(mal, 4),
        "acceptance_rate": None if rate is None else round(rate, 4),
        "drafted": None if None in drafted else sum(drafted),
        "exact": round(1 - len(divergences) / len(idx), 4),
        "exact_answers": len(idx) - len(divergences),
        "divergences": divergences,
    }


def _oracle_row(sim: dict | None, row: dict) -> dict:
    """The oracle's simulated figures, set beside what specbound measured."""
    if sim is None:
        return {"simulated": True, "speedup_vs_ar": None, "speedup": None}
    o, p = sim["oracle"], sim["predicted"]
    out = {
        "simulated": True,
        "speedup_vs_ar": round(o["speedup"], 4),
        "mean_accepted_length": round(o["mean_accepted_length"], 4),
        "acceptance_rate": round(o["acceptance_rate"], 4),
        "predicted_specbound": {"speedup_vs_ar": round(p["speedup"], 4), "mean_accepted_length": round(p["mean_accepted_length"], 4), "acceptance_rate": round(p["acceptance_rate"], 4)},
        "oracle_sim": o,
        "predicted_sim": p,
        # on the hf-greedy scale: the simulated speedup over ar times ar's measured speedup
        "speedup": round(o["speedup"] * row["ar"]["speedup"], 4) if "ar" in row and row["ar"]["speedup"] else None,
    }
    sb = row.get("specbound", {}).get("speedup_vs_ar")
    out["specbound_measured_speedup_vs_ar"] = sb
    out["specbound_over_oracle"] = _ratio(sb, o["speedup"]) if sb else None
    out["specbound_over_predicted"] = _ratio(sb, p["speedup"]) if sb else None
    return out


# -- output ----------------------------------------------------------------------------------------


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "%":
        return f"{value:.0%}"
    if kind == "tps":
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(results: dict) -> str:
    s = results["settings"]
    summary = results["summary"]
    groups = list(summary)
    methods = [m for m in METHODS if m in summary["overall"]]
    lines = [
        f"# specbound bench: {results['model']['short']}",
        "",
        f"{s['answers']} answers ({', '.join(s['tasks'])}; {s['prompts_per_task']} per task), "
        f"{s['max_new_tokens']} new tokens max, median of {s['repeats']} repeats, interleaved; "
        f"{results['machine']['cpu_count']} CPUs, {results['machine']['torch_threads']} torch threads.",
        "",
        "## Speedup over hf-greedy",
        "",
        "| method | " + " | ".join(groups) + " |",
        "| --- | " + " | ".join("---:" for _ in groups) + " |",
    ]
    for m in methods:
        label = m + (" (simulated)" if m == "oracle" else "")
        lines.append(f"| {label} | " + " | ".join(_fmt(summary[g].get(m, {}).get("speedup"), "x") for g in groups) + " |")
    lines += [
        "",
        "## Per task",
        "",
        "| task | method | tokens/s | speedup | mean accepted length | acceptance | exact |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in groups:
        for m in methods:
            if m == "oracle":
                continue
            r = summary[g][m]
            lines.append(
                f"| {g} | {m} | {_fmt(r['tokens_per_s'], 'tps')} | {_fmt(r['speedup'], 'x')} | "
                f"{_fmt(r['mean_accepted_length'], 'f')} | {_fmt(r['acceptance_rate'], '%')} | "
                f"{r['exact']:.0%} ({r['exact_answers']}/{r['answers']}) |"
            )
    if "oracle" in methods:
        lines += [
            "",
            "## Simulator: specbound against its prediction and the oracle (speedups over ar)",
            "",
            "| task | specbound measured | predicted | oracle | specbound / oracle | oracle mean accepted length |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for g in groups:
            o = summary[g]["oracle"]
            pred = (o.get("predicted_specbound") or {}).get("speedup_vs_ar")
            lines.append(
                f"| {g} | {_fmt(o.get('specbound_measured_speedup_vs_ar'), 'x')} | {_fmt(pred, 'x')} | "
                f"{_fmt(o.get('speedup_vs_ar'), 'x')} | {_fmt(o.get('specbound_over_oracle'), 'f')} | "
                f"{_fmt(o.get('mean_accepted_length'), 'f')} |"
            )
    notes = []
    grid = results["grid"]
    if "hf-prompt-lookup" in grid:
        notes.append(f"hf-prompt-lookup: k={grid['hf-prompt-lookup']['chosen']} of {grid['hf-prompt-lookup']['values']} (least total time).")
    if "hf-early-exit" in grid:
        notes.append(f"hf-early-exit: layer {grid['hf-early-exit']['chosen']} of {grid['hf-early-exit']['layers']} (fastest on the first answer), one run per answer.")
    if "oracle" in methods:
        notes.append("oracle: not run; the simulator replays the reference outputs under the artifact's cost model; its hf-greedy-scale speedup multiplies by ar's measured speedup.")
    notes.append("n/a: not reported by the method (or no drafts).")
    for m in methods:
        for d in summary["overall"].get(m, {}).get("divergences", []):
            notes.append(f"{m} NOT exact on {d['question_id']} turn {d['turn']}: {d['describe']}")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _spec_bench_records(answers: list[Answer], method_runs: list[list[Run]], tokenizer) -> list[dict]:
    """One record per question, Spec-Bench's answer shape; one choice per repeat."""
    records: dict[str, dict] = {}
    for a in answers:
        rec = records.setdefault(a.prompt.id, {"question_id": a.prompt.id, "category": a.task, "turns_asked": [], "choices": []})
        rec["turns_asked"].append(a.turn)
        for r, run in enumerate(method_runs[a.index]):
            if r == len(rec["choices"]):
                rec["choices"].append({"index": r, "turns": [], "new_tokens": [], "wall_time": [], "decoding_steps": [], "accept_lengths": []})
            c = rec["choices"][r]
            c["turns"].append(tokenizer.decode(list(run.token_ids), skip_special_tokens=True))
            c["new_tokens"].append(run.new_tokens)
            c["wall_time"].append(round(run.wall_time_s, 6))
            c["decoding_steps"].append(run.passes)
            c["accept_lengths"].extend(run.accept_lengths or [])
    out = []
    for rec in records.values():
        del rec["turns_asked"]
        out.append(rec)
    return out


def write_outputs(out_dir: Path, results: dict, table: str, answers, runs, reported, tokenizer) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for m, name in reported.items():
        path = out_dir / f"{m}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in _spec_bench_records(answers, runs[name], tokenizer)]
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
    methods = [m for m in METHODS if m in summary["overall"] and m != REFERENCE]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 5))
    for i, m in enumerate(methods):
        values = [summary[g].get(m, {}).get("speedup") or 0.0 for g in groups]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=m + (" (simulated)" if m == "oracle" else ""), hatch="//" if m == "oracle" else None)
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("speedup over hf-greedy")
    ax.set_title(f"{results['model']['short']}: {results['settings']['max_new_tokens']} tokens, median of {results['settings']['repeats']}")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)

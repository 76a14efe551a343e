"""`specbound calibrate`: collect, fit, tune, export. Every step's output lives in a work folder,
shard by shard, so an interrupted run resumes where it stopped and reproduces the same artifact,
and several workers (local processes, or other machines sharing the work folder and the study
storage) split the work without changing a byte of the result."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.artifact import Artifact, save_artifact
from specbound_runtime.decoder import token_ids
from specbound_runtime.errors import InputError, ModelError, UsageError
from specbound_runtime.files import atomic_write_bytes, library_versions, sha256_file
from specbound_runtime.policy import default_check_layers, paper_temperatures
from specbound_runtime.sampling import prompt_seed

from . import collect as C
from .corpus import NO_KIND, Corpus, load_corpus
from .fit import confidence_at, fit_paper_alpha, fit_temperature, metrics
from .job import job_digest, recorded_job
from .precision import RECORD_DTYPES, recording_model, round_bits
from .simulate import CostModel, guard_costs
from .study import check_storage_url, is_shared
from .tune import SEARCH_SPACE, Schedules, evaluate, evaluate_oracle, paper_candidate, score, tune

MIN_FIT_POSITIONS = 200  # below this, per-layer temperatures are not meaningful


@dataclass(frozen=True)
class CalibrateOptions:
    """Everything a calibration run takes. calibrate/job.py maps each field to a job-file key
    (and says which ones decide the artifact)."""

    model: str
    corpus: str = "default"
    out: Path | None = None
    seed: int = 0
    trials: int = 200
    storage: str | None = None
    study_name: str | None = None
    multi_objective: bool = False
    force: bool = False
    work_dir: Path | None = None
    prompts: int = 72  # the default corpus: 51 for fitting and tuning, held_out_per_kind of each kind
    held_out_per_kind: int = 3  # held-out prompts of each kind that tuning judges policies on
    documents: int = 64
    answer_tokens: int = 128
    chunk_tokens: int = 256
    shortlist_size: int = 4096
    held_out_fraction: float = 0.1
    measure_prompts: int = 7  # decoded for real after export, taken kind by kind
    measure_tokens: int = 128
    remeasure_costs: bool = False
    candidate_layers: tuple[int, ...] | None = None
    device: str | None = None  # where the model runs while recording (default cpu)
    dtype: str | None = None  # its dtype (default float32 on cpu)
    record_dtype: str | None = None  # "float64": record on a float64 copy (RECORD_DTYPES)
    model_fingerprint: str | None = None  # a pin: the weights' sha256, or a prefix of it
    corpus_sha256: dict | None = None  # pins: corpus file as written -> sha256
    trial_batch: int = 8  # trials proposed together (calibrate.study)
    workers: int = 1  # local worker processes
    costs_file: str | None = None  # a cost model pinned with `specbound costs`
    cost_model: dict | None = None  # a cost model given in memory (from an artifact or a parent)
    base_dir: Path | None = None  # where relative paths start (a job file's folder)
    # the decoding mode tuned for: greedy when all are None (calibrate --temperature/--top-p ...)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def mode(self):
        """The decoding mode tuned for, as requested (transformers fills in its defaults)."""
        from specbound_runtime.sampling import DecodingMode

        try:
            return DecodingMode.sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        except ValueError as e:
            raise UsageError(f"decoding mode: {e}") from None

    def validate(self) -> None:
        self.mode()
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.trials}")
        for name in ("prompts", "held_out_per_kind", "answer_tokens", "chunk_tokens", "shortlist_size", "trial_batch", "workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("documents", "measure_prompts", "measure_tokens"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise UsageError(f"--held-out-fraction must lie in (0, 1), got {self.held_out_fraction}")
        if self.record_dtype is not None and self.record_dtype not in RECORD_DTYPES:
            raise UsageError(f"--record-dtype must be one of {', '.join(RECORD_DTYPES)}, got {self.record_dtype!r}")
        if self.storage is not None:
            check_storage_url(self.storage)
        if self.workers > 1 and not is_shared(self.storage or "sqlite"):
            raise UsageError(
                f"{self.workers} workers need a study storage that several processes can write: "
                "a postgresql:// URL (SQLite serialises concurrent writers badly)"
            )

    def resolve(self, value: str | Path | None) -> Path | None:
        """A path as written, made absolute against base_dir (or left relative to the current folder)."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def candidate_layers(num_layers: int) -> tuple[int, ...]:
    """Layers worth recording as possible exit checks: the paper's defaults, and every other layer
    of the deeper half (shallower ones agree with the last layer too rarely to pay for a check)."""
    deep = range(math.ceil(num_layers / 2), num_layers, 2)
    return tuple(sorted(set(default_check_layers(num_layers)) | set(deep) | {num_layers - 1}))


def _bar(total, desc, unit, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True, disable=quiet)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _chat_ids(tokenizer, text: str) -> list[int]:
    """A corpus prompt as the model's user turn: through the chat template where there is one."""
    return token_ids(tokenizer, [{"role": "user", "content": text}], bool(getattr(tokenizer, "chat_template", None)))


ANSWER_BATCH = 8  # prompts answered together: a shard of answers (padding makes batches part of the result)
LENS_SHARD = 16  # lens-split sequences per pass-A shard (exact sums: any size gives the same lens)
RECORD_SHARD = 8  # sequences per pass-B shard


def answers_shard(model, tok, group, eos_ids, max_new_tokens: int, mode=None, seed: int = 0) -> bytes:
    """The model's own answers to one batch of prompts, as JSON lines {id, answer}: greedy, or
    under a sampling mode sampled (seeded by `seed`, torch's global generator restored after),
    so that the records follow the trajectories decoding in that mode takes."""
    from specbound_runtime.sampling import DecodingMode

    mode = mode or DecodingMode()
    pad = eos_ids[0] if eos_ids else 0
    encoded = [_chat_ids(tok, p.text) for p in group]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            ids, attention_mask=mask, **mode.generate_kwargs(), max_new_tokens=max_new_tokens,
            eos_token_id=list(eos_ids) or None, pad_token_id=pad,
        )
    lines = []
    for p, row in zip(group, out[:, width:].tolist()):
        answer = []
        for t in row:
            answer.append(int(t))
            if t in eos_ids:
                break
        lines.append(json.dumps({"id": p.id, "answer": answer}) + "\n")
    return "".join(lines).encode()


def read_answers(paths: list[Path]) -> dict[str, list[int]]:
    done = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["id"]] = row["answer"]
    return done


def build_sequences(loaded, corpus: Corpus, answers, chunk_tokens: int) -> list[C.RecordedSequence]:
    tok = loaded.tokenizer
    sequences = []
    for p in corpus.prompts:
        prompt_ids = _chat_ids(tok, p.text)
        answer = answers[p.id]
        if answer:
            sequences.append(C.RecordedSequence(p.id, p.held_out, True, tuple(prompt_ids + answer), len(prompt_ids) - 1))
    for d in corpus.documents:
        ids = [int(i) for i in tok(d.text)["input_ids"]][:chunk_tokens]
        if len(ids) >= 2:
            sequences.append(C.RecordedSequence(d.id, d.held_out, False, tuple(ids), 0))
    # lens split first, then calibration, then held-out; stable within each
    return sorted(sequences, key=lambda s: (s.held_out, not s.lens_split))


ARTIFACT_LIBRARIES = ("specbound", "torch", "transformers", "safetensors", "optuna", "numpy", "scipy", "datasets")


def fit_schedules(records: C.Records, num_layers: int) -> tuple[Schedules, dict]:
    """Per-layer temperatures and the paper's alpha, per head, on the fitting split; metrics on the
    held-out split: raw confidence (T = 1), the paper's schedule, and the fitted temperatures."""
    fit = records.select(~records.held_out)
    held = records.select(records.held_out)
    layers = records.layers
    fitted, alpha, report = {}, {}, {}
    for h, head in enumerate(C.HEADS):
        # fitted values keep STAT_BITS significant bits before anything uses them (calibrate.precision)
        temps = tuple(round_bits(fit_temperature(fit.conf[:, h, c], fit.right[:, h, c])) for c in range(len(layers)))
        a = round_bits(
            fit_paper_alpha([fit.conf[:, h, c] for c in range(len(layers))], [fit.right[:, h, c] for c in range(len(layers))], layers, num_layers)
        )
        fitted[head], alpha[head] = temps, a
        paper_t = paper_temperatures(a, layers, num_layers)
        rows = []
        n = len(fit.seq)
        for c, layer in enumerate(layers):
            y = held.right[:, h, c]
            # how many positions are enough: the same fit on the first quarter and half
            stability = {
                str(m): round(fit_temperature(fit.conf[:m, h, c], fit.right[:m, h, c]), 4) for m in (n // 4, n // 2) if m
            }
            stability[str(n)] = round(temps[c], 4)
            rows.append(
                {
                    "layer": layer,
                    "temperature": round(temps[c], 6),
                    "temperature_by_positions": stability,
                    "paper_temperature": round(float(paper_t[c]), 6),
                    "raw": metrics(confidence_at(held.conf[:, h, c], 1.0), y).to_dict(),
                    "paper": metrics(confidence_at(held.conf[:, h, c], float(paper_t[c])), y).to_dict(),
                    "fitted": metrics(confidence_at(held.conf[:, h, c], temps[c]), y).to_dict(),
                }
            )
        report[head] = {"alpha": round(a, 6), "layers": rows}
    return Schedules(layers=layers, num_layers=num_layers, fitted=fitted, alpha=alpha), report


def reliability_png(records: C.Records, schedules: Schedules, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    held = records.select(records.held_out)
    fig, axes = plt.subplots(1, len(C.HEADS), figsize=(6 * len(C.HEADS), 5), squeeze=False)
    for h, head in enumerate(C.HEADS):
        ax = axes[0][h]
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for c, layer in enumerate(records.layers):
            if c % max(1, len(records.layers) // 4) and c != len(records.layers) - 1:
                continue
            y = held.right[:, h, c]
            if not len(y):
                continue
            p_paper = confidence_at(held.conf[:, h, c], schedules.temperatures(head, "paper-fitted")[c])
            p_fit = confidence_at(held.conf[:, h, c], schedules.fitted[head][c])
            # calibration_curve returns (observed agreement, mean confidence) of the non-empty bins
            agree, conf = calibration_curve(y, p_fit, n_bins=10, pos_label=True)
            line = ax.plot(conf, agree, "o-", label=f"layer {layer} fitted")[0]
            agree, conf = calibration_curve(y, p_paper, n_bins=10, pos_label=True)
            ax.plot(conf, agree, "x--", color=line.get_color(), alpha=0.6, label=f"layer {layer} paper")
        ax.set_title(f"held-out reliability, {head} head")
        ax.set_xlabel("confidence")
        ax.set_ylabel("agreement with the last layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def pareto_png(pareto: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["waste"] for p in pareto], [p["speedup"] for p in pareto], "o-")
    ax.set_xlabel("rejected drafts per emitted token")
    ax.set_ylabel("simulated speedup")
    ax.set_title("Pareto front: speed vs waste")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


@dataclass
class CalibrationOutcome:
    artifact: Path
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A run's resolved inputs: the loaded model, the corpus, the recorded job, where things go,
    the study and the cost model. Every worker of a job resolves the same plan."""

    opts: CalibrateOptions
    loaded: Any
    layers: tuple[int, ...]
    corpus: Corpus
    job: dict
    work: Path
    out: Path
    storage: str
    study_name: str
    cost: CostModel
    mode: Any = None  # the decoding mode tuned for, as generate() resolves it (DecodingMode)
    warpers: Any = None  # under sampling: the processors generate() applies (scoring p and q)

    @property
    def num_layers(self) -> int:
        return self.loaded.lm.num_layers


def _model_source(opts: CalibrateOptions) -> str:
    """A model name as written: a path when one exists under base_dir, else a built-in name."""
    candidate = opts.resolve(opts.model)
    return str(candidate) if candidate is not None and candidate.exists() else opts.model


def _corpus_files(opts: CalibrateOptions) -> tuple[str, dict[str, str]]:
    """The corpus spec with paths resolved, and each file's sha256 (keyed as written), checked
    against the job's pins."""
    if opts.corpus == "default":
        if opts.corpus_sha256:
            raise InputError("[corpus] sha256 pins files, but the corpus is `default`")
        return "default", {}
    written = [p for p in opts.corpus.split(",") if p]
    pins = dict(opts.corpus_sha256 or {})
    unknown = sorted(set(pins) - set(written))
    if unknown:
        raise InputError(f"[corpus] sha256 pins {', '.join(unknown)}, which [corpus] files does not list")
    resolved, digests = [], {}
    for name in written:
        path = opts.resolve(name)
        resolved.append(str(path))
        if path.is_file():
            digests[name] = sha256_file(path)
            if name in pins and pins[name] != digests[name]:
                raise InputError(
                    f"corpus file {name} has sha256 {digests[name][:16]}..., not the pinned {pins[name][:16]}...; "
                    "restore the pinned file or update the pin"
                )
    return ",".join(resolved), digests  # a missing file is reported by load_corpus


def _storage_url(opts: CalibrateOptions, work: Path) -> str:
    if opts.storage is None:
        return f"sqlite:///{(work / 'study.db').resolve()}"
    url = opts.storage
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and opts.base_dir is not None:
        return f"sqlite:///{opts.resolve(url[len('sqlite:///'):]).resolve()}"
    return url


def prepare(opts: CalibrateOptions) -> Plan:
    """Load the model and corpus, resolve the job and check its pins, the work folder and the
    cost model: everything before collection."""
    import specbound_runtime as sb

    opts.validate()
    loaded = sb.load(_model_source(opts), device=opts.device, dtype=opts.dtype)
    fp = loaded.fingerprint
    if opts.model_fingerprint and not fp.weights_sha256.startswith(opts.model_fingerprint.lower()):
        raise ModelError(
            f"model {opts.model} has weights sha256 {fp.weights_sha256[:16]}..., not the job's pin "
            f"{opts.model_fingerprint[:16]}...; point [model] name at the pinned model or update the pin"
        )
    L = loaded.lm.num_layers
    if L < 3:
        raise InputError(f"the model has {L} layers; early exit needs at least 3")
    layers = tuple(opts.candidate_layers or candidate_layers(L))
    if any(not (1 <= l < L) for l in layers):
        raise UsageError(f"candidate layers must lie in 1..{L - 1}")
    spec, digests = _corpus_files(opts)
    corpus = load_corpus(spec, opts.prompts, opts.documents, opts.held_out_fraction, opts.seed, opts.held_out_per_kind)
    device = next(loaded.model.parameters()).device
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    job = recorded_job(opts, fingerprint=fp.weights_sha256, corpus_sha256=digests, layers=layers, device=device.type, dtype=dtype)
    # what the work folder's data depends on, and what the study's trials depend on
    collect_key = job_digest(
        {k: v for k, v in job.items() if k in ("model", "corpus", "collect", "decoding")}
        | {"seed": opts.seed, "records_format": C.RECORDS_FORMAT}
    )
    study_key = job_digest(
        {**job, "tuning": {k: v for k, v in job["tuning"].items() if k != "trials"}, "space": SEARCH_SPACE}
    )
    work = opts.resolve(opts.work_dir) or Path("runs") / f"calibrate-{fp.model_type}-L{L}-{collect_key[:12]}"
    out = opts.resolve(opts.out) or Path("artifacts") / f"{fp.model_type}-L{L}-{fp.weights_sha256[:8]}.safetensors"
    manifest = work / "manifest.json"
    want = {"collect": collect_key}
    if manifest.exists() and json.loads(manifest.read_text()) != want:
        raise UsageError(f"work folder {work} holds another calibration's data; pass another --work-dir or delete it")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(manifest, json.dumps(want, sort_keys=True).encode())
    mode, warpers = sampling_setup(loaded.model, opts.mode())
    cost = resolve_cost(opts, loaded, fp, warpers)
    # the default study is the job's under this cost model: costs measured again tune afresh
    # instead of meeting the old measurement's trials
    study_key = job_digest({"study": study_key, "cost": cost.to_dict()})
    return Plan(
        opts=opts, loaded=loaded, layers=layers, corpus=corpus, job=job, work=work, out=out,
        storage=_storage_url(opts, work), study_name=opts.study_name or f"specbound-{fp.model_type}-L{L}-{study_key[:12]}",
        cost=cost, mode=mode, warpers=warpers,
    )


def sampling_setup(model, requested):
    """The resolved decoding mode and, under sampling, the warpers generate() builds for it; only
    value-only warpers (temperature, top-k, top-p, min-p) score records, others are named and
    left out (the records would need each position's context)."""
    from specbound_runtime.generation import prepared_by_generate
    from specbound_runtime.sampling import VALUE_ONLY_WARPERS

    if not requested.do_sample:
        return requested, None
    mode, processors = prepared_by_generate(model, requested)
    skipped = [type(p).__name__ for p in processors if type(p).__name__ not in VALUE_ONLY_WARPERS]
    if skipped:
        _log(f"note: calibration scores sampling without {', '.join(skipped)} (from the generation config); decoding applies them")
    from transformers import LogitsProcessorList

    return mode, LogitsProcessorList([p for p in processors if type(p).__name__ in VALUE_ONLY_WARPERS])


def resolve_cost(opts: CalibrateOptions, loaded, fp, warpers=None) -> CostModel:
    """The cost model: given in memory, pinned in a file, or measured here (cached per machine;
    under sampling, measured with the sampling work: draft distributions and speculative
    acceptance)."""
    from .costs import read_pinned_costs

    if opts.cost_model is not None:
        return CostModel(**opts.cost_model)
    if opts.costs_file is not None:
        return read_pinned_costs(opts.resolve(opts.costs_file), fp, opts.shortlist_size)
    from specbound_runtime.models import cache_root

    return cached_cost(loaded.lm, fp, opts, cache_root(), warpers)


@dataclass(frozen=True)
class Collected:
    """What collection, fitting and tuning leave for the export."""

    weights: Any
    coverage: float
    sequences: list
    records: C.Records
    schedules: Schedules
    calibration: dict
    result: Any
    n_lens: int
    lm: HFCausalLM  # what recorded (calibrate.precision.recording_model)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _moments_shard(lm, group, layers, scale: float) -> bytes:
    import io

    total = None
    for seq in group:
        m = C.lens_moments(lm, seq, layers, scale)
        total = m if total is None else total + m
    buf = io.BytesIO()
    np.savez(buf, **total.to_npz())
    return buf.getvalue()


def collect_and_tune(plan: Plan, worker: int = 0, workers: int = 1, quiet: bool = False) -> Collected:
    """One worker's share of a job: collection shard by shard (each made once, by whichever
    worker claims it), then the fits, then tuning in the shared study. Every worker returns the
    same result."""
    from .workers import log_event, make_shards

    opts, loaded, layers, work = plan.opts, plan.loaded, plan.layers, plan.work
    # records come from the modules' own forwards (no prepacked kernels): the artifact must not
    # depend on which kernel path this machine picked (the cost model, measured on loaded.lm, is
    # what follows the kernels); in float64 on a copy where the job asks (calibrate.precision)
    model = recording_model(loaded.model, opts.record_dtype)
    lm, eos, L = HFCausalLM(model), loaded.eos_token_ids, plan.num_layers
    share = {"worker": worker, "workers": workers}
    log_event(work, f"worker {worker} of {workers} started")
    if not quiet:
        _log(f"calibrating {loaded.fingerprint.short()} on corpus {opts.corpus!r}; work folder {work}")

    # 1. collect: the model's own answers, then the lens moments (pass A), then the records (pass B)
    groups = _chunks(list(plan.corpus.prompts), ANSWER_BATCH)
    with _bar(len(plan.corpus.prompts), "own answers", "prompt", quiet) as bar:
        paths = make_shards(
            work / "answers", len(groups), ".jsonl",
            lambda i: answers_shard(model, loaded.tokenizer, groups[i], eos, opts.answer_tokens, plan.mode, prompt_seed(opts.seed, i)),
            progress=lambda i: bar.update(len(groups[i])), **share,
        )
    sequences = build_sequences(loaded, plan.corpus, read_answers(paths), opts.chunk_tokens)
    n_lens = sum(s.recorded for s in sequences if s.lens_split)
    n_fit = sum(s.recorded for s in sequences if not s.held_out and not s.lens_split)
    if min(n_lens, n_fit) < MIN_FIT_POSITIONS:
        raise InputError(
            f"the corpus gives {n_lens} lens-fitting and {n_fit} calibration positions; at least "
            f"{MIN_FIT_POSITIONS} of each are needed (add text or prompts)"
        )
    settings = C.CollectSettings(candidate_layers=layers, shortlist_size=opts.shortlist_size)
    lens_groups = _chunks([s for s in sequences if s.lens_split], LENS_SHARD)
    scale = C.embedding_scale(lm)  # of the weights alone: the same in every worker
    with _bar(n_lens, "pass A: lens moments", "tok", quiet) as bar:
        paths = make_shards(
            work / "pass_a", len(lens_groups), ".npz", lambda i: _moments_shard(lm, lens_groups[i], layers, scale),
            progress=lambda i: bar.update(sum(s.recorded for s in lens_groups[i])), **share,
        )
    moments = None
    for path in paths:  # int64: exact, so the order and the shards do not matter
        with np.load(path) as part:
            m = C.Moments(**{name: part[name] for name in part.files})
        moments = m if moments is None else moments + m
    weights = C.fit_exit_head(lm, moments, settings, eos, scale)
    coverage = C.shortlist_coverage(moments.counts, weights.shortlist)
    recorded = [s for s in sequences if not s.lens_split]
    record_groups = _chunks(recorded, RECORD_SHARD)
    heads = C.exit_heads(lm, weights)
    with _bar(sum(s.recorded for s in recorded), "pass B: per-layer records", "tok", quiet) as bar:
        paths = make_shards(
            work / "shards", len(record_groups), ".arrow",
            lambda i: C.records_shard(lm, heads, record_groups[i], i * RECORD_SHARD, layers, lambda n: None, plan.warpers),
            progress=lambda i: bar.update(sum(s.recorded for s in record_groups[i])), **share,
        )
    records = C.with_lookups(C.load_records(paths, layers), recorded)

    # 2. fit
    schedules, calibration = fit_schedules(records, L)

    # 3. tune, in the study every worker of this job shares
    data = hashlib.sha256()
    for path in paths:
        data.update(path.read_bytes())
    study_key = job_digest(
        {"job": {**plan.job, "tuning": {k: v for k, v in plan.job["tuning"].items() if k != "trials"}},
         "cost": plan.cost.to_dict(), "records": data.hexdigest(), "space": SEARCH_SPACE}
    )
    own = records.own if records.own.any() else np.ones_like(records.own)
    with _bar(opts.trials, "tuning (simulated)", "trial", quiet) as bar:
        result = tune(
            records.select(own & ~records.held_out), schedules, plan.cost, opts.trials, opts.seed, plan.storage,
            plan.study_name, opts.multi_objective, bar.update, batch=opts.trial_batch, job_key=study_key,
            held_out=held_out_kinds(records, recorded, plan.corpus), **share,
        )
    log_event(work, f"worker {worker} of {workers} finished: all {opts.trials} trials are in study {plan.study_name}")
    return Collected(weights, coverage, sequences, records, schedules, calibration, result, n_lens, lm)


def held_out_kinds(records: C.Records, recorded: list[C.RecordedSequence], corpus: Corpus) -> dict[str, C.Records]:
    """The held-out answers' records, by the kind of their prompt (records.seq indexes `recorded`)."""
    kind_of = {p.id: p.kind or NO_KIND for p in corpus.prompts if p.held_out}
    seq_kind = np.array([kind_of.get(s.id, "") if s.own and s.held_out else "" for s in recorded] + [""], dtype=object)
    kinds = seq_kind[np.minimum(records.seq, len(recorded))]
    names = sorted(set(kind_of.values()))
    return {k: records.select(kinds == k) for k in names if (kinds == k).any()}


def payload(plan: Plan) -> dict:
    """A plan's options for a worker process (through its stdin: the storage URL may hold a
    password), with everything it must not resolve differently made explicit."""
    opts = dataclasses.replace(
        plan.opts, out=plan.out.resolve(), work_dir=plan.work.resolve(), storage=plan.storage,
        study_name=plan.study_name, cost_model=plan.cost.to_dict(), force=True,
    )
    return {f.name: _plain(getattr(opts, f.name)) for f in dataclasses.fields(opts)}


def _plain(value):
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def options_from_payload(data: dict) -> CalibrateOptions:
    paths = {"out", "work_dir", "base_dir"}
    kwargs = {k: (Path(v) if k in paths and v is not None else v) for k, v in data.items() if k not in ("worker", "workers", "ready")}
    if kwargs.get("candidate_layers") is not None:
        kwargs["candidate_layers"] = tuple(kwargs["candidate_layers"])
    return CalibrateOptions(**kwargs)


def run_calibration(opts: CalibrateOptions) -> CalibrationOutcome:
    """Collect, fit, tune and export one artifact; with workers > 1, workers 1.. run as local
    processes beside this one (worker 0), sharing the work folder and the study."""
    from .workers import start_local_workers

    plan = prepare(opts)
    if plan.out.exists() and not opts.force:
        raise UsageError(f"{plan.out} already exists; pass --force to replace it or choose another --out")
    children = start_local_workers(payload(plan), opts.workers, plan.work) if opts.workers > 1 else []
    try:
        collected = collect_and_tune(plan, 0, opts.workers)
    finally:
        for child in children:
            if child.poll() is None and sys.exc_info()[0] is not None:
                child.terminate()
        codes = [child.wait() for child in children]
    for index, code in enumerate(codes, start=1):
        if code:
            _log(f"warning: worker {index} exited with code {code}; the others finished its share")
    return export(plan, collected)


def export(plan: Plan, collected: Collected) -> CalibrationOutcome:
    """Write the artifact (deterministic: nothing timed goes in), then measure beside it."""
    from specbound_runtime.exit_head import ExitHeadWeights
    import specbound_runtime

    opts, loaded, work, L = plan.opts, plan.loaded, plan.work, plan.num_layers
    records, schedules, result, cost = collected.records, collected.schedules, collected.result, plan.cost
    fp = loaded.fingerprint
    eos = loaded.eos_token_ids
    reliability_png(records, schedules, work / "reliability.png")
    own = records.own if records.own.any() else np.ones_like(records.own)
    held_traj = records.select(own & records.held_out)
    best = result.best
    policy = best.policy(schedules, cost)  # guarded under the costs it was tuned for
    held_best = evaluate(held_traj, best, schedules, cost) if len(held_traj.seq) else None
    held_paper = evaluate(held_traj, paper_candidate(records.layers, L), schedules, cost) if len(held_traj.seq) else None
    oracle = evaluate_oracle(held_traj, best, cost) if len(held_traj.seq) else None
    recorded = [s for s in collected.sequences if not s.lens_split]
    kinds = {
        kind: {"speedup": round(evaluate(r, best, schedules, cost).speedup, 4), "worst_round": round(result.kinds.get(kind, 1.0), 4)}
        for kind, r in held_out_kinds(records, recorded, plan.corpus).items()
    }
    if opts.multi_objective:
        (work / "pareto.json").write_text(json.dumps(result.pareto, indent=1, sort_keys=True))
        pareto_png(result.pareto, work / "pareto.png")
    weights = collected.weights
    keep = {l: weights.lens[l] for l in policy.check_layers} if best.head == "lens" else {}
    head = ExitHeadWeights(shortlist=weights.shortlist, lens=keep, next_head=weights.next_head if policy.head_draft else None)
    predicted = held_best.speedup if held_best else result.value.speedup
    robust = score(held_best if held_best else result.value)  # the least over the cost rounds
    metadata = {
        "package_version": specbound_runtime.__version__,
        "model_fingerprint": json.dumps(fp.to_dict(), sort_keys=True),
        "tokenizer_fingerprint": json.dumps(loaded.tokenizer_fingerprint.to_dict(), sort_keys=True),
        "corpus_fingerprint": C.fingerprint_sequences(collected.sequences),
        "corpus": opts.corpus,
        "job": json.dumps(plan.job, sort_keys=True),
        "seed": str(opts.seed),
        "best_trial": json.dumps({"number": result.best_trial, "params": _jsonable(best)}, sort_keys=True),
        "trials": str(result.trials),
        "cost_model": json.dumps(cost.to_dict(), sort_keys=True),
        "predicted_speedup": f"{predicted:.4f}",
        "predicted_speedup_worst_round": f"{robust:.4f}",
        "simulation": json.dumps(
            {
                "fit": result.value.to_dict(),
                "fit_paper_defaults": result.paper.to_dict(),
                "held_out": held_best.to_dict() if held_best else None,
                "held_out_paper_defaults": held_paper.to_dict() if held_paper else None,
                "held_out_oracle": oracle.to_dict() if oracle else None,
                "held_out_kinds": kinds,
            },
            sort_keys=True,
        ),
        "calibration": json.dumps(collected.calibration, sort_keys=True),
        "shortlist_coverage": f"{collected.coverage:.4f}",
        "candidate_layers": json.dumps(list(records.layers)),
        "library_versions": json.dumps(library_versions(ARTIFACT_LIBRARIES), sort_keys=True),
    }
    if plan.mode is not None and plan.mode.do_sample:  # an artifact without it was tuned for greedy
        metadata["decoding_mode"] = plan.mode.to_json()
    if policy.guard_costs:  # what decode's PassCostWatch lets pass before it warns
        metadata["cost_tolerance"] = f"{cost_tolerance(cost, policy.guard_costs):.4f}"
        below, above = result.change  # where tuning would choose another policy (tune.policy_change)
        metadata["policy_change"] = json.dumps({"below": below, "above": above}, sort_keys=True)
    path = save_artifact(plan.out, Artifact(policy=policy, exit_weights=head, metadata=metadata), force=opts.force)
    throughput = collection_throughput(collected.lm, weights, recorded[:2], C.CollectSettings(records.layers, opts.shortlist_size))
    report = {
        "artifact": str(path),
        "work_dir": str(work),
        "study_name": plan.study_name,
        "workers": opts.workers,
        "job": plan.job,
        "model": fp.short(),
        "positions": {"lens": collected.n_lens, "fit": int((~records.held_out).sum()), "held_out": int(records.held_out.sum()), "own": int(records.own.sum())},
        "shortlist": {"size": int(weights.shortlist.numel()), "coverage": round(collected.coverage, 4)},
        "collection_tokens_per_s": throughput,
        "policy": _jsonable(best),
        "cost_model_ms": cost.to_dict(),
        "simulated": json.loads(metadata["simulation"]),
        "predicted_speedup": round(predicted, 4),
        "predicted_speedup_worst_round": round(robust, 4),
        "cost_rounds": len(cost.samples),
        "cost_spread": round(cost.spread, 4) if cost.samples else None,
        "calibration": collected.calibration,
        "reliability_png": str(work / "reliability.png"),
        "decoding_mode": (plan.mode or opts.mode()).describe(),
        "next_token_head": next_head_report(records, policy.head_draft),
    }
    # 5. measure on held-out prompts, for real (timed, so it goes beside the artifact, not in it)
    if opts.measure_prompts and opts.measure_tokens:
        held_prompts = kind_by_kind([p for p in plan.corpus.prompts if p.held_out])[: opts.measure_prompts]
        report["measured"] = measure(loaded, eos, policy, head, held_prompts, opts.measure_tokens, opts.mode(), opts.seed)
        m = report["measured"]
        report["measured_speedup"] = m["speedup_tuned"]
        report["prediction_gap"] = round(m["speedup_tuned"] / predicted - 1.0, 4) if predicted else None
    sidecar = path.with_suffix(".report.json")
    atomic_write_bytes(sidecar, json.dumps(report, indent=1, sort_keys=True).encode())
    report["report_json"] = str(sidecar)
    return CalibrationOutcome(artifact=path, report=report)


def kind_by_kind(prompts: list) -> list:
    """Prompts reordered to take one of each kind in turn (kinds in first-seen order)."""
    by_kind: dict[str, list] = {}
    for p in prompts:
        by_kind.setdefault(p.kind or NO_KIND, []).append(p)
    queues = list(by_kind.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def next_head_report(records: C.Records, used: bool) -> dict:
    """How often the fitted next-token head's draft is right on the held-out positions (top-1
    agreement with the full model's argmax; under sampling also its mean acceptance probability),
    and whether the tuned policy drafts with it."""
    held = records.select(records.held_out)
    out: dict = {"used": bool(used)}
    if held.head_right is not None and len(held.seq):
        out["held_out_agreement"] = round(float(held.head_right.mean()), 4)
        out["held_out_positions"] = int(len(held.seq))
        if held.head_accept is not None:
            out["held_out_acceptance"] = round(float(held.head_accept.mean()), 4)
    return out


def collection_throughput(lm, weights, sample, settings) -> dict:
    """Tokens/s of recording (pass B) beside a plain teacher-forced forward, on a few sequences."""
    import time

    heads = C.exit_heads(lm, weights)
    tokens = sum(len(s.ids) for s in sample)
    if not tokens:
        return {}
    with torch.inference_mode():
        started = time.perf_counter()
        for s in sample:
            lm.layer_states(list(s.ids))
        forward = time.perf_counter() - started
        started = time.perf_counter()
        for s in sample:
            C.record_sequence(lm, heads, s, settings.candidate_layers)
        record = time.perf_counter() - started
    return {"plain_forward": round(tokens / forward, 1), "recording": round(tokens / record, 1), "tokens": tokens}


COST_MARGIN = 0.1  # plain steps: a price this much beyond the measurement's own spread is drift


def cost_tolerance(cost: CostModel, prices: tuple[float, ...]) -> float:
    """How far the guard's prices may differ on a machine before decode warns: their spread over
    the cost model's measured rounds, plus COST_MARGIN."""
    spread = max((abs(a - b) for c in cost.variants() for a, b in zip(guard_costs(c, len(prices)), prices)), default=0.0)
    return spread + COST_MARGIN


def _jsonable(candidate) -> dict:
    return {
        "head": candidate.head,
        "schedule": candidate.schedule,
        "threshold": round(candidate.threshold, 6),
        "check_layers": list(candidate.checks),
        "d_max": candidate.d_max,
        "w_max": candidate.w_max,
        "lookup_ngram": candidate.lookup_ngram,
        "lookup_max": candidate.lookup_max,
        "lookup_min": candidate.lookup_min,
        "head_draft": candidate.head_draft,
        **({"lookup_floor": candidate.lookup_floor} if candidate.lookup_floor else {}),
    }


def cached_cost(lm, fp, opts: CalibrateOptions, root: Path, warpers=None) -> CostModel:
    from .costs import cached_costs

    _log("measuring the cost model (cached per machine and model)")
    return cached_costs(lm, fp, opts.shortlist_size, root, opts.remeasure_costs, warpers, warn=_log)


def measure(loaded, eos, policy, head, prompts, max_new_tokens: int, mode=None, seed: int = 0) -> dict:
    """Decode held-out prompts for real: plain (engine, no speculation), the paper's defaults, tuned.

    Interleaved per prompt so machine drift hits all three alike; greedy exactness checked on token
    ids. Under a sampling mode all three sample prompt i with the seed (seed, i); their outputs
    then differ (only the distribution is the same), so "exact" is None."""
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.sampling import DecodingMode

    mode = mode or DecodingMode()

    plain = Decoder(loaded.uncalibrated())
    tuned = Decoder(loaded.with_policy(policy, head))
    times = {"plain": 0.0, "paper": 0.0, "tuned": 0.0}
    tokens = {"plain": 0, "paper": 0, "tuned": 0}
    per_kind: dict[str, dict[str, float]] = {}  # kind -> plain and tuned seconds and tokens
    accept = {"paper": [], "tuned": []}
    exact = True
    with _bar(len(prompts), "measuring held-out decode", "prompt") as bar:
        for i, p in enumerate(prompts):
            enc = plain.encode([{"role": "user", "content": p.text}], plain.has_chat_template, max_new_tokens)
            run = lambda decoder, speculation: decoder.generate(  # noqa: E731
                enc, speculation=speculation, mode=mode,
                generator=torch.Generator().manual_seed(prompt_seed(seed, i)) if mode.do_sample else None,
            )
            ref = run(plain, False)
            a = run(plain, True)  # paper default policy, full-vocabulary head
            b = run(tuned, True)
            exact &= a.token_ids == ref.token_ids == b.token_ids
            for k, r in (("plain", ref), ("paper", a), ("tuned", b)):
                times[k] += r.wall_time_s
                tokens[k] += r.new_tokens
            kind = per_kind.setdefault(getattr(p, "kind", "") or NO_KIND, dict.fromkeys(("plain_s", "plain_n", "tuned_s", "tuned_n"), 0.0))
            kind["plain_s"] += ref.wall_time_s
            kind["plain_n"] += ref.new_tokens
            kind["tuned_s"] += b.wall_time_s
            kind["tuned_n"] += b.new_tokens
            accept["paper"].extend(a.accept_lengths)
            accept["tuned"].extend(b.accept_lengths)
            bar.update(1)
    tps = {k: tokens[k] / times[k] if times[k] else 0.0 for k in times}
    kinds = {
        kind: round((v["tuned_n"] / v["tuned_s"]) / (v["plain_n"] / v["plain_s"]), 4)
        for kind, v in per_kind.items() if v["tuned_s"] and v["plain_s"] and v["plain_n"]
    }
    return {
        "speedup_by_kind": kinds,
        "worst_kind": min(kinds, key=lambda k: (kinds[k], k)) if kinds else None,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "speedup_tuned": round(tps["tuned"] / tps["plain"], 4) if tps["plain"] else 0.0,
        "speedup_paper": round(tps["paper"] / tps["plain"], 4) if tps["plain"] else 0.0,
        "mean_accepted_length": {k: round(sum(v) / max(1, len(v)), 3) for k, v in accept.items()},
        "exact": None if mode.do_sample else bool(exact),
        "decoding_mode": mode.describe(),
    }

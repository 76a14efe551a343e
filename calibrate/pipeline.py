"""`specbound calibrate`'s plan and its stages in order: resolve the inputs (model, corpus, job,
work folder, study, cost model), then record (calibrate.record), fit (calibrate.report), tune
(calibrate.tune); calibrate.export writes the artifact and calibrate.live checks it. Every
stage's output lives in a work folder, shard by shard, so an interrupted run resumes where it
stopped and reproduces the same artifact, and several workers (calibrate.workers) split the work
without changing a byte of the result."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.errors import InputError, ModelError, UsageError
from specbound_runtime.files import atomic_write_bytes, sha256_file

from . import collect as C
from .corpus import Corpus, load_corpus
from .job import job_digest, recorded_job
from .options import CalibrateOptions, candidate_layers
from .progress import bar, log
from .record import held_out_kinds, record
from .report import fit_schedules
from .shards import log_event
from .simulate import CostModel
from .tune import SEARCH_SPACE, Schedules, tune


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
        log(f"note: calibration scores sampling without {', '.join(skipped)} (from the generation config); decoding applies them")
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

def cached_cost(lm, fp, opts: CalibrateOptions, root: Path, warpers=None) -> CostModel:
    from .costs import cached_costs

    log("measuring the cost model (cached per machine and model)")
    return cached_costs(lm, fp, opts.shortlist_size, root, opts.remeasure_costs, warpers, warn=log)

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


def collect_and_tune(plan: Plan, worker: int = 0, workers: int = 1, quiet: bool = False) -> Collected:
    """One worker's share of a job: recording shard by shard (each made once, by whichever
    worker claims it), then the fits, then tuning in the shared study. Every worker returns the
    same result."""
    opts, work = plan.opts, plan.work
    log_event(work, f"worker {worker} of {workers} started")
    rec = record(plan, worker, workers, quiet)  # 1. record
    records = rec.records
    schedules, calibration = fit_schedules(records, plan.num_layers)  # 2. fit
    # 3. tune, in the study every worker of this job shares
    data = hashlib.sha256()
    for path in rec.shard_paths:
        data.update(path.read_bytes())
    study_key = job_digest(
        {"job": {**plan.job, "tuning": {k: v for k, v in plan.job["tuning"].items() if k != "trials"}},
         "cost": plan.cost.to_dict(), "records": data.hexdigest(), "space": SEARCH_SPACE}
    )
    own = records.own if records.own.any() else np.ones_like(records.own)
    with bar(opts.trials, "tuning (simulated)", "trial", quiet) as progress:
        result = tune(
            records.select(own & ~records.held_out), schedules, plan.cost, opts.trials, opts.seed, plan.storage,
            plan.study_name, opts.multi_objective, progress.update, batch=opts.trial_batch, job_key=study_key,
            held_out=held_out_kinds(records, rec.recorded, plan.corpus), worker=worker, workers=workers,
        )
    log_event(work, f"worker {worker} of {workers} finished: all {opts.trials} trials are in study {plan.study_name}")
    return Collected(rec.weights, rec.coverage, rec.sequences, records, schedules, calibration, result, rec.n_lens, rec.lm)


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

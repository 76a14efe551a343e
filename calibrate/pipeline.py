"""`specbound calibrate`: collect, fit, tune, export. Every step's output lives in a work folder,
so an interrupted run resumes where it stopped and reproduces the same artifact."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specbound_runtime.artifact import Artifact, save_artifact
from specbound_runtime.errors import InputError, UsageError
from specbound_runtime.files import atomic_write_bytes
from specbound_runtime.policy import default_check_layers, paper_temperatures

from . import collect as C
from .corpus import Corpus, load_corpus
from .fit import TEMPERATURE_GRID, confidence_at, fit_paper_alpha, fit_temperature, metrics
from .simulate import CostModel
from .tune import Schedules, check_storage_url, evaluate, evaluate_oracle, paper_candidate, tune

MIN_FIT_POSITIONS = 200  # below this, per-layer temperatures are not meaningful


@dataclass(frozen=True)
class CalibrateOptions:
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
    prompts: int = 64
    documents: int = 64
    answer_tokens: int = 128
    chunk_tokens: int = 256
    shortlist_size: int = 4096
    held_out_fraction: float = 0.1
    measure_prompts: int = 6
    measure_tokens: int = 128
    remeasure_costs: bool = False
    candidate_layers: tuple[int, ...] | None = None
    device: str | None = None  # where the model runs while recording (default cpu)
    dtype: str | None = None  # its dtype (default float32 on cpu)

    def validate(self) -> None:
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.trials}")
        for name in ("prompts", "answer_tokens", "chunk_tokens", "shortlist_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("documents", "measure_prompts", "measure_tokens"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise UsageError(f"--held-out-fraction must lie in (0, 1), got {self.held_out_fraction}")
        if self.storage is not None:
            check_storage_url(self.storage)


def candidate_layers(num_layers: int) -> tuple[int, ...]:
    """Layers worth recording as possible exit checks: the paper's defaults, and every other layer
    of the deeper half (shallower ones agree with the last layer too rarely to pay for a check)."""
    deep = range(math.ceil(num_layers / 2), num_layers, 2)
    return tuple(sorted(set(default_check_layers(num_layers)) | set(deep) | {num_layers - 1}))


def _bar(total, desc, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _chat_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text)["input_ids"]]


def own_answers(loaded, prompts, eos_ids, max_new_tokens: int, path: Path, batch_size: int = 8) -> dict[str, list[int]]:
    """Greedy answers of the model to each prompt, cached line by line in `path` (resumable)."""
    done: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row["answer"]
            except (ValueError, KeyError):
                break  # a line cut short by an interruption: recompute from here
    todo = [p for p in prompts if p.id not in done]
    model, tok = loaded.model, loaded.tokenizer
    pad = eos_ids[0] if eos_ids else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with _bar(len(prompts), "own answers", "prompt") as bar, open(path, "a") as f, torch.inference_mode():
        bar.update(len(prompts) - len(todo))
        for i in range(0, len(todo), batch_size):
            group = todo[i : i + batch_size]
            encoded = [_chat_ids(tok, p.text) for p in group]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=list(eos_ids) or None, pad_token_id=pad,
            )
            for p, row in zip(group, out[:, width:].tolist()):
                answer = []
                for t in row:
                    answer.append(int(t))
                    if t in eos_ids:
                        break
                done[p.id] = answer
                f.write(json.dumps({"id": p.id, "answer": answer}) + "\n")
                f.flush()
            bar.update(len(group))
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


def library_versions(names=("specbound", "torch", "transformers", "safetensors", "optuna", "numpy", "scipy", "datasets")) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def fit_schedules(records: C.Records, num_layers: int) -> tuple[Schedules, dict]:
    """Per-layer temperatures and the paper's alpha, per head, on the fitting split; metrics on the
    held-out split: raw confidence (T = 1), the paper's schedule, and the fitted temperatures."""
    fit = records.select(~records.held_out)
    held = records.select(records.held_out)
    layers = records.layers
    fitted, alpha, report = {}, {}, {}
    for h, head in enumerate(C.HEADS):
        temps = tuple(fit_temperature(fit.conf[:, h, c], fit.right[:, h, c]) for c in range(len(layers)))
        a = fit_paper_alpha([fit.conf[:, h, c] for c in range(len(layers))], [fit.right[:, h, c] for c in range(len(layers))], layers, num_layers)
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


def run_calibration(opts: CalibrateOptions) -> CalibrationOutcome:
    import specbound_runtime as sb
    from specbound_runtime.models import cache_root

    opts.validate()
    loaded = sb.load(opts.model, device=opts.device, dtype=opts.dtype)
    fp = loaded.fingerprint
    lm = loaded.lm
    L = lm.num_layers
    if L < 3:
        raise InputError(f"the model has {L} layers; early exit needs at least 3")
    eos = loaded.eos_token_ids
    layers = opts.candidate_layers or candidate_layers(L)
    if any(not (1 <= l < L) for l in layers):
        raise UsageError(f"candidate layers must lie in 1..{L - 1}")
    corpus = load_corpus(opts.corpus, opts.prompts, opts.documents, opts.held_out_fraction, opts.seed)
    tag = f"{fp.model_type}-L{L}-{fp.weights_sha256[:8]}-seed{opts.seed}"
    data_key = json.dumps(
        [opts.corpus, opts.prompts, opts.documents, opts.answer_tokens, opts.chunk_tokens, opts.shortlist_size, list(layers)]
    )
    work = opts.work_dir or Path("runs") / f"calibrate-{tag}-{hashlib.sha256(data_key.encode()).hexdigest()[:8]}"
    out = opts.out or Path("artifacts") / f"{fp.model_type}-L{L}-{fp.weights_sha256[:8]}.safetensors"
    if out.exists() and not opts.force:
        raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
    study_name = opts.study_name or f"specbound-{tag}"
    storage = opts.storage or f"sqlite:///{(work / 'study.db').resolve()}"
    work.mkdir(parents=True, exist_ok=True)
    _log(f"calibrating {fp.short()} on corpus {corpus.name!r}; work folder {work}")

    # 1. collect
    answers = own_answers(loaded, corpus.prompts, eos, opts.answer_tokens, work / "answers.jsonl")
    sequences = build_sequences(loaded, corpus, answers, opts.chunk_tokens)
    n_lens = sum(s.recorded for s in sequences if s.lens_split)
    n_fit = sum(s.recorded for s in sequences if not s.held_out and not s.lens_split)
    if min(n_lens, n_fit) < MIN_FIT_POSITIONS:
        raise InputError(
            f"the corpus gives {n_lens} lens-fitting and {n_fit} calibration positions; at least "
            f"{MIN_FIT_POSITIONS} of each are needed (add text or prompts)"
        )
    corpus_fp = C.fingerprint_sequences(sequences)
    settings = C.CollectSettings(candidate_layers=tuple(layers), shortlist_size=opts.shortlist_size)
    manifest = work / "manifest.json"
    want = {"corpus": corpus_fp, "layers": list(layers), "shortlist": opts.shortlist_size, "model": fp.weights_sha256}
    if manifest.exists() and json.loads(manifest.read_text()) != want:
        raise UsageError(f"work folder {work} holds another calibration's data; pass another --work-dir or delete it")
    atomic_write_bytes(manifest, json.dumps(want, sort_keys=True).encode())

    with _bar(n_lens, "pass A: lens Gram matrices", "tok") as bar:
        gram, cross, counts = C.accumulate(lm, sequences, settings, work / "pass_a.npz", bar.update)
    weights = C.fit_exit_head(lm, gram, cross, counts, settings, eos)
    coverage = C.shortlist_coverage(counts, weights.shortlist)
    total = sum(s.recorded for s in sequences if not s.lens_split)
    with _bar(total, "pass B: per-layer records", "tok") as bar:
        shards = C.write_records(lm, weights, sequences, settings, work / "shards", bar.update)
    records = C.with_lookups(C.load_records(shards, tuple(layers)), [s for s in sequences if not s.lens_split])
    throughput = collection_throughput(lm, weights, [s for s in sequences if not s.lens_split][:2], settings)

    # 2. fit
    schedules, calibration = fit_schedules(records, L)
    reliability_png(records, schedules, work / "reliability.png")

    # 3. tune
    cost = cached_cost(lm, fp, opts, cache_root())
    own = records.own if records.own.any() else np.ones_like(records.own)
    fit_traj = records.select(own & ~records.held_out)
    held_traj = records.select(own & records.held_out)
    with _bar(opts.trials, "tuning (simulated)", "trial") as bar:
        result = tune(fit_traj, schedules, cost, opts.trials, opts.seed, storage, study_name, opts.multi_objective, bar.update)
    best = result.best
    policy = best.policy(schedules)
    held_best = evaluate(held_traj, best, schedules, cost) if len(held_traj.seq) else None
    held_paper = evaluate(held_traj, paper_candidate(records.layers, L), schedules, cost) if len(held_traj.seq) else None
    oracle = evaluate_oracle(held_traj, best, cost) if len(held_traj.seq) else None
    if opts.multi_objective:
        (work / "pareto.json").write_text(json.dumps(result.pareto, indent=1, sort_keys=True))
        pareto_png(result.pareto, work / "pareto.png")

    # 4. export (deterministic: nothing timed goes in)
    keep = {l: weights.lens[l] for l in policy.check_layers} if best.head == "lens" else {}
    from specbound_runtime.exit_head import ExitHeadWeights
    import specbound_runtime

    head = ExitHeadWeights(shortlist=weights.shortlist, lens=keep)
    predicted = held_best.speedup if held_best else result.value.speedup
    metadata = {
        "package_version": specbound_runtime.__version__,
        "model_fingerprint": json.dumps(fp.to_dict(), sort_keys=True),
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "corpus_fingerprint": corpus_fp,
        "corpus": corpus.name,
        "seed": str(opts.seed),
        "study_name": study_name,
        "best_trial": json.dumps({"number": result.best_trial, "params": _jsonable(best)}, sort_keys=True),
        "trials": str(result.trials),
        "cost_model": json.dumps(cost.to_dict(), sort_keys=True),
        "predicted_speedup": f"{predicted:.4f}",
        "simulation": json.dumps(
            {
                "fit": result.value.to_dict(),
                "fit_paper_defaults": result.paper.to_dict(),
                "held_out": held_best.to_dict() if held_best else None,
                "held_out_paper_defaults": held_paper.to_dict() if held_paper else None,
                "held_out_oracle": oracle.to_dict() if oracle else None,
            },
            sort_keys=True,
        ),
        "calibration": json.dumps(calibration, sort_keys=True),
        "shortlist_coverage": f"{coverage:.4f}",
        "candidate_layers": json.dumps(list(layers)),
        "library_versions": json.dumps(library_versions(), sort_keys=True),
    }
    path = save_artifact(out, Artifact(policy=policy, exit_weights=head, metadata=metadata), force=opts.force)
    report = {
        "artifact": str(path),
        "work_dir": str(work),
        "model": fp.short(),
        "positions": {"lens": n_lens, "fit": int((~records.held_out).sum()), "held_out": int(records.held_out.sum()), "own": int(records.own.sum())},
        "shortlist": {"size": int(weights.shortlist.numel()), "coverage": round(coverage, 4)},
        "collection_tokens_per_s": throughput,
        "policy": _jsonable(best),
        "cost_model_ms": cost.to_dict(),
        "simulated": json.loads(metadata["simulation"]),
        "predicted_speedup": round(predicted, 4),
        "calibration": calibration,
        "reliability_png": str(work / "reliability.png"),
    }
    # 5. measure on held-out prompts, for real (timed, so it goes beside the artifact, not in it)
    if opts.measure_prompts and opts.measure_tokens:
        report["measured"] = measure(loaded, eos, policy, head, [p for p in corpus.prompts if p.held_out][: opts.measure_prompts], opts.measure_tokens)
        m = report["measured"]
        report["measured_speedup"] = m["speedup_tuned"]
        report["prediction_gap"] = round(m["speedup_tuned"] / predicted - 1.0, 4) if predicted else None
    sidecar = path.with_suffix(".report.json")
    atomic_write_bytes(sidecar, json.dumps(report, indent=1, sort_keys=True).encode())
    report["report_json"] = str(sidecar)
    return CalibrationOutcome(artifact=path, report=report)


def collection_throughput(lm, weights, sample, settings) -> dict:
    """Tokens/s of recording (pass B) beside a plain teacher-forced forward, on a few sequences."""
    import time

    from specbound_runtime.exit_head import ExitHeadWeights, FittedExitHead

    heads = {
        "plain": FittedExitHead(ExitHeadWeights(weights.shortlist, {}), lm.normed, lm.lm_head_weight, lm.softcap),
        "lens": FittedExitHead(weights, lm.normed, lm.lm_head_weight, lm.softcap),
    }
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
    }


def cached_cost(lm, fp, opts: CalibrateOptions, root: Path) -> CostModel:
    from .costs import cached_costs

    _log("measuring the cost model (cached per machine and model)")
    return cached_costs(lm, fp, opts.shortlist_size, root, opts.remeasure_costs)


def measure(loaded, eos, policy, head, prompts, max_new_tokens: int) -> dict:
    """Decode held-out prompts for real: plain (engine, no speculation), the paper's defaults, tuned.

    Interleaved per prompt so machine drift hits all three alike; exactness checked on token ids."""
    from specbound_runtime.decoder import Decoder

    plain = Decoder(loaded.uncalibrated())
    tuned = Decoder(loaded.with_policy(policy, head))
    times = {"plain": 0.0, "paper": 0.0, "tuned": 0.0}
    tokens = {"plain": 0, "paper": 0, "tuned": 0}
    accept = {"paper": [], "tuned": []}
    exact = True
    with _bar(len(prompts), "measuring held-out decode", "prompt") as bar:
        for p in prompts:
            enc = plain.encode([{"role": "user", "content": p.text}], plain.has_chat_template, max_new_tokens)
            ref = plain.generate(enc, speculation=False)
            a = plain.generate(enc, speculation=True)  # paper default policy, full-vocabulary head
            b = tuned.generate(enc, speculation=True)
            exact &= a.token_ids == ref.token_ids == b.token_ids
            for k, r in (("plain", ref), ("paper", a), ("tuned", b)):
                times[k] += r.wall_time_s
                tokens[k] += r.new_tokens
            accept["paper"].extend(a.accept_lengths)
            accept["tuned"].extend(b.accept_lengths)
            bar.update(1)
    tps = {k: tokens[k] / times[k] if times[k] else 0.0 for k in times}
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "speedup_tuned": round(tps["tuned"] / tps["plain"], 4) if tps["plain"] else 0.0,
        "speedup_paper": round(tps["paper"] / tps["plain"], 4) if tps["plain"] else 0.0,
        "mean_accepted_length": {k: round(sum(v) / max(1, len(v)), 3) for k, v in accept.items()},
        "exact": bool(exact),
    }

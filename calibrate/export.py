"""Stage 4, the export: the artifact (policy, exit head, metadata; nothing timed goes in, so the
same job gives the same bytes), then the report beside it, with the live check's figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from specbound_runtime.artifact import Artifact, save_artifact
from specbound_runtime.files import atomic_write_bytes, library_versions

from . import collect as C
from .live import collection_throughput, kind_by_kind, measure
from .record import held_out_kinds
from .report import next_head_report, pareto_png, reliability_png
from .batches import tune_batches
from .space import candidate_exits, candidate_words, evaluate, evaluate_oracle, guard_metadata, paper_candidate, score

if TYPE_CHECKING:
    from .pipeline import Collected, Plan

ARTIFACT_LIBRARIES = ("specbound", "torch", "transformers", "safetensors", "optuna", "numpy", "scipy", "datasets")


@dataclass
class CalibrationOutcome:
    artifact: Path
    report: dict = field(default_factory=dict)

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
    oracle = evaluate_oracle(held_traj, best, schedules, cost) if len(held_traj.seq) else None
    recorded = [s for s in collected.sequences if not s.lens_split]
    kinds = {
        kind: {"speedup": round(evaluate(r, best, schedules, cost).speedup, 4), "worst_round": round(result.kinds.get(kind, 1.0), 4)}
        for kind, r in held_out_kinds(records, recorded, plan.corpus).items()
    }
    if opts.multi_objective:
        (work / "pareto.json").write_text(json.dumps(result.pareto, indent=1, sort_keys=True))
        pareto_png(result.pareto, work / "pareto.png")
    fit_traj = records.select(own & ~records.held_out)
    batches = tune_batches(fit_traj, policy, cost, held_traj, candidate_exits(fit_traj, best, schedules, cost))
    weights = collected.weights
    keep = {l: weights.lens[l] for l, _, _ in policy.active_checks} if best.head == "lens" else {}
    head = ExitHeadWeights(shortlist=weights.shortlist, lens=keep, next_head=weights.next_head if "head" in policy.sources else None)
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
        "best_trial": json.dumps({"number": result.best_trial, "params": best.to_dict()}, sort_keys=True),
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
        "batch_policy": json.dumps(batches, sort_keys=True),
        "shortlist_coverage": f"{collected.coverage:.4f}",
        "candidate_layers": json.dumps(list(records.layers)),
        "library_versions": json.dumps(library_versions(ARTIFACT_LIBRARIES), sort_keys=True),
    }
    if plan.mode is not None and plan.mode.do_sample:  # an artifact without it was tuned for greedy
        metadata["decoding_mode"] = plan.mode.to_json()
    metadata.update(guard_metadata(best, cost, result.change))  # what decode's PassCostWatch lets pass
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
        "policy": best.to_dict(),
        "cost_model_ms": cost.to_dict(),
        "simulated": json.loads(metadata["simulation"]),
        "predicted_speedup": round(predicted, 4),
        "predicted_speedup_worst_round": round(robust, 4),
        "cost_rounds": len(cost.samples),
        "cost_spread": round(cost.spread, 4) if cost.samples else None,
        "calibration": collected.calibration,
        "reliability_png": str(work / "reliability.png"),
        "decoding_mode": (plan.mode or opts.mode()).describe(),
        "batch_policy": batches,
        "next_token_head": next_head_report(records, "head" in policy.sources),
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

def calibration_summary(report: dict) -> str:
    """The calibration report (export's `report`) as the lines `specbound calibrate` prints."""
    pol = report["policy"]
    sim = report["simulated"]
    lines = [
        f"artifact: {report['artifact']}",
        f"model: {report['model']}; positions fit/held-out/own: {report['positions']['fit']}/{report['positions']['held_out']}/{report['positions']['own']}",
        f"policy (tuned for {report.get('decoding_mode', 'greedy')}): {candidate_words(pol)}",
        f"simulated speedup (fit): tuned {sim['fit']['speedup']:.3f}x vs paper defaults {sim['fit_paper_defaults']['speedup']:.3f}x",
    ]
    if report.get("cost_rounds"):
        lines.append(
            f"predicted speedup: {report['predicted_speedup']:.3f}x at the median costs, "
            f"{report['predicted_speedup_worst_round']:.3f}x in the least favourable of {report['cost_rounds']} measured cost rounds "
            f"(plain decoding's cost spreads {report['cost_spread']:.1%} over them)"
        )
    elif "predicted_speedup_worst_round" in report:
        lines.append(f"predicted speedup: {report['predicted_speedup']:.3f}x (a cost model of one measurement: no spread to judge it by)")
    if sim.get("held_out"):
        lines.append(
            f"simulated speedup (held-out): tuned {sim['held_out']['speedup']:.3f}x, paper defaults "
            f"{sim['held_out_paper_defaults']['speedup']:.3f}x, oracle {sim['held_out_oracle']['speedup']:.3f}x; "
            f"mean accepted length {sim['held_out']['mean_accepted_length']:.2f}"
        )
    if sim.get("held_out_kinds"):
        kinds = sim["held_out_kinds"]
        worst = min(kinds, key=lambda k: (kinds[k]["worst_round"], k))
        lines.append(
            "simulated by held-out kind (least over the cost rounds): "
            + ", ".join(f"{k} {v['worst_round']:.3f}x" for k, v in kinds.items())
            + f"; worst: {worst}"
        )
    for head, rep in report["calibration"].items():
        fitted = [r["fitted"]["ece"] for r in rep["layers"] if r["fitted"]["ece"] is not None]
        paper = [r["paper"]["ece"] for r in rep["layers"] if r["paper"]["ece"] is not None]
        if fitted and paper:
            lines.append(f"held-out ECE ({head} head, mean over layers): fitted {sum(fitted)/len(fitted):.4f} vs paper schedule {sum(paper)/len(paper):.4f}")
    if "measured" in report:
        m = report["measured"]
        lines.append(
            f"measured on {m['prompts']} held-out prompts: plain {m['tokens_per_s']['plain']} tok/s, tuned {m['tokens_per_s']['tuned']} tok/s "
            f"({m['speedup_tuned']:.3f}x); predicted {report['predicted_speedup']:.3f}x; exact: {m['exact']}"
        )
        if m.get("speedup_by_kind"):
            lines.append(
                "measured by kind: " + ", ".join(f"{k} {v:.3f}x" for k, v in m["speedup_by_kind"].items())
                + f"; worst: {m['worst_kind']} (one run each: a kind's figure carries the machine's noise)"
            )
    head = report.get("next_token_head") or {}
    if "held_out_agreement" in head:
        lines.append(
            f"next-token head: its draft is the full model's token at {head['held_out_agreement']:.1%} of "
            f"{head['held_out_positions']} held-out positions"
            + (f" (mean acceptance {head['held_out_acceptance']:.1%})" if "held_out_acceptance" in head else "")
            + ("; the policy drafts with it" if head.get("used") else "; not used: it does not pay here")
        )
    tput = report.get("collection_tokens_per_s") or {}
    if tput:
        lines.append(f"collection: {tput['recording']} tok/s recording vs {tput['plain_forward']} tok/s plain forward")
    lines.append(f"report: {report['report_json']}; reliability diagram: {report['reliability_png']}")
    return "\n".join(lines)

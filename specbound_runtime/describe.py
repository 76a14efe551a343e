"""An artifact described, for people and for machines: what `specbound inspect` prints (its
policy, exit head, fingerprints, the cost model it was tuned under, predictions and, from the
report beside it, what was measured)."""

from __future__ import annotations

import json
from pathlib import Path

from .artifact import read_artifact
from .policy import ExitPolicy
from .sampling import DecodingMode


def describe(path: str | Path) -> dict:
    """The artifact at `path` as one JSON-ready object (metadata values parsed where they are JSON)."""
    path = Path(path)
    art = read_artifact(path)
    info = {
        "path": str(path),
        "policy": art.policy.to_dict(),
        "exit_head": None
        if art.exit_weights is None
        else {
            "shortlist": None if art.exit_weights.shortlist is None else int(art.exit_weights.shortlist.numel()),
            "lens_layers": sorted(art.exit_weights.lens),
            "next_token_head": art.exit_weights.next_head is not None,
        },
        "metadata": {k: _maybe_json(v) for k, v in sorted(art.metadata.items())},
    }
    sidecar = path.with_suffix(".report.json")
    if sidecar.exists():
        try:
            info["measured"] = json.loads(sidecar.read_text()).get("measured")
        except ValueError:
            pass
    return info


def describe_lines(info: dict) -> list[str]:
    """`describe`'s object in words, a line each."""
    p, meta = info["policy"], info["metadata"]
    lines = [f"artifact {info['path']} (schema v{meta.get('schema_version')}, specbound {meta.get('package_version')})"]
    fp = meta.get("model_fingerprint")
    if isinstance(fp, dict):
        lines.append(f"model: {fp.get('model_type')} L={fp.get('num_layers')} V={fp.get('vocab_size')} weights {str(fp.get('weights_sha256'))[:12]}")
    lines.append("policy: " + ExitPolicy.from_dict(p).describe())
    head = info["exit_head"]
    if head:
        lines.append(
            f"exit head: short-list {head['shortlist']} tokens, lens at layers {head['lens_layers']}, "
            + ("a fitted next-token head" if head["next_token_head"] else "no next-token head")
        )
    lines.append(f"tuned for: {_tuned_for(meta)}")
    lines += _cost_lines(meta)
    lines += _batch_lines(meta)
    for key in ("predicted_speedup", "seed", "study_name", "trials", "corpus", "shortlist_coverage"):
        if key in meta:
            lines.append(f"{key}: {meta[key] if isinstance(meta[key], str) else json.dumps(meta[key])}")
    m = info.get("measured")
    if m:
        paper = f", paper defaults {m['speedup_paper']}x" if "speedup_paper" in m else ""  # reports before 0.3 measured them
        lines.append(f"measured (sidecar report): tuned {m.get('speedup_tuned')}x{paper}, exact {m.get('exact')}")
    return lines


def _cost_lines(metadata: dict) -> list[str]:
    """What `inspect` says of the cost model an artifact was tuned under: a pass by each measured
    width (calibrate.simulate.CostModel prices the rest, but needs the calibrate extra), and where
    the costs came from, with the retune that moves the artifact to this machine."""
    cost, job = metadata.get("cost_model"), metadata.get("job")
    if not isinstance(cost, dict):
        return []
    L, layers, heads = cost.get("num_layers"), cost.get("layer_widths") or [], cost.get("head_widths") or []
    passes = [L * a + b for a, b in zip(layers, heads)] if isinstance(L, int) else []
    lines = []
    if passes:
        shown = [n for n in (1, 2, 4, 8, 11, 13) if n <= len(passes)]
        lines.append(
            "cost model: a pass over " + ", ".join(f"{n}" for n in shown) + " positions costs "
            + ", ".join(f"{passes[n - 1]:.1f}" for n in shown) + " ms ("
            + ", ".join(f"{passes[n - 1] / passes[0]:.2f}x" for n in shown) + " of one)"
        )
    slopes = cost.get("context_slopes")
    if isinstance(slopes, list) and slopes and isinstance(L, int):
        lines.append(
            f"each round priced at its own context: a one-position pass costs {L * slopes[0] * 1000:.0f} ms more per "
            f"1,000 tokens of context beyond {cost.get('context')}"
        )
    change = metadata.get("policy_change")
    if isinstance(change, dict) and (change.get("below") is not None or change.get("above") is not None):
        bounds = [f"{'below' if side == 'below' else 'above'} {change[side]}x" for side in ("below", "above") if change.get(side) is not None]
        lines.append(
            "tuning would choose another policy where draft prices run " + " or ".join(bounds)
            + " those it was tuned under (decode warns when its own passes show that)"
        )
    pinned = (job or {}).get("costs", {}).get("file") if isinstance(job, dict) else None
    lines.append(
        f"costs from: {'the pinned file ' + pinned if pinned else 'measured on the machine that calibrated'}; on another "
        "machine, `specbound costs --out mine.json` then `specbound calibrate --from-artifact A --costs mine.json "
        "--work-dir <its work folder>` retunes from the recorded statistics"
    )
    return lines


def _batch_lines(metadata: dict) -> list[str]:
    """The tuned draft bound a row per batch size, with the batch simulator's predictions."""
    doc = metadata.get("batch_policy")
    if not isinstance(doc, dict) or not doc.get("tuned"):
        return ["batches: no tuned batch policy (made before batches were tuned); a batch's draft bound is priced by rows x positions"]
    parts = []
    for t in doc["tuned"]:
        if t["rows"] == 1:  # one row runs the one-sequence engine; its tuned bound anchors the rule
            parts.append(f"1 row: the policy above (lookup and head alone would draft {t['width']})")
            continue
        predicted = t.get("held_out_speedup", t.get("predicted_speedup"))
        parts.append(f"{t['rows']} rows: " + (f"{t['width']} drafts a row (predicted {predicted}x over plain batched)" if t["width"] else "plain batched decoding"))
    checked = "; ".join(f"{c['rows']} rows: rule {c['rule_width']}, best {c['best_width']}" for c in doc.get("checked", []))
    return [f"batches ({doc.get('priced_by')}): " + "; ".join(parts) + (f"; rule checked at {checked}" if checked else "")]


def _tuned_for(metadata: dict) -> str:
    raw = metadata.get("decoding_mode")
    try:
        return (DecodingMode() if raw is None else DecodingMode.from_json(raw)).describe()
    except (ValueError, TypeError):
        return f"unreadable decoding_mode {raw!r}"


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value

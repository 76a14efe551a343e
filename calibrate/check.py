"""`specbound calibrate --check`: rebuild a job's artifact in a temporary folder and compare it,
byte for byte, with the committed one; when they differ, say field by field what moved and by
how much (policy, temperatures, short-list, lens maps, metadata)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specbound_runtime.artifact import Artifact, read_artifact
from specbound_runtime.errors import ArtifactError, UsageError

from .run import run_calibration

_SKIP_METADATA = ("checksum",)  # differs whenever anything else does


@dataclass(frozen=True)
class Difference:
    field: str  # e.g. policy.thresholds, lens.15.weight, metadata.job.tuning.trials
    committed: object
    rebuilt: object
    by: str = ""  # how much, for numbers and tensors

    def line(self) -> str:
        return f"{self.field}: {_short(self.committed)} -> {_short(self.rebuilt)}" + (f" ({self.by})" if self.by else "")

    def to_dict(self) -> dict:
        return {"field": self.field, "committed": _jsonable(self.committed), "rebuilt": _jsonable(self.rebuilt), "by": self.by}


@dataclass
class CheckResult:
    committed: Path
    identical: bool
    sha256: tuple[str, str]
    differences: list[Difference] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "committed": str(self.committed),
            "identical": self.identical,
            "sha256": {"committed": self.sha256[0], "rebuilt": self.sha256[1]},
            "differences": [d.to_dict() for d in self.differences],
        }

    def report(self) -> str:
        if self.identical:
            return f"identical: {self.committed} (sha256 {self.sha256[0][:16]})"
        lines = [f"differs: {self.committed} (sha256 {self.sha256[0][:16]}, rebuilt {self.sha256[1][:16]})"]
        lines += [f"  {d.line()}" for d in self.differences] or ["  (no field differs: the bytes differ in layout only)"]
        return "\n".join(lines)


def _short(value, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, tuple):
        return list(value)
    return value


def _number_delta(a, b) -> str:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    delta = b - a
    relative = f", {delta / abs(a):+.3g} relative" if a else ""
    return f"by {delta:+.6g}{relative}"


def _diff_values(name: str, a, b, out: list[Difference]) -> None:
    """Leaf by leaf through JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a:
                out.append(Difference(f"{name}.{key}", "(absent)", b[key], "added"))
            elif key not in b:
                out.append(Difference(f"{name}.{key}", a[key], "(absent)", "removed"))
            else:
                _diff_values(f"{name}.{key}", a[key], b[key], out)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in a + b):
            worst = max(abs(y - x) for x, y in zip(a, b))
            out.append(Difference(name, a, b, f"max |difference| {worst:.6g}"))
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_values(f"{name}[{i}]", x, y, out)
        return
    if a != b:
        out.append(Difference(name, a, b, _number_delta(a, b)))


def _tensor_delta(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {list(a.shape)} -> {list(b.shape)}"
    diff = (b.double() - a.double()).abs()
    scale = a.double().abs().max().item() or 1.0
    changed = int((diff > 0).sum())
    return f"{changed} of {a.numel()} values differ, max |difference| {diff.max().item():.3g} ({diff.max().item() / scale:.3g} of the largest value)"


def compare_artifacts(committed: Artifact, rebuilt: Artifact) -> list[Difference]:
    out: list[Difference] = []
    pa, pb = dataclasses.asdict(committed.policy), dataclasses.asdict(rebuilt.policy)
    for key in pa:
        if pa[key] != pb[key]:
            a, b = pa[key], pb[key]
            by = ""
            if isinstance(a, tuple) and len(a) == len(b) and a and isinstance(a[0], float):
                by = f"max |difference| {max(abs(x - y) for x, y in zip(a, b)):.6g}"
            else:
                by = _number_delta(a, b)
            out.append(Difference(f"policy.{key}", a, b, by))
    wa, wb = committed.exit_weights, rebuilt.exit_weights
    sa = None if wa is None or wa.shortlist is None else set(wa.shortlist.tolist())
    sb = None if wb is None or wb.shortlist is None else set(wb.shortlist.tolist())
    if sa != sb:
        if sa is None or sb is None:
            out.append(Difference("shortlist", "(none)" if sa is None else f"{len(sa)} tokens", "(none)" if sb is None else f"{len(sb)} tokens"))
        else:
            gone, new = sorted(sa - sb), sorted(sb - sa)
            out.append(Difference("shortlist", f"{len(sa)} tokens", f"{len(sb)} tokens", f"{len(gone)} dropped {gone[:8]}, {len(new)} added {new[:8]}"))
    la = {} if wa is None else wa.lens
    lb = {} if wb is None else wb.lens
    for layer in sorted(set(la) | set(lb)):
        if layer not in la or layer not in lb:
            out.append(Difference(f"lens.{layer}", "(absent)" if layer not in la else "present", "(absent)" if layer not in lb else "present"))
            continue
        for part, x, y in (("weight", la[layer][0], lb[layer][0]), ("bias", la[layer][1], lb[layer][1])):
            if x.shape != y.shape or not torch.equal(x, y):
                out.append(Difference(f"lens.{layer}.{part}", x, y, _tensor_delta(x, y)))
    na = None if wa is None else wa.next_head
    nb = None if wb is None else wb.next_head
    if (na is None) != (nb is None):
        out.append(Difference("next_head", "(absent)" if na is None else "present", "(absent)" if nb is None else "present"))
    elif na is not None:
        for part, x, y in (("weight", na[0], nb[0]), ("bias", na[1], nb[1])):
            if x.shape != y.shape or not torch.equal(x, y):
                out.append(Difference(f"next_head.{part}", x, y, _tensor_delta(x, y)))
    ma, mb = committed.metadata, rebuilt.metadata
    for key in sorted(set(ma) | set(mb)):
        if key in _SKIP_METADATA or ma.get(key) == mb.get(key):
            continue
        if key not in ma or key not in mb:
            out.append(Difference(f"metadata.{key}", ma.get(key, "(absent)"), mb.get(key, "(absent)")))
            continue
        try:
            a, b = json.loads(ma[key]), json.loads(mb[key])
        except ValueError:
            out.append(Difference(f"metadata.{key}", ma[key], mb[key]))
            continue
        _diff_values(f"metadata.{key}", a, b, out)
    return out


def rebuild_and_compare(opts, from_artifact: Path | None, log) -> CheckResult:
    """Rebuild the artifact `opts` describe (or the one `from_artifact` recorded) in a temporary
    folder and compare it with the committed one; `log` gets the progress lines."""
    committed = from_artifact or opts.resolve(opts.out)
    if committed is None:
        raise UsageError("the job names no [output] artifact to compare with")
    if not committed.is_file():
        raise ArtifactError(f"no artifact at {committed} to check; build it first: specbound calibrate --job JOB")
    if opts.cost_model is None and opts.costs_file is None:
        log("note: the job pins no cost model ([costs] file), so the rebuild uses this machine's; it can match only where the artifact was built")
    tmp, rebuild = check_options(opts, committed)
    try:
        log(f"rebuilding {committed.name} in {tmp} ...")
        return compare_files(committed, run_calibration(rebuild).artifact)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_options(opts, committed: Path):
    """Options that rebuild `opts`' artifact in a fresh temporary folder: its own work folder and
    SQLite study, one worker, no live measurement (none of which changes a byte)."""
    tmp = Path(tempfile.mkdtemp(prefix="specbound-check-"))
    return tmp, dataclasses.replace(
        opts, out=tmp / committed.name, work_dir=tmp / "work", storage=None, study_name=None, workers=1,
        measure_prompts=0, force=True, remeasure_costs=False,
    )


def compare_files(committed: Path, rebuilt: Path) -> CheckResult:
    a, b = committed.read_bytes(), rebuilt.read_bytes()
    digests = (hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest())
    if a == b:
        return CheckResult(committed, True, digests)
    try:
        theirs = read_artifact(committed)
    except ArtifactError as e:
        return CheckResult(committed, False, digests, [Difference("file", str(e), "a valid artifact")])
    return CheckResult(committed, False, digests, compare_artifacts(theirs, read_artifact(rebuilt)))


def policy_changes(source: Path, rebuilt: Path) -> list[dict]:
    """The policy fields and the predictions that differ between an artifact and its retune."""
    keep = ("policy.", "metadata.predicted_speedup")
    diffs = compare_artifacts(read_artifact(source), read_artifact(rebuilt))
    return [d.to_dict() for d in diffs if d.field.startswith(keep)]


def changes_words(changes: list[dict]) -> str:
    """`policy_changes` in words: each field's old and new value (a field of many values, only that it moved)."""
    words = [
        f"{c['field']} ({len(c['committed'])} values) moved" if isinstance(c["committed"], list) and len(c["committed"]) > 4
        else f"{c['field']} {c['committed']} -> {c['rebuilt']}"
        for c in changes
    ]
    return "; ".join(words) or "nothing in the policy"


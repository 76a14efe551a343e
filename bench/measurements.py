"""The bench's measurements on disk, one JSON line each, so that an interrupted bench resumes.

`<out>/measurements.jsonl` starts with one line holding the bench's settings and their hash; then
comes one line per finished measurement (phase, answer, method, grid value, repeat, token ids,
wall time, pass statistics, drafted and accepted tokens by source, and the settings hash; lines
written before sources were recorded lack them and load with None), appended and fsynced before the next run
starts. A kill can tear only the last line; opening the log drops a torn last line. Rerunning the
same command loads every line and runs only what is missing; a different command (other
settings) in the same folder is refused with `SettingsMismatchError`, since its numbers could
not be put in one table.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from specbound_runtime.errors import InputError, UsageError
from specbound_runtime.files import atomic_write_bytes

from .answers import Answer
from .methods import Generation, Variant

MEASUREMENTS_FILE = "measurements.jsonl"
PHASES = ("timed", "grid")  # the interleaved repeats; hf-early-exit's layer choice on the first answer


class SettingsMismatchError(UsageError):
    """The output folder holds measurements of a bench with other settings."""


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class MeasurementKey:
    """Which measurement: a variant on an answer in one repeat of one phase."""

    phase: str
    answer: int
    variant: Variant
    repeat: int

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.answer < 0 or self.repeat < 0:
            raise ValueError("answer and repeat must be >= 0")


@dataclass(frozen=True)
class Measurement:
    """One timed generation."""

    key: MeasurementKey
    generation: Generation
    wall_time_s: float

    def to_record(self, settings_sha: str, answer: Answer) -> dict:
        k, g = self.key, self.generation
        return {
            "settings_hash": settings_sha,
            "phase": k.phase,
            "answer": k.answer,
            # for a reader of the file; the answer index is what counts
            "task": answer.task,
            "question_id": answer.prompt.id,
            "turn": answer.turn,
            "method": k.variant.method,
            "value": k.variant.value,
            "repeat": k.repeat,
            "token_ids": list(g.token_ids),
            "wall_time_s": self.wall_time_s,
            "accept_lengths": None if g.accept_lengths is None else list(g.accept_lengths),
            "passes": g.passes,
            "drafted": g.drafted,
            "drafted_by_source": None if g.drafted_by_source is None else dict(g.drafted_by_source),
            "accepted_by_source": None if g.accepted_by_source is None else dict(g.accepted_by_source),
        }

    @classmethod
    def from_record(cls, r: dict) -> Measurement:
        key = MeasurementKey(r["phase"], int(r["answer"]), Variant(r["method"], r["value"]), int(r["repeat"]))
        lengths = None if r["accept_lengths"] is None else tuple(int(x) for x in r["accept_lengths"])
        sources = [r.get(k) for k in ("drafted_by_source", "accepted_by_source")]  # absent in older logs
        drafted, accepted = (None if s is None else tuple(sorted((str(k), int(v)) for k, v in s.items())) for s in sources)
        generation = Generation(tuple(int(t) for t in r["token_ids"]), lengths, r["passes"], r["drafted"], drafted, accepted)
        return cls(key, generation, float(r["wall_time_s"]))


def _parse_line(raw: bytes) -> dict | None:
    """A complete line's JSON object, or None for a torn or garbled one."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MeasurementLog:
    """The measurements of one bench: those on disk when opened, and each one appended since.
    Open it with `MeasurementLog.open` and use it as a context manager."""

    def __init__(self, path: Path, settings_sha: str, measurements: dict[MeasurementKey, Measurement], fd: int):
        self.path = path
        self.settings_hash = settings_sha
        self._measurements = measurements
        self._fd = fd
        self.loaded = len(measurements)  # how many came from disk

    @classmethod
    def open(cls, path: Path, settings: dict) -> MeasurementLog:
        """Load `path` (creating it with a settings line if it is new or empty), drop a torn last
        line, and refuse measurements of other settings."""
        path = Path(path)
        sha = settings_hash(settings)
        data = path.read_bytes() if path.exists() else b""
        lines = data.splitlines(keepends=True)
        records, kept = [], 0
        for i, raw in enumerate(lines):
            record = _parse_line(raw)
            if record is None:
                if i < len(lines) - 1:
                    raise InputError(f"{path} line {i + 1} is not a measurement; delete the file to start the bench over")
                print(f"note: ignoring the torn last line of {path} (an interrupted write)", file=sys.stderr, flush=True)
                break
            records.append(record)
            kept += len(raw)
        if not records:
            header = {"settings_hash": sha, "settings": settings}
            atomic_write_bytes(path, (json.dumps(header, sort_keys=True) + "\n").encode())
        else:
            _check_settings(path, records[0], settings, sha)
            if kept < len(data):
                os.truncate(path, kept)
        measurements = {}
        for i, record in enumerate(records[1:], start=2):
            if record.get("settings_hash") != sha:
                raise InputError(f"{path} line {i} belongs to another bench; delete the file to start the bench over")
            try:
                m = Measurement.from_record(record)
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{path} line {i} is not a measurement ({e}); delete the file to start the bench over") from None
            measurements[m.key] = m
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.fsync(fd)
        return cls(path, sha, measurements, fd)

    def __enter__(self) -> MeasurementLog:
        return self

    def __exit__(self, *exc) -> bool:
        os.close(self._fd)
        return False

    def __len__(self) -> int:
        return len(self._measurements)

    def get(self, key: MeasurementKey) -> Measurement | None:
        return self._measurements.get(key)

    def append(self, measurement: Measurement, answer: Answer) -> None:
        """Write one line and fsync it: once this returns, the measurement survives a kill."""
        data = (json.dumps(measurement.to_record(self.settings_hash, answer), sort_keys=True) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._measurements[measurement.key] = measurement


def _check_settings(path: Path, header: dict, settings: dict, sha: str) -> None:
    if header.get("settings_hash") == sha:
        return
    theirs = header.get("settings")
    if not isinstance(theirs, dict):
        raise InputError(f"{path} does not start with bench settings; delete the file to start the bench over")
    differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k)) or ["format"]
    raise SettingsMismatchError(
        f"{path.parent} holds measurements of a bench with other settings ({', '.join(differ)} differ); "
        f"pass another --out, or delete {path} to start over"
    )

"""What a calibration run takes: its options, checked, and where relative paths start.
calibrate/job.py maps each option to a job-file key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from specbound_runtime.errors import UsageError
from specbound_runtime.policy import default_check_layers

from .precision import RECORD_DTYPES
from .study import check_storage_url, is_shared


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

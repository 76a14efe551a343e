"""One calibration run from its options: the plan, recording and tuning (with local worker
processes beside this one when asked), then the export and its live check."""

from __future__ import annotations

import sys

from specbound_runtime.errors import UsageError

from .export import CalibrationOutcome, export
from .options import CalibrateOptions
from .pipeline import collect_and_tune, payload, prepare
from .progress import log
from .workers import start_local_workers


def run_calibration(opts: CalibrateOptions) -> CalibrationOutcome:
    """Collect, fit, tune and export one artifact; with workers > 1, workers 1.. run as local
    processes beside this one (worker 0), sharing the work folder and the study."""
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
            log(f"warning: worker {index} exited with code {code}; the others finished its share")
    return export(plan, collected)

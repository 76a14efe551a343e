"""What a calibration run shows while it works: progress bars and log lines, on stderr."""

from __future__ import annotations

import sys


def bar(total, desc, unit, quiet: bool = False):
    """A progress bar on stderr (none when quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True, disable=quiet)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

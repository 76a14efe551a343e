"""Reading values from the device on the host: the one place the decode loop synchronises.

Every decision the loop makes on the host (exit or not, which token, how many drafts to keep)
needs values computed on the device. Each such read waits for the device to finish its queued
work. The loop reads once per exit decision and once per verification, each time through
`read`, so the count is easy to see, to test and to keep down.
"""

from __future__ import annotations

import torch


def read(values: torch.Tensor) -> list:
    """The values of a small tensor as Python numbers: one device-to-host copy."""
    return values.to("cpu", copy=True).tolist()

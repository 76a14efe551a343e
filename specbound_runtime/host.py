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


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (token ids) as a tensor on `device` without waiting for the device: a plain
    copy from pageable memory to a GPU synchronises the stream, a copy from pinned memory with
    non_blocking=True does not (torch's caching host allocator keeps the buffer until it is done)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


class HostReadCounter:
    """Counts host reads of tensor values while active (`.item()`, `int()`/`float()`/`bool()` of
    a tensor, copies to the CPU): on a GPU each one is a synchronisation. A diagnostic for tests
    and scripts (`with HostReadCounter() as reads: ...; reads.count`), not used while decoding.

    On a CPU a host-to-device copy looks like a copy to the CPU too; the decode loop makes its
    host-to-device copies with `torch.tensor(..., device=...)`, which is not counted."""

    SCALAR_READS = ("item", "is_nonzero", "_local_scalar_dense")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                to_cpu = name in ("to", "_to_copy") and any(
                    str(a) == "cpu" for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))
                )
                if name in HostReadCounter.SCALAR_READS or to_cpu:
                    counter.count += 1
                return func(*args, **kwargs)

        self.count = 0
        self._mode = _Mode()

    def __enter__(self) -> "HostReadCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

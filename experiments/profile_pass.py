"""One verification pass of SmolLM2, as the engine runs it (the cost model's `_verification`),
timed over 1 and 4 positions after 256 tokens, then profiled over five one-position passes:
which ops take the pass's time. Usage: .venv/bin/python experiments/profile_pass.py (seconds).
"""

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import specbound_runtime as sb
from specbound.calibrate.costs import _verification


def main() -> None:
    lm = sb.load("smollm2-135m").lm
    with torch.inference_mode():
        verification = _verification(lm, 256)
        for n in (1, 4):
            samples = []
            for _ in range(30):
                started = time.perf_counter()
                verification(n)
                samples.append(time.perf_counter() - started)
            print(f"{n} position(s): median {statistics.median(samples) * 1000:.2f} ms")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                verification(1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


if __name__ == "__main__":
    main()

"""The weight products of one decoder layer and the LM head, SmolLM2's shapes, timed alone per kernel.

F.linear (MKL), torch.mv, and oneDNN's linear on a weight prepacked once (what kernels.py uses),
for 1 and 4 rows. Thirty copies of each layer weight are cycled, so that each product reads its
weight from memory, as a pass over 30 layers does, not from the 32 MB L3. Prints ms per product
and the read rate it implies. Usage: .venv/bin/python experiments/gemv_kernels.py (about a minute).
"""

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def median_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def main() -> None:
    torch.manual_seed(0)
    for name, (rows_out, cols) in SHAPES.items():
        copies = 1 if name == "head" else 30
        weights = [torch.randn(rows_out, cols) for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]
        megabytes = rows_out * cols * 4 / 1e6
        for rows in (1, 4):
            x = torch.randn(rows, cols)
            timings = {
                "F.linear": median_ms(lambda: [F.linear(x, w) for w in weights]) / copies,
                "onednn": median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]) / copies,
            }
            if rows == 1:
                timings["torch.mv"] = median_ms(lambda: [torch.mv(w, x[0]) for w in weights]) / copies
            line = "  ".join(f"{k} {ms:.3f} ms ({megabytes / ms:.1f} GB/s)" for k, ms in timings.items())
            print(f"{name:8s} rows={rows} {megabytes:6.2f} MB  {line}")


if __name__ == "__main__":
    main()

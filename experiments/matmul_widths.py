"""The model's weight products alone, by the number of rows: why a pass's cost is not linear in
the positions it verifies.

    .venv/bin/python experiments/matmul_widths.py [MODEL=smollm2-135m]

Times F.linear of n rows through every 2-D weight of the decoder layers and the LM head, in model
order (so the weights stream from memory as in a pass), for n = 1..16: the median of 7 runs.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(model: str) -> None:
    import specbound_runtime as sb

    loaded = sb.load(model)
    weights = [p.detach() for name, p in loaded.model.named_parameters() if p.dim() == 2 and "embed" not in name]
    weights.append(loaded.model.lm_head.weight.detach())
    print(f"{len(weights)} weight matrices, {sum(w.numel() for w in weights) / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    print("| rows | ms | vs 1 row |")
    print("| ---: | ---: | ---: |")
    first = None
    with torch.inference_mode():
        for n in (1, 2, 3, 4, 5, 6, 8, 12, 16):
            xs = [torch.randn(1, n, w.shape[1]) for w in weights]

            def run():
                for x, w in zip(xs, weights):
                    torch.nn.functional.linear(x, w)

            run()
            samples = []
            for _ in range(7):
                started = time.perf_counter()
                run()
                samples.append(time.perf_counter() - started)
            ms = statistics.median(samples) * 1000
            first = first or ms
            print(f"| {n} | {ms:.1f} | {ms / first:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")

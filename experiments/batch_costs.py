"""What a shared verification pass costs by batch rows and positions per row (SmolLM2, fp32).

    .venv/bin/python experiments/batch_costs.py [--context 256] [--repeats 5] [--artifact A]

Times `HFCausalLM.batch_pass` plus the LM head over each row's positions, for batch sizes 1, 2,
4, 8, 16 and 1-8 positions per row, every row at the same context. Prints milliseconds per pass
and the cost relative to a one-position pass at that batch size (what one extra drafted position
per row costs there). With --artifact, the same ratios as the artifact's cost model predicts them
(batch.PassPrices: a pass priced by rows times positions), which the batch engine's width rule
(batch.batch_draft_width) and each round's width (batch.round_width) use."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specbound_runtime as sb
from specbound_runtime.batch import BatchKVCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--widths", default="1,2,3,4,5,6,8")
    ap.add_argument("--artifact", default=None)
    args = ap.parse_args()
    m = sb.load("smollm2-135m", artifact=args.artifact)
    from specbound_runtime.batch import PassPrices

    prices = PassPrices.from_metadata(m.artifact_metadata)
    lm = m.lm
    print(m.kernels.report.describe())
    widths = [int(w) for w in args.widths.split(",")]
    print("rows | " + " | ".join(f"W={w}" for w in widths) + " | per extra position")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            cache = BatchKVCache(lm.num_layers, rows, args.context + max(widths) + 1)
            ids = torch.randint(100, 1000, (rows, args.context))
            lm.batch_pass(lm.embed_rows(ids), [0] * rows, cache)
            cells = []
            for w in widths:
                x = torch.randint(100, 1000, (rows, w))
                times = []
                for _ in range(args.repeats + 1):
                    t = time.perf_counter()
                    h = lm.batch_pass(lm.embed_rows(x), [args.context] * rows, cache)
                    lm.rows_logits(h.reshape(-1, h.shape[-1]))[-1, 0].item()
                    times.append(time.perf_counter() - t)
                cells.append(statistics.median(times[1:]) * 1e3)
            slope = (cells[-1] - cells[0]) / (widths[-1] - widths[0]) / cells[0]
            print(f"{rows} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {slope:.1%} of a 1-position pass")
            ratios = " | ".join(f"{c / cells[0]:.2f}" for c in cells)
            line = f"  measured / W=1: {ratios}"
            if prices is not None:
                line += "; predicted: " + " | ".join(f"{prices.pass_ms(rows * w) / prices.pass_ms(rows):.2f}" for w in widths)
                line += f"; draft bound a row: {m.batch_width(rows)}"
            print(line)


if __name__ == "__main__":
    main()

"""Grouped-query attention under a mask: transformers' SDPA path (repeat every cached key and value
per query group, then SDPA) against SDPA's own `enable_gqa=True`, on SmolLM2's attention shapes
(9 query heads over 3 key/value heads, head dim 64), 1-8 new positions after 256 and 1,024 cached
ones. Prints milliseconds per call for each and whether the outputs are bitwise equal.

    .venv/bin/python experiments/masked_gqa.py [REPEATS=200]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def _ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    torch.manual_seed(0)
    for context in (256, 1024):
        for k in (1, 2, 4, 8):
            q, key, value = torch.randn(1, 9, k, 64), torch.randn(1, 3, context + k, 64), torch.randn(1, 3, context + k, 64)
            mask = (torch.arange(context + k)[None] <= torch.arange(context, context + k)[:, None])[None, None]

            def repeated():
                return F.scaled_dot_product_attention(q, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask)

            def grouped():
                return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, enable_gqa=True)

            with torch.inference_mode():
                same = torch.equal(repeated(), grouped())
                print(
                    f"context {context} positions {k}: repeat {_ms(repeated, repeats):.3f} ms, "
                    f"enable_gqa {_ms(grouped, repeats):.3f} ms, bitwise equal {same}"
                )


if __name__ == "__main__":
    main()

"""Measure the cost model of the decode loop on this machine, for this model.

Timings vary from run to run, so a measurement is cached per machine, model and short-list size:
tuning from the same recorded data then gives the same artifact, byte for byte. Pass
`remeasure=True` (`--remeasure-costs`) to refresh it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.exit_head import ExitHeadWeights, FittedExitHead
from specbound_runtime.policy import decide_exit

from specbound_runtime.files import atomic_write_bytes
from .simulate import CostModel


def _time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    # the minimum: other processes only ever add time
    return min(samples) * 1000.0


def measure_costs(lm: HFCausalLM, shortlist_size: int, context: int = 128, repeats: int = 5) -> CostModel:
    L = lm.num_layers
    cache = lm.new_cache(context + 16)
    ids = [(7 * i + 3) % lm.vocab_size for i in range(context)]
    with torch.inference_mode():
        hidden = lm.embed(torch.tensor(ids))
        for layer in range(L):
            hidden = lm.run_layer(layer, hidden, 0, cache)

        def layers(k: int):
            x = lm.embed(torch.tensor(ids[:k]))
            def run():
                for layer in range(L):
                    lm.run_layer(layer, x, context, cache)
                cache.truncate(context)
            return run

        layers(1)()  # warm-up
        one = _time(layers(1), repeats) / L
        eight = _time(layers(8), repeats) / L
        h1 = lm.embed(torch.tensor(ids[:1]))
        h8 = lm.embed(torch.tensor(ids[:8]))
        head1 = _time(lambda: lm.final_logits(h1), repeats * 4)
        head8 = _time(lambda: lm.final_logits(h8), repeats * 4)
        size = min(shortlist_size, lm.vocab_size)
        weights = ExitHeadWeights(shortlist=torch.arange(size), lens={1: (torch.eye(h1.shape[-1]), torch.zeros(h1.shape[-1]))})
        head = FittedExitHead(weights, lm.normed, lm.lm_head_weight, lm.softcap)
        check = _time(lambda: decide_exit(head(h1, 1)[-1], 1.0, 0.5), repeats * 4)
        # plain decoding per token, without the prefill: (17 tokens - 1 token) / 16
        long = min(generate(lm, ids[:32], 17, NoDrafter()).wall_time_s for _ in range(3))
        short = min(generate(lm, ids[:32], 1, NoDrafter()).wall_time_s for _ in range(3))
        per_token = (long - short) * 1000.0 / 16
    overhead = max(0.0, per_token - (L * one + head1))
    return CostModel(
        num_layers=L,
        layer_base=one,
        layer_extra=max(0.0, (eight - one) / 7),
        head_base=head1,
        head_extra=max(0.0, (head8 - head1) / 7),
        check=check,
        round_overhead=overhead,
    )


def cached_costs(lm: HFCausalLM, fingerprint, shortlist_size: int, cache_root: Path, remeasure: bool = False) -> CostModel:
    key = "-".join(
        [
            fingerprint.weights_sha256[:16],
            f"s{shortlist_size}",
            f"t{torch.get_num_threads()}",
            platform.machine(),
            f"c{os.cpu_count()}",
        ]
    )
    path = cache_root / "costs" / f"{key}.json"
    if path.exists() and not remeasure:
        try:
            return CostModel(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # unreadable cache entry: measure again
    cost = measure_costs(lm, shortlist_size)
    atomic_write_bytes(path, json.dumps(cost.to_dict(), sort_keys=True).encode())
    return CostModel(**json.loads(path.read_text()))

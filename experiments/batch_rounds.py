"""Where a batch's time goes, round by round (SmolLM2, fp32, greedy):

    .venv/bin/python experiments/batch_rounds.py --artifact A [--rows 4] [--batches 4] [--max-new-tokens 128]

Decodes the batch bench's first batches (13 tasks' first turns, 3 a task, cut into batches of
--rows) three ways with the batch engine: plain (no drafts), the engine's own choice (the round
clock) and drafting every round. For each it prints tokens/s; for the drafting runs the shared
passes' measured seconds by width beside the artifact's price for them (batch_policy.PassPrices),
and the time a round spends outside its pass (drafting, acceptance, bookkeeping). With prices, each
way's bound: what its passes would cost if they had run only the drafts that were accepted."""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import specbound_runtime as sb
from specbound.bench.batches import batch_prompts, form_batches
from specbound.data.tasks import DEFAULT_TASKS
from specbound_runtime.batch import PassPrices, generate_batch
from specbound_runtime.decoder import Decoder
from specbound_runtime.drafters import Speculator
from specbound_runtime.engine import NoDrafter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ways", default="plain,clock,always", help="plain, clock, always, unpriced (every draft kept, every round)")
    args = ap.parse_args()
    m = sb.load("smollm2-135m", artifact=args.artifact)
    dec = Decoder(m)
    prompts = batch_prompts(DEFAULT_TASKS, 3)
    enc = {p.index: dec.encode([{"role": "user", "content": p.text}], True, args.max_new_tokens) for p in prompts}
    batches = form_batches(prompts, args.rows)[: args.batches]
    prices = PassPrices.from_metadata(m.artifact_metadata)
    eos = tuple(m.eos_token_ids)
    width = m.batch_width(args.rows)
    print(f"rows {args.rows}, draft bound a row {width}, policy sources {m.policy.sources}")
    ways = {
        "plain": (NoDrafter, True),
        "clock": (lambda: Speculator.for_batch(m.policy, frozenset(eos), width), True),
        "always": (lambda: Speculator.for_batch(m.policy, frozenset(eos), width), False),
        "unpriced": (lambda: Speculator.for_batch(m.policy, frozenset(eos), width), False),
    }
    for name in args.ways.split(","):
        make, adaptive = ways[name]
        tokens, seconds, by_width, outside = 0, 0.0, defaultdict(list), []
        drafted = accepted = 0
        oracle_ms = plain_ms = 0.0
        for batch in batches:
            ids = [list(enc[i].ids) for i in batch]
            t = time.perf_counter()
            r = generate_batch(m.lm, ids, args.max_new_tokens, make, eos, prices=None if name == "unpriced" else prices, adaptive=adaptive)
            seconds += time.perf_counter() - t
            tokens += sum(x.new_tokens for x in r.rows)
            drafted += r.drafted
            accepted += r.accepted
            for rows, w, s in zip(r.pass_rows, r.pass_widths, r.pass_seconds):
                by_width[(rows, w)].append(s)
            outside.append(r.wall_time_s - sum(r.pass_seconds))
            if prices is not None:
                # what the passes would cost, at the artifact's prices, if every round kept exactly
                # the drafts that were accepted (an oracle drafter with these sources), beside
                # plain batched decoding of the same rows (one pass a token)
                lengths = [list(x.accept_lengths[1:]) for x in r.rows]  # [0]: the prefill's token
                for p in range(max(len(x) for x in lengths)):
                    live = [x[p] for x in lengths if p < len(x)]
                    oracle_ms += prices.packed_ms(len(live), sum(live))
                emitted = [sum(x) for x in lengths]
                for t in range(max(emitted)):
                    plain_ms += prices.batch_ms(sum(1 for e in emitted if e > t), 1)
        passes = sum(len(v) for v in by_width.values())
        print(f"{name}: {tokens / seconds:.1f} tok/s, {passes} passes, accepted/drafted {accepted}/{drafted}, "
              f"outside the passes {sum(outside):.2f} s of {seconds:.2f} s ({sum(outside) / passes * 1000:.2f} ms a pass)")
        if oracle_ms:
            print(f"  priced: plain {plain_ms / 1000:.2f} s, an oracle keeping only these accepted drafts {oracle_ms / 1000:.2f} s "
                  f"({plain_ms / oracle_ms:.3f}x, passes alone, drafting free)")
        for (rows, w), v in sorted(by_width.items()):
            if len(v) >= 5:
                priced = f", priced {prices.batch_ms(rows, w):.1f}" if prices is not None else ""
                print(f"  {rows} rows x {w}: {len(v)} passes, median {statistics.median(v) * 1000:.1f} ms{priced}")


if __name__ == "__main__":
    main()

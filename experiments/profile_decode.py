"""Where decoding time goes: cProfile over SpecBound decoding bench prompts with an artifact.
    .venv/bin/python experiments/profile_decode.py artifacts/smollm2-135m.safetensors [N_PROMPTS=4] [TOKENS=128] [TASK=mt-bench]
Prints the share of wall time in drafting (shallow layers, exit checks, lookup), verification
(the remaining layers and the full LM head), and the rest; and the matmul share overall. Then,
from a second run without the profiler, the verification passes by width (positions verified):
how many, their median wall time, and what the artifact's cost model charges for them.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time


def main(artifact: str, n: int, tokens: int, task: str) -> None:
    from specbound.data.tasks import task_prompts
    import specbound_runtime as sb
    from specbound_runtime.decoder import Decoder

    decoder = Decoder(sb.load("smollm2-135m", artifact=artifact))
    encoded = [decoder.encode([{"role": "user", "content": p.text}], True, tokens) for p in task_prompts(task, n)]
    decoder.generate(encoded[0])  # warm-up
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    results = [decoder.generate(e) for e in encoded]
    profile.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profile).stats

    def cumulative(name: str, file: str = "") -> float:
        return sum(v[3] for k, v in stats.items() if k[2] == name and k[0].endswith(file))

    def total(name: str) -> float:
        return sum(v[2] for k, v in stats.items() if k[2] == name)

    new = sum(r.new_tokens for r in results)
    passes = sum(r.verify_passes for r in results)
    print(f"{n} prompts, {new} tokens, {passes} verification passes, {wall:.2f} s profiled")
    rows = [
        ("drafting (Speculator.draft)", cumulative("draft")),
        ("  of which exit checks (exit_logits + decide_exit)", cumulative("exit_logits") + cumulative("decide_exit")),
        ("verification (verify_logits: remaining layers + full LM head)", cumulative("verify_logits")),
        ("  of which the full LM head (final_logits)", cumulative("final_logits")),
        ("matrix products everywhere (torch linear, addmm, matmul)", total("<built-in method torch._C._nn.linear>") + total("<built-in method torch.addmm>")),
        ("attention kernels (scaled_dot_product_attention)", total("<built-in method torch._C._nn.scaled_dot_product_attention>")),
    ]
    profiled = cumulative("generate", "engine.py")
    for label, seconds in rows:
        print(f"{label:66s} {seconds:7.2f} s  {100 * seconds / profiled:5.1f}%")
    print(f"{'the rest (Python, module dispatch, bookkeeping)':66s} {profiled - cumulative('draft') - cumulative('verify_logits'):7.2f} s")
    passes_by_width(decoder, encoded, artifact)


def passes_by_width(decoder, encoded, artifact: str) -> None:
    import collections
    import json
    import statistics

    from specbound.calibrate.simulate import CostModel
    from specbound_runtime import engine
    from specbound_runtime.artifact import read_artifact

    timed = collections.defaultdict(list)
    verify_logits = engine.DecodeState.verify_logits

    def timed_verify(seq):  # this script's own stopwatch around the engine's pass
        started = time.perf_counter()
        out = verify_logits(seq)
        timed[len(seq.drafts) + 1].append(time.perf_counter() - started)
        return out

    engine.DecodeState.verify_logits = timed_verify
    try:
        started = time.perf_counter()
        results = [decoder.generate(e) for e in encoded]
        wall = time.perf_counter() - started
    finally:
        engine.DecodeState.verify_logits = verify_logits
    raw = read_artifact(artifact).metadata.get("cost_model")
    cost = CostModel(**json.loads(raw)) if raw else None
    new = sum(r.new_tokens for r in results)
    print(f"\nwithout the profiler: {new} tokens in {wall:.2f} s ({new / wall:.1f} tok/s); "
          f"verification passes {sum(sum(v) for v in timed.values()):.2f} s, the rest {wall - sum(sum(v) for v in timed.values()):.2f} s")
    print("| positions verified | passes | median ms | cost model ms |")
    print("| ---: | ---: | ---: | ---: |")
    for width in sorted(timed):
        charged = f"{cost.num_layers * cost.layer_call(width) + cost.head_call(width):.1f}" if cost else "-"
        note = " (with the prompts' prefills)" if width == 1 else ""
        print(f"| {width}{note} | {len(timed[width])} | {1000 * statistics.median(timed[width]):.1f} | {charged} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else "artifacts/smollm2-135m.safetensors", int(args[1]) if len(args) > 1 else 4,
        int(args[2]) if len(args) > 2 else 128, args[3] if len(args) > 3 else "mt-bench",
    )

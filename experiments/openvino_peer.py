"""OpenVINO GenAI beside SpecBound on the same prompts (SmolLM2, fp32, greedy, batch 1):

    bash scripts/openvino_export.sh ~/.cache/specbound/gguf/<folder> runs/ov-fp32
    .venv/bin/python experiments/openvino_peer.py --export runs/ov-fp32 \
        --alone runs/bench-batches-g2/alone.jsonl --artifact runs/greedy-g2.safetensors

The prompts and their reference answers (greedy `generate()` on each prompt alone) come from a
batch bench's `alone.jsonl` (`specbound bench --batch-size ...`: the 13 tasks' first turns).
Runs, one after the other on the same prompts: OpenVINO GenAI's `LLMPipeline` on the fp32 export
(inference precision, KV cache precision f32, no dynamic quantization: the CPU plugin's defaults
would compute in bf16 or int8 where the CPU has them), the same with its prompt lookup
(`prompt_lookup=True`, --lookup-tokens candidates a round, n-gram up to --ngram), SpecBound's own
plain decoding (`ar`) and SpecBound with the artifact. Prints tokens/s (tokens up to and including
each answer's EOS over the summed wall time of the answers) and, for each, how many answers equal
the reference token for token, with the first divergence where one does not.

OpenVINO GenAI is not one of SpecBound's dependencies: its two ways run in a child process in the
exporter's environment (scripts/openvino_export.sh made it, with openvino-genai; --ov-python
names its interpreter), which reads the prompts and prints its results as JSON. Loads are timed
apart from the answers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
OV_WAYS = ("ov-genai", "ov-genai-lookup")


def first_divergence(ours: list[int], reference: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


def measure(rows: list[dict], eos: set[int], run) -> dict:
    run(rows[0]["ids"][:32], 4)  # warm-up, not timed
    tokens, seconds, same, first = 0, 0.0, 0, []
    for r in rows:
        t = time.perf_counter()
        out = run(r["ids"], r["max_new_tokens"])
        seconds += time.perf_counter() - t
        out = out[: next((i + 1 for i, x in enumerate(out) if x in eos), len(out))]  # up to and including EOS
        tokens += len(out)
        d = first_divergence(out, r["tokens"])
        same += d is None
        if d is not None:
            first.append((r["index"], d))
    return {"tokens": tokens, "seconds": seconds, "identical": same, "answers": len(rows), "first_divergences": first}


def ov_worker(args, rows: list[dict], eos: set[int]) -> None:
    """In the exporter's environment: OpenVINO GenAI's two ways, as JSON on stdout."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    results = {}
    for way in args.ways.split(","):
        lookup = way == "ov-genai-lookup"
        started = time.perf_counter()
        pipe = og.LLMPipeline(args.export, "CPU", prompt_lookup=True, **F32) if lookup else og.LLMPipeline(args.export, "CPU", **F32)
        load = time.perf_counter() - started
        config = pipe.get_generation_config()
        config.do_sample = False
        if lookup:
            config.num_assistant_tokens, config.max_ngram_size = args.lookup_tokens, args.ngram

        def run(ids, n, pipe=pipe, config=config):
            config.max_new_tokens = n
            x = np.array([ids], dtype=np.int64)
            return [int(t) for t in pipe.generate(og.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x))), config).tokens[0]]

        results[way] = {**measure(rows, eos, run), "load_s": load}
        del pipe
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True, help="an OpenVINO IR folder (scripts/openvino_export.sh)")
    ap.add_argument("--alone", required=True, help="a batch bench's alone.jsonl")
    ap.add_argument("--artifact", help="SpecBound's artifact (needed for the specbound way)")
    ap.add_argument("--lookup-tokens", type=int, default=5)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--ways", default="ov-genai,ov-genai-lookup,ar,specbound")
    default_env = os.path.expanduser(os.environ.get("SPECBOUND_OV_EXPORT_ENV", "~/.cache/specbound/ov-export-env"))
    ap.add_argument("--ov-python", default=os.path.join(default_env, "bin", "python"))
    ap.add_argument("--ov-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.alone)]
    eos = json.load(open(os.path.join(args.export, "generation_config.json")))["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    if args.ov_worker:
        ov_worker(args, rows, eos)
        return
    ways = args.ways.split(",")
    results = {}
    ov_ways = [w for w in ways if w in OV_WAYS]
    if ov_ways:
        if not os.path.exists(args.ov_python):
            sys.exit(f"Error: no OpenVINO environment at {args.ov_python}: run scripts/openvino_export.sh first (or give --ov-python)")
        command = [args.ov_python, __file__, "--ov-worker", "--export", args.export, "--alone", args.alone,
                   "--lookup-tokens", str(args.lookup_tokens), "--ngram", str(args.ngram), "--ways", ",".join(ov_ways)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"Error: the OpenVINO run failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    for way in (w for w in ways if w not in OV_WAYS):
        import torch

        import specbound_runtime as sb
        from specbound_runtime.generation import generate_arguments

        started = time.perf_counter()
        m = sb.load("smollm2-135m", artifact=args.artifact)
        load = time.perf_counter() - started

        def run(ids, n, m=m, speculation=way == "specbound"):
            out = m.generate_with_stats(torch.tensor([ids]), **generate_arguments(n, m.eos_token_ids, None), speculation=speculation)
            return out.sequences[0, len(ids):].tolist()

        results[way] = {**measure(rows, eos, run), "load_s": load}
    for way in ways:
        r = results[way]
        rate = r["tokens"] / r["seconds"]
        r["tokens_per_s"] = rate
        print(f"{way}: {rate:.1f} tok/s ({r['tokens']} tokens, {r['seconds']:.1f} s; load {r['load_s']:.1f} s), "
              f"identical to generate() alone {r['identical']}/{r['answers']}"
              + (f", first divergences (prompt, position) {r['first_divergences'][:6]}" if r["first_divergences"] else ""))
    if "ar" in results:
        print("vs ar: " + ", ".join(f"{k} {v['tokens_per_s'] / results['ar']['tokens_per_s']:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()

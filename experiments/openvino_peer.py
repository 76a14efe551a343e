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
the reference token for token, with the first divergence where one does not. Needs the
`openvino-genai` wheel (`pip install 'specbound[peers]'`); the load is timed apart."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True, help="an OpenVINO IR folder (scripts/openvino_export.sh)")
    ap.add_argument("--alone", required=True, help="a batch bench's alone.jsonl")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--lookup-tokens", type=int, default=5)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--ways", default="ov-genai,ov-genai-lookup,ar,specbound")
    args = ap.parse_args()
    import openvino as ov
    import openvino_genai as og

    from specbound_runtime.exactness import first_divergence

    rows = [json.loads(line) for line in open(args.alone)]
    eos = json.load(open(f"{args.export}/generation_config.json"))["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    results = {}
    for way in args.ways.split(","):
        started = time.perf_counter()
        if way.startswith("ov-genai"):
            lookup = way == "ov-genai-lookup"
            pipe = og.LLMPipeline(args.export, "CPU", prompt_lookup=True, **F32) if lookup else og.LLMPipeline(args.export, "CPU", **F32)
            config = pipe.get_generation_config()
            config.do_sample = False
            if lookup:
                config.num_assistant_tokens, config.max_ngram_size = args.lookup_tokens, args.ngram

            def run(ids, n, pipe=pipe, config=config):
                config.max_new_tokens = n
                x = np.array([ids], dtype=np.int64)
                return [int(t) for t in pipe.generate(og.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x))), config).tokens[0]]
        else:
            import torch

            import specbound_runtime as sb
            from specbound_runtime.generation import generate_arguments

            m = sb.load("smollm2-135m", artifact=args.artifact)

            def run(ids, n, m=m, speculation=way == "specbound"):
                out = m.generate_with_stats(
                    torch.tensor([ids]), **generate_arguments(n, m.eos_token_ids, None), speculation=speculation
                )
                return out.sequences[0, len(ids):].tolist()
        load = time.perf_counter() - started
        run(rows[0]["ids"][:32], 4)  # warm-up, not timed
        tokens, seconds, same, first = 0, 0.0, 0, []
        for r in rows:
            t = time.perf_counter()
            out = run(r["ids"], r["max_new_tokens"])
            seconds += time.perf_counter() - t
            ref = r["tokens"]
            cut = next((i + 1 for i, x in enumerate(out) if x in eos), len(out))  # up to and including EOS
            out = out[:cut]
            tokens += len(out)
            d = first_divergence(out, ref)
            same += d is None
            if d is not None:
                first.append((r["index"], d))
        results[way] = tokens / seconds
        print(f"{way}: {tokens / seconds:.1f} tok/s ({tokens} tokens, {seconds:.1f} s; load {load:.1f} s), "
              f"identical to generate() alone {same}/{len(rows)}" + (f", first divergences (prompt, position) {first[:6]}" if first else ""))
    if "ar" in results:
        print("vs ar: " + ", ".join(f"{k} {v / results['ar']:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()

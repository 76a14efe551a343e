"""How often SpecBound's output is token-identical to generate() on real prompts, and how far
apart the two are where they differ; also the host reads (device synchronisations) per token.

    .venv/bin/python scripts/identity_rate.py [--dtype bfloat16] [--artifact A] [--prompts 65] [--tokens 128]
        [--no-speculation] [--kernels auto|onednn|eager] [--tasks writing,coding,...]

Prompts are the bench's tasks (data.tasks; all 13 by default, the same number from each, none
in any calibration corpus). For each prompt, both decode the
chat-templated prompt greedily on the same device and dtype; a difference is reported at its
first position with the reference model's logit margin there (reference token minus ours).
Prints one JSON object per prompt, then a summary object, on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompts", type=int, default=65, help="spread evenly over the tasks")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: the bench's 13)")
    parser.add_argument("--kernels", default="auto", help="auto, onednn or eager (specbound_runtime.kernels)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-speculation", action="store_true", help="plain decoding through the same engine")
    parser.add_argument("--count-reads", type=int, default=3, help="prompts on which host reads are counted (slow)")
    args = parser.parse_args()

    import specbound_runtime as sb
    from specbound.data.tasks import DEFAULT_TASKS, task_prompts
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import divergence, reference_greedy
    from specbound_runtime.host import HostReadCounter

    m = sb.load(args.model, artifact=args.artifact, device=args.device, dtype=args.dtype, kernels=args.kernels)
    print(m.kernels.report.describe(), file=sys.stderr, flush=True)
    decoder = Decoder(m)
    tasks = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    per_task = -(-args.prompts // len(tasks))
    prompts = [(task, p) for task in tasks for p in task_prompts(task, per_task)][: args.prompts]
    identical = 0
    reads = tokens = 0
    ours_s = ref_s = 0.0
    rows = []
    for index, (task, prompt) in enumerate(prompts):
        enc = decoder.encode([{"role": "user", "content": prompt.text}], decoder.has_chat_template, args.tokens)
        started = time.perf_counter()
        result = decoder.generate(enc, speculation=not args.no_speculation)
        ours_s += time.perf_counter() - started
        if index < args.count_reads:  # counting intercepts every torch call: slow, so a sample
            with HostReadCounter() as counter:
                counted = decoder.generate(enc, speculation=not args.no_speculation)
            reads += counter.count
            tokens += counted.new_tokens
        started = time.perf_counter()
        ref = reference_greedy(m.model, list(enc.ids), enc.max_new_tokens, m.eos_token_ids)
        ref_s += time.perf_counter() - started
        div = divergence(m.model, list(enc.ids), list(result.token_ids), ref)
        identical += div is None
        row = {
            "prompt": index,
            "task": task,
            "new_tokens": result.new_tokens,
            "identical": div is None,
            "first_divergence": None if div is None else div.position,
            "logit_margin": None if div is None else div.margin,
            "tokens_after_divergence_equal": None
            if div is None
            else sum(a == b for a, b in zip(result.token_ids[div.position :], ref[div.position :])),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(f"prompt {index}: {'identical' if div is None else div.describe()}", file=sys.stderr, flush=True)
    summary = {
        "model": args.model,
        "artifact": args.artifact,
        "speculation": not args.no_speculation,
        "kernels": m.kernels.report.path,
        "tasks": tasks,
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "prompts": len(rows),
        "max_new_tokens": args.tokens,
        "identical": identical,
        "identity_rate": identical / len(rows) if rows else None,
        "host_reads_per_token": round(reads / tokens, 3) if tokens else None,
        "host_reads_counted_on_prompts": min(args.count_reads, len(rows)),
        "specbound_s": round(ours_s, 2),
        "generate_s": round(ref_s, 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

"""GPU check: exactness on tiny models and a short speed comparison, per dtype, on one device.

    .venv/bin/python scripts/gpu_check.py [--device cuda] [--dtypes float32,bfloat16,float16]
                                          [--artifact A] [--prompts 4] [--tokens 128] [--quick]

1. Exactness: tiny random models of every supported architecture, built in-process on the
   device in each dtype, decoded with drafters that are always right, always wrong, random, and
   early exit at the first check; each output is compared on token ids with `model.generate()`
   on the same device and dtype. Prints one line per (dtype, architecture).
2. Speed: SmolLM2-135M (built in) in each dtype: `generate()` against SpecBound (with
   --artifact, else the paper's schedule) on a few MT-Bench prompts, interleaved, with host
   reads (device synchronisations) per generated token. --quick skips this part.

Exit status 1 if any output differs from generate().
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def exactness(device: str, dtype: torch.dtype) -> list[tuple[str, str, bool]]:
    from tiny_models import ARCHITECTURES, ScriptedDrafter, tiny_model

    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.engine import generate
    from specbound_runtime.drafters import Speculator
    from specbound_runtime.exactness import reference_greedy
    from specbound_runtime.policy import ExitPolicy

    prompt, new = [5, 9, 20, 30, 40, 50, 60, 70], 40
    rows = []
    for arch in ARCHITECTURES:
        model = tiny_model(arch).to(device=device, dtype=dtype)
        lm = HFCausalLM(model)
        ref = reference_greedy(model, prompt, new, ())
        layers = tuple(range(1, lm.num_layers))
        drafters = {
            "always-right": ScriptedDrafter(ref, len(prompt), 1.0, 5, seed=0),
            "always-wrong": ScriptedDrafter(ref, len(prompt), 0.0, 5, seed=1),
            "random": ScriptedDrafter(ref, len(prompt), 0.6, 4, seed=2),
            "early-exit": Speculator.for_policy(ExitPolicy(lm.num_layers, layers, (1.0,) * len(layers), (0.0,) * len(layers), 3, 4)),
        }
        for name, drafter in drafters.items():
            with torch.inference_mode():
                ours = list(generate(lm, prompt, new, drafter).token_ids)
            rows.append((arch, name, ours == ref))
    return rows


def speed(device: str, dtype: str, artifact: str | None, prompts: int, tokens: int) -> dict:
    import specbound_runtime as sb
    from specbound.data.tasks import task_prompts
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy
    from specbound_runtime.host import HostReadCounter

    m = sb.load("smollm2-135m", artifact=artifact, device=device, dtype=dtype)
    decoder = Decoder(m)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    encs = [decoder.encode([{"role": "user", "content": p.text}], True, tokens) for p in task_prompts("mt-bench", prompts)]
    decoder.generate(encs[0])  # warm-up
    reference_greedy(m.model, list(encs[0].ids), 8, m.eos_token_ids)
    t_ref = t_ours = 0.0
    n_tokens = reads = identical = syncs = 0
    for enc in encs:
        sync()
        started = time.perf_counter()
        ref = reference_greedy(m.model, list(enc.ids), enc.max_new_tokens, m.eos_token_ids)
        sync()
        t_ref += time.perf_counter() - started
        started = time.perf_counter()
        with HostReadCounter() as counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("warn")  # torch warns at every synchronising call
            try:
                result = decoder.generate(enc)
            finally:
                if device.startswith("cuda"):
                    torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        sync()
        t_ours += time.perf_counter() - started
        reads += counter.count
        n_tokens += result.new_tokens
        identical += list(result.token_ids) == ref
    return {
        "generate_tok_s": round(n_tokens / t_ref, 1),
        "specbound_tok_s": round(n_tokens / t_ours, 1),
        "speedup": round(t_ref / t_ours, 3),
        "identical": f"{identical}/{len(encs)}",
        "host_reads_per_token": round(reads / max(1, n_tokens), 3),
        "cuda_syncs_per_token": round(syncs / max(1, n_tokens), 3) if device.startswith("cuda") else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="exactness only, no speed comparison")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("Error: no CUDA GPU visible to torch; run with --device cpu to check this script", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}")
    failed = 0
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        rows = exactness(args.device, dtype)
        bad = [(a, d) for a, d, ok in rows if not ok]
        failed += len(bad)
        print(f"[exactness {dtype_name}] {len(rows) - len(bad)}/{len(rows)} identical to generate()" + (f"; differ: {bad}" if bad else ""))
        if not args.quick:
            print(f"[speed {dtype_name}] {speed(args.device, dtype_name, args.artifact, args.prompts, args.tokens)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

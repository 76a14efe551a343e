"""Stage 5, the live check: decode held-out prompts for real, kind by kind, plain and tuned,
after the export (timed, so what it measures goes beside the artifact, never into it)."""

from __future__ import annotations

import torch

from specbound_runtime.sampling import prompt_seed

from . import collect as C
from .corpus import NO_KIND
from .progress import bar


def kind_by_kind(prompts: list) -> list:
    """Prompts reordered to take one of each kind in turn (kinds in first-seen order)."""
    by_kind: dict[str, list] = {}
    for p in prompts:
        by_kind.setdefault(p.kind or NO_KIND, []).append(p)
    queues = list(by_kind.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]

def measure(loaded, eos, policy, head, prompts, max_new_tokens: int, mode=None, seed: int = 0) -> dict:
    """Decode held-out prompts for real: plain (engine, no speculation) and tuned.

    Interleaved per prompt so machine drift hits both alike; greedy exactness checked on token
    ids. Under a sampling mode both sample prompt i with the seed (seed, i); their outputs then
    differ (only the distribution is the same), so "exact" is None. The paper's defaults are not
    decoded here (they ran at 0.57x, the slowest third of this stage): the simulator's figure for
    them is in the report, and `specbound bench` measures them (`specbound-paper`)."""
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.sampling import DecodingMode

    mode = mode or DecodingMode()

    plain = Decoder(loaded.uncalibrated())
    tuned = Decoder(loaded.with_policy(policy, head))
    times = {"plain": 0.0, "tuned": 0.0}
    tokens = {"plain": 0, "tuned": 0}
    per_kind: dict[str, dict[str, float]] = {}  # kind -> plain and tuned seconds and tokens
    accept = {"tuned": []}
    exact = True
    with bar(len(prompts), "measuring held-out decode", "prompt") as progress:
        for i, p in enumerate(prompts):
            enc = plain.encode([{"role": "user", "content": p.text}], plain.has_chat_template, max_new_tokens)
            run = lambda decoder, speculation: decoder.generate(  # noqa: E731
                enc, speculation=speculation, mode=mode,
                generator=torch.Generator().manual_seed(prompt_seed(seed, i)) if mode.do_sample else None,
            )
            ref = run(plain, False)
            b = run(tuned, True)
            exact &= ref.token_ids == b.token_ids
            for k, r in (("plain", ref), ("tuned", b)):
                times[k] += r.wall_time_s
                tokens[k] += r.new_tokens
            kind = per_kind.setdefault(getattr(p, "kind", "") or NO_KIND, dict.fromkeys(("plain_s", "plain_n", "tuned_s", "tuned_n"), 0.0))
            kind["plain_s"] += ref.wall_time_s
            kind["plain_n"] += ref.new_tokens
            kind["tuned_s"] += b.wall_time_s
            kind["tuned_n"] += b.new_tokens
            accept["tuned"].extend(b.accept_lengths)
            progress.update(1)
    tps = {k: tokens[k] / times[k] if times[k] else 0.0 for k in times}
    kinds = {
        kind: round((v["tuned_n"] / v["tuned_s"]) / (v["plain_n"] / v["plain_s"]), 4)
        for kind, v in per_kind.items() if v["tuned_s"] and v["plain_s"] and v["plain_n"]
    }
    return {
        "speedup_by_kind": kinds,
        "worst_kind": min(kinds, key=lambda k: (kinds[k], k)) if kinds else None,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "speedup_tuned": round(tps["tuned"] / tps["plain"], 4) if tps["plain"] else 0.0,
        "mean_accepted_length": {k: round(sum(v) / max(1, len(v)), 3) for k, v in accept.items()},
        "exact": None if mode.do_sample else bool(exact),
        "decoding_mode": mode.describe(),
    }

def collection_throughput(lm, weights, sample, settings) -> dict:
    """Tokens/s of recording (pass B) beside a plain teacher-forced forward, on a few sequences."""
    import time

    heads = C.exit_heads(lm, weights)
    tokens = sum(len(s.ids) for s in sample)
    if not tokens:
        return {}
    with torch.inference_mode():
        started = time.perf_counter()
        for s in sample:
            lm.layer_states(list(s.ids))
        forward = time.perf_counter() - started
        started = time.perf_counter()
        for s in sample:
            C.record_sequence(lm, heads, s, settings.candidate_layers)
        record = time.perf_counter() - started
    return {"plain_forward": round(tokens / forward, 1), "recording": round(tokens / record, 1), "tokens": tokens}

"""Measure the cost model of the decode loop on this machine, for this model.

Timings vary from run to run, so a measurement is cached per machine, model and short-list size:
tuning from the same recorded data then gives the same artifact, byte for byte. Pass
`remeasure=True` (`--remeasure-costs`) to refresh it. `specbound costs` writes a measurement to
a file that a job pins ([costs] file), so that every machine tunes against the same costs, and
prints it beside the hardware's memory floor (`costs_report`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.engine import DecodeState, NoDrafter, generate, verify
from specbound_runtime.exit_head import ExitHeadWeights, FittedExitHead
from specbound_runtime.policy import decide_exit
from specbound_runtime.sampling import Sampler, draft_probabilities

from specbound_runtime.errors import InputError
from specbound_runtime.files import atomic_write_bytes

from .simulate import CostModel

COSTS_KIND = "specbound-cost-model"


def _time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000.0


ROUNDS = 5  # independent measurement rounds; the cost model is their component-wise median
STABLE_SPREAD = 0.25  # rounds whose plain per-token cost spreads wider than this are remeasured
MAX_ATTEMPTS = 3
FAR_CONTEXT = 1024  # a second context, for what each token of context adds to a layer call
BATCH_ROWS = (1, 4, 16)  # batch sizes whose shared passes are timed (the tuner's batch sizes)
BATCH_WIDTHS = 6  # ... over W = 1..BATCH_WIDTHS positions a row
WIDTHS = 13  # layer calls and LM-head reads are timed over 1..WIDTHS positions (the tuner's widest pass)


def measure_costs(
    lm: HFCausalLM, shortlist_size: int, context: int = 256, repeats: int = 5, warpers=None,
    rounds: int = ROUNDS, warn=None, far: int | None = FAR_CONTEXT, batch_rows: tuple[int, ...] = BATCH_ROWS,
) -> CostModel:
    """The cost model: `rounds` independent rounds, each the median of `repeats` timings per
    component, combined by their median and kept as samples (`CostModel.samples`). When the rounds
    disagree by more than STABLE_SPREAD (another process took the CPU), measure again, up to
    MAX_ATTEMPTS times, keep the steadiest attempt and warn if it is still unsteady.

    With a sampling mode's warpers, an exit check includes drawing the draft from q and a
    decoding step includes speculative acceptance: both are timed that way. With `far`, each
    layer call is timed again after that many tokens (or as many as the model holds), for
    per-context pricing (`context_slopes`); None: priced at `context` alone. The batch engine's
    shared passes are timed for each batch size in `batch_rows` (none: batches unpriced)."""
    best = None
    for attempt in range(MAX_ATTEMPTS):
        measured = [_measure_round(lm, shortlist_size, context, repeats, warpers) for _ in range(rounds)]
        cost = CostModel.from_rounds(lm.num_layers, measured)
        if best is None or cost.spread < best.spread:
            best = cost
        if best.spread <= STABLE_SPREAD:
            break
    if warn is not None and best.spread > STABLE_SPREAD:
        warn(
            f"warning: the cost measurement is unsteady (plain decoding's per-token cost spreads "
            f"{best.spread:.0%} over {rounds} rounds): the machine is busy; tuning prefers policies that "
            "win under every round, and a cost file measured on a quiet machine (specbound costs) pins it"
        )
    best = _priced_by_context(lm, best, context, far, repeats)
    return with_batch_passes(lm, best, context, rows=batch_rows) if batch_rows else best


def with_batch_passes(
    lm: HFCausalLM, cost: CostModel, context: int = 256, repeats: int = 7, rows: tuple[int, ...] = BATCH_ROWS
) -> CostModel:
    """`cost` with the batch engine's shared passes measured (`batch_passes`), packed where this
    engine packs them (HFCausalLM.packs_batches)."""
    return cost.with_batch_passes(*batch_passes(lm, context, repeats, rows), packed=bool(getattr(lm, "packs_batches", False)))


def batch_passes(
    lm: HFCausalLM, context: int = 256, repeats: int = 5, rows: tuple[int, ...] = BATCH_ROWS, widths: int = BATCH_WIDTHS
) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...]]:
    """A shared verification pass as the batch engine runs it (the rows' embeddings, every layer
    over rows x W positions with each row's own cache, the LM head over every position), for each
    batch size in `rows` at W = 1..`widths` positions a row, every row after `context` tokens, in
    ms. The widths take turns, repeat by repeat; a wider pass costs at least a narrower one
    (`_monotone`)."""
    from specbound_runtime.batch import BatchKVCache

    limit = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0) or context + widths + 1
    context = max(1, min(context, limit - widths - 1))
    ids = _ids(lm, context)
    measured = []
    with torch.inference_mode():
        for r in rows:
            cache = BatchKVCache(lm.num_layers, r, context + widths + 1)
            prompt = torch.tensor([ids] * r, device=lm.device)
            lm.batch_pass(lm.embed_rows(prompt), [0] * r, cache)

            def shared(w: int, r=r, cache=cache, prompt=prompt) -> None:
                h = lm.batch_pass(lm.embed_rows(prompt[:, :w]), [context] * r, cache)
                lm.rows_logits(h.reshape(-1, h.shape[-1]))[-1, 0].item()

            shared(widths)  # warm-up
            measured.append(tuple(_monotone(_interleaved([lambda w=w: shared(w) for w in range(1, widths + 1)], repeats))))
            del cache
    return tuple(rows), tuple(measured)


def _priced_by_context(lm: HFCausalLM, cost: CostModel, context: int, far: int | None, repeats: int) -> CostModel:
    """`cost` with per-context pricing, from a second context `far` tokens long, or as long as the
    model allows; unchanged where that is no longer than the first (or `far` is None)."""
    if far is None:
        return cost
    limit = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0) or far + WIDTHS + 1
    far = min(far, limit - WIDTHS - 1)
    if far <= context:
        return cost
    return context_slopes(lm, cost.with_context(context, ()), far, repeats)


def _ids(lm: HFCausalLM, context: int) -> list[int]:
    return [(7 * i + 3) % lm.vocab_size for i in range(context)]


def _verification(lm: HFCausalLM, context: int):
    """A function that runs one verification pass over n positions after `context` tokens, as the
    engine runs it (DecodeState: the drafts' embeddings, one call per layer over every pending
    position, the LM head over them), and discards it. Call under inference mode."""
    ids = _ids(lm, context)
    seq = DecodeState(lm, ids, context + WIDTHS + 1)
    seq.commit(verify(seq, seq.verify_logits()))  # the prefill

    def verification(n: int) -> None:
        for token in ids[: n - 1]:
            seq.push_draft(token, 0)
        seq.verify_logits()
        seq.discard_drafts()

    verification(WIDTHS)  # warm-up
    return verification


def _widths(lm: HFCausalLM, context: int, repeats: int) -> tuple[list[float], list[float]]:
    """(layer_widths, head_widths): a decoder-layer call and the LM head over n = 1..WIDTHS
    positions, in ms, after a context of `context` tokens. The widths take turns, repeat by
    repeat, so that a machine whose speed drifts shifts every width alike. A layer call over n
    positions stands for its share of a pass without the head: the layers, the drafts'
    embeddings and the attention mask."""
    ids = _ids(lm, context)
    with torch.inference_mode():
        verification = _verification(lm, context)
        # a pass over more positions does more work than over fewer: where timing noise says
        # otherwise, the narrower pass's figure stands (so tuning cannot chase noise toward wide passes)
        passes = _rising(_interleaved([lambda n=n: verification(n) for n in range(1, WIDTHS + 1)], repeats))
        hiddens = [lm.embed(torch.tensor(ids[:n])) for n in range(1, WIDTHS + 1)]
        head_widths = _rising(_interleaved([lambda h=h: lm.final_logits(h) for h in hiddens], repeats * 4))
    return _rising([max(0.0, p - h) / lm.num_layers for p, h in zip(passes, head_widths)]), head_widths


def context_slopes(lm: HFCausalLM, cost: CostModel, far: int = FAR_CONTEXT, repeats: int = 5) -> CostModel:
    """`cost` (measured after cost.context tokens) with per-context pricing: each width's pass
    timed after cost.context and after `far` tokens, the two in turns so that a machine whose
    speed drifts shifts both alike, and what one more token of context adds to a layer call (at
    least 0: attention reads more cache, never less). The head does not read the context."""
    with torch.inference_mode():
        near, farther = _verification(lm, cost.context), _verification(lm, far)
        fns = [f for n in range(1, WIDTHS + 1) for f in (lambda n=n: near(n), lambda n=n: farther(n))]
        times = _interleaved(fns, repeats * 2)
    slopes = [max(0.0, (times[2 * i + 1] - times[2 * i]) / lm.num_layers / (far - cost.context)) for i in range(WIDTHS)]
    return cost.with_context(cost.context, tuple(slopes))


def _measure_round(lm: HFCausalLM, shortlist_size: int, context: int, repeats: int, warpers) -> dict:
    L = lm.num_layers
    ids = _ids(lm, context)
    layer_widths, head_widths = _widths(lm, context, repeats)
    with torch.inference_mode():
        hiddens = [lm.embed(torch.tensor(ids[:1]))]
        one, eight = layer_widths[0], layer_widths[7]
        head1, head8 = head_widths[0], head_widths[7]
        h1 = hiddens[0]
        size = min(shortlist_size, lm.vocab_size)
        weights = ExitHeadWeights(shortlist=torch.arange(size), lens={1: (torch.eye(h1.shape[-1]), torch.zeros(h1.shape[-1]))})
        head = FittedExitHead(weights, lm.normed, lm.lm_head_weight, lm.softcap)
        if warpers is None:
            check = _time(lambda: decide_exit(head(h1, 1)[-1], 1.0, 0.5), repeats * 4)
            sampling = {}
        else:
            sampler = Sampler(torch.Generator().manual_seed(0), lm.device)
            prefix = torch.tensor([ids], device=lm.device)
            columns = head.token_ids.to(lm.device)

            def sampled_check():
                logits = head(h1, 1)[-1]
                q = draft_probabilities(logits, warpers, prefix, columns, lm.vocab_size)
                return decide_exit(logits, 1.0, 0.5, q, sampler.uniforms(1)[0])

            check = _time(sampled_check, repeats * 4)
            sampling = {"logits_processor": warpers, "sampler": sampler}
        # plain decoding per token, without the prefill: (17 tokens - 1 token) / 16
        long = statistics.median(generate(lm, ids, 17, NoDrafter(), **sampling).wall_time_s for _ in range(3))
        short = statistics.median(generate(lm, ids, 1, NoDrafter(), **sampling).wall_time_s for _ in range(3))
        per_token = (long - short) * 1000.0 / 16
    return {
        "layer_base": one,
        "layer_extra": max(0.0, (eight - one) / 7),
        "head_base": head1,
        "head_extra": max(0.0, (head8 - head1) / 7),
        "check": check,
        "round_overhead": max(0.0, per_token - (L * one + head1)),
        "layer_widths": layer_widths,
        "head_widths": head_widths,
    }


def _interleaved(fns: list, repeats: int) -> list[float]:
    """The median milliseconds of each of `fns`, timed in turns: all once, `repeats` times over."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - t)
    return [statistics.median(x) * 1000.0 for x in samples]


def _monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pooling adjacent violators): a wider
    pass costs at least a narrower one, and one noisy timing is averaged with its neighbours
    instead of lifting every wider width to it (as the running maximum would)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def _rising(values: list[float]) -> list[float]:
    """The running maximum: each width costs at least what every narrower one does."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


@dataclass(frozen=True)
class Roofline:
    """What the hardware charges for a pass: every weight read once at the best read rate
    measured here, or the pass's arithmetic at the measured matrix-product rate, whichever is larger."""

    weight_bytes: int  # every parameter once (tied embeddings once)
    params: int
    stream_gbps: float  # a streaming sum over a 512 MB fp32 tensor
    head_gbps: float  # the one-row LM-head product on the fastest path here (prepacked where available)
    gflops: float  # fp32 matrix products, large and square

    @property
    def read_gbps(self) -> float:
        return max(self.stream_gbps, self.head_gbps)

    def floor_ms(self, positions: int) -> float:
        read = self.weight_bytes / (self.read_gbps * 1e9)
        compute = 2.0 * positions * self.params / (self.gflops * 1e9)
        return 1000.0 * max(read, compute)

    def to_dict(self) -> dict:
        return {**asdict(self), "read_gbps": self.read_gbps}


def measure_roofline(lm: HFCausalLM, repeats: int = 5) -> Roofline:
    """Measure the memory floor of a pass on this machine (about 2 s and 0.5 GB for the sum)."""
    from specbound_runtime.kernels import PackedLinear, onednn_missing, plain_linear

    params = list(lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    head_module = lm.model.lm_head
    head_bytes = head_module.weight.numel() * head_module.weight.element_size()
    with torch.inference_mode():
        block = torch.ones(128 * 1024 * 1024, dtype=torch.float32, device=lm.device)  # 512 MB
        stream = _time(lambda: block.sum(), repeats)
        del block
        x = torch.randn(1, 1, head_module.in_features, dtype=head_module.weight.dtype, device=lm.device)
        heads = [head_module]
        if lm.kernels is not None and lm.kernels.head is not None:
            heads.append(lm.kernels.head)
        elif onednn_missing() is None and plain_linear(head_module):
            heads.append(PackedLinear([head_module]))
        head = min(_time(lambda h=h: h(x), repeats * 2) for h in heads)
        a = torch.randn(1024, 1024, device=lm.device)
        mm = _time(lambda: a @ a, repeats)
    return Roofline(
        weight_bytes=weight_bytes,
        params=sum(p.numel() for p in params),
        stream_gbps=512 * 2**20 / (stream / 1000.0) / 1e9,
        head_gbps=head_bytes / (head / 1000.0) / 1e9,
        gflops=2 * 1024**3 / (mm / 1000.0) / 1e9,
    )


def cached_costs(
    lm: HFCausalLM, fingerprint, shortlist_size: int, cache_root: Path, remeasure: bool = False, warpers=None, warn=None
) -> CostModel:
    parts = [
        "r6",  # measured in rounds, with samples, per-width costs of engine passes, per-context slopes and batch passes, packed or not (older entries lack them)
        f"k{kernel_path(lm)}",  # the prepacked path prices wide passes quite differently
        fingerprint.weights_sha256[:16],
        f"s{shortlist_size}",
        f"t{torch.get_num_threads()}",
        platform.machine(),
        f"c{os.cpu_count()}",
    ]
    if warpers is not None:  # a sampling mode costs more per check and per step: its own entry
        settings = repr([(type(w).__name__, sorted(vars(w).items())) for w in warpers])
        parts.append("sample" + hashlib.sha256(settings.encode()).hexdigest()[:8])
    key = "-".join(parts)
    path = cache_root / "costs" / f"{key}.json"
    if path.exists() and not remeasure:
        try:
            cost = CostModel(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # unreadable cache entry: measure again
        else:
            if cost.batch_rows:
                return cost
            # measured before batches were: keep its one-sequence costs (the same tuning as
            # before), add the batch passes once
            cost = with_batch_passes(lm, cost)
            atomic_write_bytes(path, json.dumps(cost.to_dict(), sort_keys=True).encode())
            return CostModel(**json.loads(path.read_text()))
    cost = measure_costs(lm, shortlist_size, warpers=warpers, warn=warn)
    atomic_write_bytes(path, json.dumps(cost.to_dict(), sort_keys=True).encode())
    return CostModel(**json.loads(path.read_text()))


def kernel_path(lm: HFCausalLM) -> str:
    return "eager" if lm.kernels is None else lm.kernels.path


def pinned_costs(cost: CostModel, fingerprint, shortlist_size: int, kernels: str = "eager", roofline: Roofline | None = None) -> dict:
    """The document `specbound costs --out` writes: the cost model, what it was measured for, and
    where (for the reader; only the first two are checked)."""
    import torch as _torch

    return {
        "kind": COSTS_KIND,
        "format": 1,
        "cost_model": cost.to_dict(),
        "model": {"model_type": fingerprint.model_type, "num_layers": fingerprint.num_layers, "weights_sha256": fingerprint.weights_sha256},
        "shortlist_size": shortlist_size,
        "measured_on": {
            "machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": _torch.get_num_threads(), "torch": _torch.__version__,
        },
        "kernels": kernels,
        **({} if roofline is None else {"roofline": roofline.to_dict()}),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_pinned_costs(path: Path, fingerprint, shortlist_size: int) -> CostModel:
    """A cost model pinned by `specbound costs`, checked against the model and short-list size."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"cost file {path} does not exist; make it with: specbound costs --model M --out {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read cost file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != COSTS_KIND:
        raise InputError(f"{path} is not a cost model written by `specbound costs`")
    theirs = (data.get("model") or {}).get("weights_sha256")
    if theirs != fingerprint.weights_sha256:
        raise InputError(
            f"cost file {path} was measured for model weights {str(theirs)[:12]}, not this model's "
            f"{fingerprint.weights_sha256[:12]}; measure it again with specbound costs"
        )
    if data.get("shortlist_size") != shortlist_size:
        raise InputError(
            f"cost file {path} was measured with short-list size {data.get('shortlist_size')}, the job uses "
            f"{shortlist_size}; measure it again with specbound costs --shortlist-size {shortlist_size}"
        )
    try:
        return CostModel(**data["cost_model"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"cost file {path} holds no valid cost model ({e})") from None


def costs_report(cost: CostModel, roofline: Roofline, document: dict) -> str:
    """What `specbound costs` prints of a measurement: the cost model's components, a full pass's
    cost at each width, and the memory floor beside it (`roofline_table`)."""
    c = document["cost_model"]
    lines = [
        f"layer {c['layer_base']:.4f} ms (+{c['layer_extra']:.4f} per extra position), LM head "
        f"{c['head_base']:.4f} ms, exit check {c['check']:.4f} ms, round overhead {c['round_overhead']:.4f} ms "
        f"(medians of {len(cost.samples)} rounds; plain decoding's per-token cost spreads {cost.spread:.1%} over them)"
    ]
    passes = ", ".join(f"{n}: {cost.pass_ms(n):.1f}" for n in range(1, len(cost.layer_widths) + 1))
    if passes:
        at = f" after {cost.context} tokens" if cost.context else ""
        lines.append(f"a full pass (every layer and the LM head) over n positions{at}, ms: {passes}")
    if cost.context_slopes:
        lines.append(
            f"each round is priced at its own context: a layer call costs {cost.context_slope(1) * 1000:.2f} us more per "
            f"token of context over 1 position, {cost.context_slope(len(cost.context_slopes)) * 1000:.2f} us over "
            f"{len(cost.context_slopes)}"
        )
    return "\n".join([*lines, roofline_table(cost, roofline, document), *batch_table(cost)])


def batch_table(cost: CostModel) -> list[str]:
    """The batch engine's shared passes by rows and positions a row, and what one more position a
    row costs relative to a plain batched step (what the batch tuner weighs drafts against)."""
    if not cost.batch_rows:
        return []
    widths = max(len(p) for p in cost.batch_passes)
    lines = [
        f"shared batch passes (ms, every row after {cost.context or 256} tokens), by positions a row:",
        "| rows |" + "".join(f" W={w} |" for w in range(1, widths + 1)) + " W=2 / W=1 |",
        "| ---: |" + " ---: |" * (widths + 1),
    ]
    for rows, p in zip(cost.batch_rows, cost.batch_passes):
        lines.append(f"| {rows} |" + "".join(f" {x:.1f} |" for x in p) + (f" {p[1] / p[0]:.2f} |" if len(p) > 1 else " |"))
    return lines


def roofline_table(cost, roofline, document) -> str:
    """Each width's measured pass beside what the hardware charges for it (the memory floor)."""
    where = document["measured_on"]
    lines = [
        f"memory floor on {where['cpu']} ({where['cpus']} cpus, {where['torch_threads']} torch threads): "
        f"{roofline.weight_bytes / 1e6:.0f} MB of weights at {roofline.read_gbps:.1f} GB/s "
        f"(streaming sum {roofline.stream_gbps:.1f}, one-row LM head {roofline.head_gbps:.1f}); "
        f"matrix products {roofline.gflops:.0f} GFLOP/s",
    ]
    far = [FAR_CONTEXT] if cost.context_slopes else []
    at = f" at {cost.context}" if far else ""
    lines += [
        f"| positions | pass{at} (ms) |" + "".join(f" pass at {c} (ms) |" for c in far) + " floor (ms) | pass / floor | kernels |",
        "| ---: | ---: |" + " ---: |" * len(far) + " ---: | ---: | --- |",
    ]
    for n in range(1, len(cost.layer_widths) + 1):
        ms, floor = cost.pass_ms(n), roofline.floor_ms(n)
        farther = "".join(f" {cost.pass_ms(n, c):.1f} |" for c in far)
        lines.append(f"| {n} | {ms:.1f} |{farther} {floor:.1f} | {ms / floor:.2f}x | {document['kernels']} |")
    return "\n".join(lines)

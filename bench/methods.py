"""The decoding methods a bench compares, and how each one generates an answer.

Nothing here times anything: the harness (`harness.py`) puts one clock around
`MethodRunner.generate`, the same for every method.

Under sampling every method samples with the same settings, and each answer with the same seed
for every method and repeat: transformers' methods from torch's global generator seeded with it
(as a user of generate(do_sample=True) would), ours from a torch.Generator seeded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from specbound_runtime.policy import default_check_layers

from .hf_hooks import FullDepthCallRecorder, pass_statistics

METHODS = ("hf-greedy", "hf-sample", "hf-greedy-compiled", "ort-genai", "ort-genai-ngram", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound", "oracle", "limit")
SIMULATED = ("oracle", "limit")  # rows the simulator computes; never run
REFERENCE = "hf-greedy"  # the reference of a greedy bench
SAMPLING_REFERENCE = "hf-sample"  # the reference of a sampling bench: generate(do_sample=True)


def reference_method(sampling: bool) -> str:
    return SAMPLING_REFERENCE if sampling else REFERENCE
NEEDS_ARTIFACT = ("specbound", "oracle", "limit")
GREEDY_ONLY = ("hf-greedy-compiled", "ort-genai", "ort-genai-ngram", "oracle", "limit")  # skipped, with a warning, in a sampling bench
# where transformers' assisted methods' accepted drafts come from (they report no per-token source)
HF_DRAFT_SOURCE = {"hf-prompt-lookup": "lookup", "hf-early-exit": "early-exit"}
PROMPT_LOOKUP_GRID = (3, 10)


def early_exit_layers(num_layers: int) -> tuple[int, ...]:
    """hf-early-exit's grid: the layers our runtime checks by default (the paper's), so the
    baseline drafts from the same depths as `specbound-paper`. SmolLM2 (30 layers): 15, 19, 22, 26."""
    return default_check_layers(num_layers)


@dataclass(frozen=True)
class Variant:
    """A runnable configuration: a method and its grid value, if it has a grid."""

    method: str
    value: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.method in SIMULATED:
            raise ValueError(f"not a runnable method: {self.method!r}")
        if (self.value is not None) != (self.method in ("hf-prompt-lookup", "hf-early-exit")):
            raise ValueError(f"{self.method} takes {'a' if self.value is None else 'no'} grid value")

    @property
    def name(self) -> str:
        if self.method == "hf-prompt-lookup":
            return f"hf-prompt-lookup(k={self.value})"
        if self.method == "hf-early-exit":
            return f"hf-early-exit(layer={self.value})"
        return self.method


@dataclass(frozen=True)
class Generation:
    """What one method generated for one answer, untimed. Statistics it cannot report are None.

    drafted_by_source / accepted_by_source: (source, count) pairs sorted by source, counting the
    drafted and the accepted draft tokens by what proposed them ("lookup", "early-exit", ...);
    () without drafts."""

    token_ids: tuple[int, ...]
    accept_lengths: tuple[int, ...] | None  # per verification pass, the full model's token counted
    passes: int | None
    drafted: int | None
    drafted_by_source: tuple[tuple[str, int], ...] | None = None
    accepted_by_source: tuple[tuple[str, int], ...] | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def accepted(self) -> int | None:
        return None if self.passes is None else self.new_tokens - self.passes


def by_source(labels) -> tuple[tuple[str, int], ...]:
    """Per-token source labels as sorted (source, count) pairs."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return tuple(sorted(counts.items()))


def _hf_generate(model, prompt_ids, max_new_tokens: int, eos, source: str | None, mode=None, seed=None, **kwargs) -> Generation:
    """source: None for plain decoding; else the source its drafts are reported under (its
    passes are counted from outside, and every accepted draft is put down to that source)."""
    import torch

    from specbound_runtime.exactness import reference_generate

    def run():
        if seed is None:
            return tuple(reference_generate(model, list(prompt_ids), max_new_tokens, eos, mode, **kwargs))
        device = model.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # transformers samples from torch's global generator
            return tuple(reference_generate(model, list(prompt_ids), max_new_tokens, eos, mode, **kwargs))

    if source is None:  # plain decoding: one pass per token, no drafts
        tokens = run()
        return Generation(tokens, (1,) * len(tokens), len(tokens), 0, (), ())
    with FullDepthCallRecorder(model) as recorder:
        tokens = run()
    stats = pass_statistics(recorder.calls, len(prompt_ids), len(tokens))
    g = Generation(tokens, stats.accept_lengths, stats.passes, stats.drafted)
    drafted = None if stats.drafted is None else ((source, stats.drafted),) if stats.drafted else ()
    accepted = None if g.accepted is None else ((source, g.accepted),) if g.accepted else ()
    return Generation(tokens, stats.accept_lengths, stats.passes, stats.drafted, drafted, accepted)


def _engine_generate(decoder, encoded, speculation: bool, mode=None, seed=None) -> Generation:
    import torch

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    r = decoder.generate(encoded, speculation=speculation, mode=mode, generator=generator)
    return Generation(
        tuple(r.token_ids), tuple(r.accept_lengths), r.verify_passes, r.drafted, by_source(r.drafted_sources), by_source(r.accepted_sources)
    )


class MethodRunner:
    """Runs any `Variant` on an encoded prompt. `decoders` holds our engine: "specbound-paper"
    (no artifact; also runs `ar`) and, with an artifact, "specbound". mode: greedy (None) or the
    sampling settings every method uses. compiled: the copy of the model that runs
    "hf-greedy-compiled" (bench.compiled), or None without that method; ort: the ONNX Runtime
    GenAI peer (bench.peers.OrtPeer) that runs "ort-genai" and "ort-genai-ngram", or None."""

    def __init__(self, model, eos, decoders: dict, mode=None, compiled=None, ort=None):
        self.model = model
        self.compiled = compiled
        self.ort = ort
        self.eos = tuple(eos)
        self.decoders = decoders
        self.mode = mode if mode is not None and mode.do_sample else None

    def generate(self, variant: Variant, encoded, max_new_tokens: int | None = None, seed: int | None = None) -> Generation:
        """seed: under sampling, the answer's seed (the same for every method)."""
        n = encoded.max_new_tokens if max_new_tokens is None else min(max_new_tokens, encoded.max_new_tokens)
        if n != encoded.max_new_tokens:
            encoded = type(encoded)(ids=encoded.ids, max_new_tokens=n, clamped=encoded.clamped)
        m = variant.method
        mode = self.mode
        seed = seed if mode is not None else None
        if (m == SAMPLING_REFERENCE) != (mode is not None) and m in (REFERENCE, SAMPLING_REFERENCE):
            raise ValueError(f"{m} is the reference of a {'greedy' if m == REFERENCE else 'sampling'} bench only")
        if m in (REFERENCE, SAMPLING_REFERENCE):
            return _hf_generate(self.model, encoded.ids, n, self.eos, None, mode, seed)
        if m == "hf-greedy-compiled":
            if self.compiled is None or mode is not None:
                raise ValueError("hf-greedy-compiled runs in a greedy bench, on the compiled copy of the model")
            return _hf_generate(self.compiled, encoded.ids, n, self.eos, None)
        if m in ("ort-genai", "ort-genai-ngram"):
            if self.ort is None or mode is not None:
                raise ValueError(f"{m} runs in a greedy bench, with ONNX Runtime GenAI installed")
            tokens = tuple(self.ort.generate(encoded.ids, n, ngram=m == "ort-genai-ngram"))
            if m == "ort-genai":  # plain decoding: one pass per token
                return Generation(tokens, (1,) * len(tokens), len(tokens), 0, (), ())
            return Generation(tokens, None, None, None)  # its passes are not counted from outside
        if m == "hf-prompt-lookup":
            return _hf_generate(self.model, encoded.ids, n, self.eos, HF_DRAFT_SOURCE[m], mode, seed, prompt_lookup_num_tokens=variant.value)
        if m == "hf-early-exit":
            return _hf_generate(self.model, encoded.ids, n, self.eos, HF_DRAFT_SOURCE[m], mode, seed, assistant_early_exit=variant.value)
        if m == "ar":
            return _engine_generate(self.decoders["specbound-paper"], encoded, False, mode, seed)
        return _engine_generate(self.decoders[m], encoded, True, mode, seed)

"""The Python API: load a model (and its artifact) once, then generate like transformers.

    import torch, specbound_runtime as sb

    m = sb.load("smollm2-135m", artifact="artifacts/smollm2-135m.safetensors")
    ids = m.generate(input_ids, max_new_tokens=128)            # LongTensor [B, n + new]
    ids = m.generate(batch.input_ids, attention_mask=batch.attention_mask)  # left-padded batch
    out = m.generate_with_stats(input_ids, max_new_tokens=128)  # .sequences, .stats
    hf_model.generate(input_ids, custom_generate=m.custom_generate, max_new_tokens=128)
    ids = m.generate(input_ids, do_sample=True, temperature=0.7, top_p=0.9, generator=g)

Decoding always runs inside the model's own `generate()` (see generation.py): transformers
prepares the generation config, logits processors (and, with do_sample=True, warpers) and
stopping criteria, SpecBound decodes. Greedy output equals `model.generate(...)` with the same
arguments, token for token; sampled output is distributed exactly as `model.generate(...,
do_sample=True)`'s, with randomness from `generator` (a torch.Generator) or, without one, from
torch's global generator (`torch.manual_seed`).

Nothing is stored on the model: a `SpecBound` holds the model, its layer adapter, the exit
policy and the tokenizer; statistics of a run come back with the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import logging
import warnings

import torch

from .adapter import HFCausalLM
from .drafters import Speculator
from .batch import BatchResult
from .engine import GenerationResult, NoDrafter
from .errors import ModelError, SpecBoundWarning, UsageError
from .generation import SpecBoundOutput, custom_generate_for
from .kernels import Kernels
from .policy import ExitPolicy
from .sampling import DecodingMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    """What `generate_with_stats` returns: the ids `generate()` would return, and how the run went."""

    sequences: torch.Tensor  # LongTensor [batch, prompt + new]
    # accepted lengths, exit layers, drafts, wall time (engine.py); for a batch of several rows a
    # batch.BatchResult (one GenerationResult per row, and the shared passes)
    stats: "GenerationResult | BatchResult"


class SpecBound:
    """A model ready for speculative decoding. Build it with `load`."""

    def __init__(
        self,
        model,
        tokenizer,
        policy: ExitPolicy | None = None,
        exit_weights=None,
        *,
        source: str = "",
        fingerprint=None,
        tokenizer_fingerprint=None,  # fingerprints.TokenizerFingerprint; computed on first use
        artifact_metadata=None,
        kernels: Kernels | str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        # prepacked copies of the weights (kernels.py): built once, shared by with_policy/with_artifact
        self.kernels = kernels if isinstance(kernels, Kernels) else Kernels(model, kernels)
        self.lm = HFCausalLM(model, exit_weights=exit_weights, kernels=self.kernels)
        self.exit_weights = exit_weights
        self.calibrated = policy is not None
        self.policy = policy or ExitPolicy.paper_default(self.lm.num_layers)
        if "head" in self.policy.sources and not self.lm.has_next_token_head:
            raise UsageError("the policy drafts with the fitted next-token head, but the exit head given holds none")
        self.source = source
        self._fingerprint = fingerprint
        self._tokenizer_fingerprint = tokenizer_fingerprint
        self.artifact_metadata = dict(artifact_metadata or {})
        self._mode_warned = False

    @property
    def tuned_mode(self) -> DecodingMode | None:
        """The decoding mode the artifact's policy was tuned for (greedy for artifacts that do not
        say); None without an artifact."""
        if not self.calibrated or not self.artifact_metadata:
            return None
        raw = self.artifact_metadata.get("decoding_mode")
        return DecodingMode() if raw is None else DecodingMode.from_json(raw)

    def _check_mode(self, mode: DecodingMode) -> None:
        """Warn once (a SpecBoundWarning) when decoding in another mode than the artifact was tuned
        for: still exact, but the policy may be slow there."""
        tuned = self.tuned_mode
        if tuned is None or self._mode_warned or _same_mode(tuned, mode):
            return
        self._mode_warned = True
        warnings.warn(
            f"the artifact was tuned for {tuned.describe()}, decoding now in {mode.describe()}; "
            "the output is still exact, but the policy may be slower here (calibrate for this mode)",
            SpecBoundWarning,
            stacklevel=2,
        )

    @property
    def fingerprint(self):
        """What exactly the model is (fingerprints.ModelFingerprint); hashed on first use, since
        hashing every weight of a large model takes a while."""
        if self._fingerprint is None:
            from .fingerprints import fingerprint_model

            self._fingerprint = fingerprint_model(self.model)
        return self._fingerprint

    @property
    def tokenizer_fingerprint(self):
        """What exactly the tokenizer does (fingerprints.TokenizerFingerprint); None without one."""
        if self._tokenizer_fingerprint is None and self.tokenizer is not None:
            from .fingerprints import fingerprint_tokenizer

            self._tokenizer_fingerprint = fingerprint_tokenizer(self.tokenizer)
        return self._tokenizer_fingerprint

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the generation config's (int or list), else the tokenizer's; may be ()."""
        from .models import eos_token_ids

        return eos_token_ids(self)

    def uncalibrated(self) -> "SpecBound":
        """The same model with the paper's default schedule (no artifact): a baseline."""
        return self.with_policy(None)

    def with_artifact(self, artifact: str | Path) -> "SpecBound":
        """The same model under a calibrated artifact, checked against this model and tokenizer."""
        from .artifact import load_artifact

        art = load_artifact(artifact, self.fingerprint, self.tokenizer_fingerprint)
        return SpecBound(
            self.model, self.tokenizer, art.policy, art.exit_weights, source=self.source,
            fingerprint=self.fingerprint, tokenizer_fingerprint=self.tokenizer_fingerprint,
            artifact_metadata=art.metadata, kernels=self.kernels,
        )

    def with_policy(self, policy: ExitPolicy | None, exit_weights=None) -> "SpecBound":
        """The same model under another policy and exit head (calibration measures candidates)."""
        return SpecBound(
            self.model, self.tokenizer, policy, exit_weights, source=self.source,
            fingerprint=self.fingerprint, tokenizer_fingerprint=self.tokenizer_fingerprint, kernels=self.kernels,
        )

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    # -- generate ---------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, *, return_dict_in_generate: bool = False, **kwargs):
        """`model.generate(input_ids, **kwargs)`, decoded speculatively: same arguments (those that
        apply: max_new_tokens, eos_token_id, streamer, generation_config, attention_mask,
        do_sample, temperature, top_k, top_p, min_p, ...), same return value: the sequences, or
        with return_dict_in_generate=True an output with `sequences` and `specbound_stats`.
        generator= (a torch.Generator) seeds sampling; without it, torch's global generator."""
        run = self.generate_with_stats(input_ids, **kwargs)
        return SpecBoundOutput(sequences=run.sequences, specbound_stats=run.stats) if return_dict_in_generate else run.sequences

    def generate_with_stats(
        self, input_ids: torch.Tensor, *, streamer=None, on_tokens=None, speculation: bool = True, **kwargs
    ) -> Generated:
        """Like `generate`, and also the run's statistics. on_tokens(list of ids) is called with
        each accepted run of new tokens (a lighter streamer). speculation=False decodes plainly
        through the same engine (the fair baseline)."""
        input_ids = _as_batch(input_ids)
        kwargs = self._stop_strings_as_criteria(kwargs)
        custom = self._custom_generate(speculation, on_tokens)
        stream = None if streamer is None else _EndsOnce(streamer)
        try:
            out = self.model.generate(
                input_ids.to(self.device),
                custom_generate=custom,
                specbound_streamer=stream,
                **{**kwargs, "return_dict_in_generate": True},
            )
        except ValueError as exc:  # generate() refusing its arguments (max_new_tokens=0, ...)
            raise UsageError(f"generate() refused the arguments: {str(exc).strip().splitlines()[0]}") from exc
        finally:
            if stream is not None:
                stream.end()  # also when generate() failed before decoding: a reader never hangs
        if not isinstance(out, SpecBoundOutput) or out.specbound_stats is None:
            raise UsageError("generate() returned without decoding (nothing to generate: check max_new_tokens/max_length)")
        return Generated(sequences=out.sequences.to(input_ids.device), stats=out.specbound_stats)

    def _stop_strings_as_criteria(self, kwargs: dict) -> dict:
        """Stop strings (the call's, or the generation config's) as a StopStringCriteria built
        here: transformers 5.24 drops the `tokenizer` argument on its way to a callable
        custom_generate, and then refuses stop strings for want of one."""
        config = kwargs.get("generation_config") or self.model.generation_config
        stops = kwargs.get("stop_strings", getattr(config, "stop_strings", None))
        if not stops:
            return kwargs
        from transformers import StopStringCriteria, StoppingCriteriaList

        tokenizer = kwargs.get("tokenizer") or self.tokenizer
        if tokenizer is None:
            raise UsageError("stop_strings need the model's tokenizer: pass tokenizer=")
        kwargs = {k: v for k, v in kwargs.items() if k != "tokenizer"}
        own = list(kwargs.get("stopping_criteria") or [])
        kwargs["stopping_criteria"] = StoppingCriteriaList(own + [StopStringCriteria(tokenizer=tokenizer, stop_strings=stops)])
        kwargs["stop_strings"] = None  # built above; generate() must not look for a tokenizer
        return kwargs

    def batch_width(self, rows: int) -> int:
        """Each row's draft bound in a batch of `rows`: the policy's w_max for one row; for more,
        what calibration tuned for that batch size, or its rule between the sizes tuned
        (batch_policy.BatchPolicy); for an artifact made before batches were tuned, priced by its
        cost model (batch_policy.batch_draft_width)."""
        from .batch_policy import BatchPolicy, PassPrices, batch_draft_width

        if rows == 1:
            return self.policy.w_max
        tuned = BatchPolicy.from_metadata(self.artifact_metadata)
        if tuned is not None:
            return min(tuned.width(rows), self.policy.w_max)
        return batch_draft_width(self.policy.w_max, PassPrices.from_metadata(self.artifact_metadata), rows)

    @property
    def custom_generate(self):
        """For `hf_model.generate(ids, custom_generate=m.custom_generate, ...)` (transformers 5.24's
        callable form). transformers does not hand a callable its `streamer`: pass
        `specbound_streamer=` instead. return_dict_in_generate=True returns the run's statistics
        beside the sequences (`specbound_stats`)."""
        return self._custom_generate(True)

    def _custom_generate(self, speculation: bool, on_tokens=None):
        policy = self.policy

        def make_drafter(eos):
            return Speculator.for_policy(policy, frozenset(eos)) if speculation else NoDrafter()

        def make_batch_drafter(eos, rows: int):
            return Speculator.for_batch(policy, frozenset(eos), self.batch_width(rows)) if speculation else NoDrafter()

        from .batch import PassPrices

        return custom_generate_for(
            self.model, self.lm, make_drafter, on_tokens, self._check_mode if speculation else None, make_batch_drafter,
            PassPrices.from_metadata(self.artifact_metadata),
        )


def _same_mode(a: DecodingMode, b: DecodingMode) -> bool:
    if a.do_sample != b.do_sample:
        return False
    if not a.do_sample:
        return True
    close = lambda x, y: (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-6)  # noqa: E731
    return a.top_k == b.top_k and all(close(getattr(a, f), getattr(b, f)) for f in ("temperature", "top_p", "min_p"))


class _EndsOnce:
    """A streamer whose end() runs once, however many times it is called."""

    def __init__(self, streamer):
        self.streamer = streamer
        self.ended = False

    def put(self, value) -> None:
        self.streamer.put(value)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.streamer.end()


def _as_batch(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] < 1:
        raise UsageError(f"input_ids must be [batch, length] (a left-padded batch with its attention_mask), got {list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise UsageError("the prompt is empty; pass at least one token id")
    return input_ids.long()


# -- load ---------------------------------------------------------------------------------------


def load(
    model: str | Path | torch.nn.Module,
    *,
    tokenizer: Any = None,
    artifact: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str = "auto",
) -> SpecBound:
    """A model ready for speculative decoding.

    model: a built-in name (`smollm2-135m`), a local Hugging Face folder, a `.gguf` file, or a
      transformers *ForCausalLM already loaded (then pass its tokenizer; it is used as it is,
      so device and dtype must not be given).
    artifact: a calibrated artifact from `specbound calibrate`; it must have been fitted for
      this model (the same checkpoint, in any precision). Without one, the paper's uncalibrated
      schedule is used, which is slower than plain decoding on the models measured so far.
    device, dtype: for a name or path: cpu (default), cuda, mps; float32 (default on cpu),
      bfloat16, float16 (default on an accelerator: the checkpoint's own dtype).
    kernels: "auto" (default) prepacks the weights for oneDNN where that measures faster on this
      machine (fp32 on the CPU; about the model's size again in memory, logged at load), "onednn"
      insists, "eager" runs every module's own forward. See kernels.py.

    Raises SpecBoundError subclasses (ModelError, ArtifactError, ...) with a message that says
    what to do."""
    if isinstance(model, torch.nn.Module):
        if device is not None or dtype is not None:
            raise UsageError("device and dtype apply to a model loaded by name or path; move or cast your model yourself before sb.load")
        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise ModelError(f"{type(model).__name__} is not a transformers model with generate()")
        # used as it is: not switched to eval mode, not moved, not cast; hashed only if needed
        hf_model, source = model, type(model).__name__
        fingerprint = tokenizer_fingerprint = None
    elif isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise UsageError("tokenizer= goes with an already loaded model; a name or path brings its own")
        from .models import resolve_model

        loaded = resolve_model(str(model), dtype=dtype, device=device)
        hf_model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
        fingerprint, tokenizer_fingerprint = loaded.fingerprint, loaded.tokenizer_fingerprint
    else:
        raise UsageError(f"model must be a name, a path or a transformers model, not {type(model).__name__}")
    m = SpecBound(
        hf_model, tokenizer, source=source, fingerprint=fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
        kernels=kernels,
    )
    log.info("%s", m.kernels.report.describe())
    return m if artifact is None else m.with_artifact(artifact)


__all__ = ["Generated", "SpecBound", "load"]

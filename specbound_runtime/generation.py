"""Decoding inside transformers' own `generate()`: it prepares, we decode.

`model.generate(ids, custom_generate=fn, ...)` does everything it always does before decoding
(merge the model's generation config with the call's arguments, build the logits processors and
stopping criteria, check the inputs) and then calls `fn(model, input_ids, logits_processor=...,
stopping_criteria=..., generation_config=..., **model_kwargs)`. SpecBound decodes in that slot,
so whatever the model's generation config asks for (repetition penalty, suppressed tokens, a
minimum length, stop strings, ...) is built by transformers itself and applied position by
position in verification.

A processor is only safe here when its output depends on nothing but (input_ids, scores):
verification calls it once per verified row, on rows that may then be thrown away. The ones
transformers builds from a generation config, for greedy decoding and the warpers it adds under
do_sample=True, are listed below; anything else is refused with an error naming it, never run
silently. Under sampling the same list also shapes the drafter's own distribution q.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.utils import ModelOutput

from .errors import UsageError
from .sampling import DecodingMode, Sampler

# Pure functions of (input_ids, scores): safe to call on speculative rows.
POSITIONWISE_PROCESSORS = frozenset(
    {
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "SequenceBiasLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "PrefixConstrainedLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "LogitNormalization",
        "SuppressTokensLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor",
        # the warpers generate() adds under do_sample=True (temperature, top_k, top_p, min_p,
        # typical_p, epsilon_cutoff, eta_cutoff, top_h): each a function of the scores alone
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
    }
)

# What each refused processor is called in a generation config, for the error message.
_SETTING_OF = {
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}


def check_processors(logits_processor) -> None:
    """Refuse, naming the setting, any processor that cannot be applied row by row."""
    for processor in logits_processor or ():
        name = type(processor).__name__
        if name in POSITIONWISE_PROCESSORS:
            continue
        setting = _SETTING_OF.get(name)
        what = f"the generation setting `{setting}` ({name})" if setting else f"the logits processor {name}"
        raise UsageError(
            f"{what} cannot be applied position by position in speculative verification; "
            f"remove it from the generation config or decode without SpecBound"
        )


def check_generation_config(generation_config) -> None:
    """Refuse what speculative decoding does not do (yet), naming the setting."""
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(generation_config, name, 1) or 1
        if value != 1:
            raise UsageError(f"{name}={value} is not supported; SpecBound decodes one sequence (greedy or sampled)")
    if getattr(generation_config, "return_dict_in_generate", False):
        asked = [n for n in ("output_scores", "output_logits", "output_attentions", "output_hidden_states") if getattr(generation_config, n, False)]
        if asked:
            raise UsageError(f"{', '.join(n + '=True' for n in asked)} is not supported; return_dict_in_generate=True returns the sequences and specbound_stats")


@dataclass
class SpecBoundOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns through SpecBound: the sequences,
    and the run's statistics (an engine.GenerationResult) where transformers' own outputs carry
    scores."""

    sequences: torch.LongTensor | None = None
    specbound_stats: Any = None


def prompt_rows(input_ids: torch.Tensor, model_kwargs: dict) -> list[list[int]]:
    """Each row's prompt without its padding, from a left-padded batch as generate() takes it
    (attention_mask zeros before the row's tokens). Right padding is refused."""
    if input_ids.ndim != 2:
        raise UsageError(f"input_ids must be [batch, length], got {list(input_ids.shape)}")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise UsageError("a pre-filled cache is not supported; SpecBound keeps its own cache")
    mask = model_kwargs.get("attention_mask")
    ids = input_ids.tolist()
    if mask is None or bool((mask == 1).all()):
        return ids
    keep = (mask != 0).tolist()
    rows = []
    for b, (row, kept) in enumerate(zip(ids, keep)):
        first = kept.index(True) if True in kept else len(kept)
        if not all(kept[first:]) or first == len(kept):
            raise UsageError(
                f"row {b} of the batch is not left-padded (its attention_mask must be zeros, then ones, "
                f"ending in a one); pad on the left (tokenizer.padding_side = 'left')"
            )
        rows.append(row[first:])
    return rows


def generate_arguments(max_new_tokens: int, eos_token_ids, mode: DecodingMode | None = None) -> dict:
    """The `generate()` arguments of a decoding mode (default greedy), the same for SpecBound and
    the reference."""
    eos = list(eos_token_ids) or None
    return dict(
        **(mode or DecodingMode()).generate_kwargs(),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else 0,
    )


def prepared_by_generate(model, mode: DecodingMode | None = None) -> tuple[DecodingMode, object]:
    """The mode and the logits processors (warpers included) that `model.generate()` prepares
    for these settings and the model's own generation config, taken from generate() itself; for
    calibration and checks that must score tokens exactly as generate() samples them."""
    seen = {}

    def capture(model_, input_ids, logits_processor=None, generation_config=None, **kwargs):
        seen["mode"] = DecodingMode.resolved(generation_config)
        seen["processors"] = logits_processor
        return input_ids

    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    model.generate(ids, custom_generate=capture, max_new_tokens=1, **(mode or DecodingMode()).generate_kwargs())
    return seen["mode"], seen["processors"]




def custom_generate_for(
    model, lm, make_drafter: Callable, on_tokens: Callable | None = None, on_mode: Callable | None = None,
    make_batch_drafter: Callable | None = None, batch_prices=None,
):
    """The callable for `model.generate(..., custom_generate=...)`: SpecBound's decode loop over
    `lm` (the model's layer adapter), with the drafter make_drafter(eos_token_ids) returns.
    on_mode(DecodingMode), when given, hears the mode generate() resolved before decoding starts.
    A left-padded batch of several rows decodes in shared passes (batch.py) with the drafters
    make_batch_drafter(eos_token_ids, rows) returns (None: batches are refused), each round as
    wide as batch_prices (batch.PassPrices) say pays; its statistics are a batch.BatchResult.

    With return_dict_in_generate=True it returns a SpecBoundOutput (sequences and the run's
    statistics), else the sequences. Extra keyword arguments it takes from generate(): generator
    (a torch.Generator for do_sample=True; without it, torch's global generator) and
    specbound_streamer (transformers does not hand a callable custom_generate its `streamer`);
    specbound_stats (a list each run's GenerationResult is appended to) is deprecated."""
    from .engine import generate

    def custom_generate(
        model_,
        input_ids,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        generator: torch.Generator | None = None,
        specbound_stats: list | None = None,
        specbound_streamer=None,
        **model_kwargs,
    ):
        if model_ is not model:
            raise UsageError("this custom_generate belongs to another model; use the one made for this model")
        check_generation_config(generation_config)
        mode = DecodingMode.resolved(generation_config)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise UsageError(f"generator must be a torch.Generator, not {type(generator).__name__}")
        if on_mode is not None:
            on_mode(mode)
        check_processors(logits_processor)
        prompts = prompt_rows(input_ids, model_kwargs)
        if input_ids.device != lm.device:
            raise UsageError(
                f"input_ids are on {input_ids.device}, the model on {lm.device}; pass them on the model's device"
            )
        # The length and end-of-sequence limits of the criteria generate() prepared (a user's own
        # MaxLengthCriteria or EosTokenCriteria replaces the default one there), applied natively.
        # On a batch the limit counts from the padded width, as in generate().
        max_length, eos, other_criteria = _native_limits(stopping_criteria, generation_config)
        max_new = max_length - input_ids.shape[1]
        as_dict = getattr(generation_config, "return_dict_in_generate", False)
        if max_new < 1:  # nothing to generate: no run, no statistics
            return SpecBoundOutput(sequences=input_ids) if as_dict else input_ids
        sampler = Sampler(generator, lm.device) if mode.do_sample else None
        if len(prompts) > 1:
            if specbound_streamer is not None or on_tokens is not None:
                raise UsageError("streaming serves one sequence; decode a batch without a streamer")
            if make_batch_drafter is None:
                raise UsageError(f"batch size {len(prompts)} is not supported here; pass one sequence")
            from .batch import generate_batch

            rows = len(prompts)
            batch = generate_batch(
                lm, prompts, max_new, lambda: make_batch_drafter(eos, rows), eos,
                logits_processor=logits_processor or None,
                stopping_criteria=_criteria(other_criteria),
                sampler=sampler,
                prices=batch_prices,
            )
            _deprecated_stats(specbound_stats, batch)
            pad = _pad_token(generation_config, eos)
            longest = max(r.new_tokens for r in batch.rows)
            new = [list(r.token_ids) + [pad] * (longest - r.new_tokens) for r in batch.rows]
            sequences = torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device)], dim=1)
            return SpecBoundOutput(sequences=sequences, specbound_stats=batch) if as_dict else sequences
        if len(prompts[0]) < input_ids.shape[1]:  # one left-padded row: decoded without its padding
            from .batch import row_processors

            logits_processor = row_processors(logits_processor, 0, len(prompts[0]))
        if specbound_streamer is not None:
            specbound_streamer.put(input_ids.cpu())  # as generate() does: the prompt first

        def streamed(new):
            specbound_streamer.put(torch.tensor(new))

        try:
            result = generate(
                lm, prompts[0], max_new, make_drafter(eos), eos,
                _fan_out([f for f in (on_tokens, streamed if specbound_streamer is not None else None) if f]),
                logits_processor=logits_processor or None,
                stopping_criteria=_criteria(other_criteria),
                sampler=sampler,
            )
        finally:
            if specbound_streamer is not None:
                specbound_streamer.end()  # also on an error: a reader never hangs
        _deprecated_stats(specbound_stats, result)
        new = torch.tensor([list(result.token_ids)], dtype=input_ids.dtype, device=input_ids.device)
        sequences = torch.cat([input_ids, new], dim=1)
        if as_dict:
            return SpecBoundOutput(sequences=sequences, specbound_stats=result)
        return sequences

    return custom_generate


def _deprecated_stats(specbound_stats: list | None, result) -> None:
    if specbound_stats is not None:
        warnings.warn(
            "specbound_stats= is deprecated and goes in a later release: pass return_dict_in_generate=True "
            "and read the output's specbound_stats",
            FutureWarning,
            stacklevel=4,
        )
        specbound_stats.append(result)


def _pad_token(generation_config, eos: tuple[int, ...]) -> int:
    """What generate() pads a finished row with: the pad token, else the first EOS (its rule)."""
    pad = getattr(generation_config, "_pad_token_tensor", None)
    if pad is not None:
        return int(torch.as_tensor(pad).reshape(-1)[0])
    if generation_config.pad_token_id is not None:
        return int(generation_config.pad_token_id)
    return eos[0] if eos else 0


def _fan_out(listeners: list):
    if not listeners:
        return None
    if len(listeners) == 1:
        return listeners[0]

    def call_all(new):
        for listener in listeners:
            listener(new)

    return call_all


def _criteria(criteria: list):
    if not criteria:
        return None
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


def _native_limits(stopping_criteria, generation_config) -> tuple[int, tuple[int, ...], list]:
    """(max_length, end-of-sequence ids, the other criteria) from what generate() prepared."""
    lengths, eos, others = [], [], []
    for criterion in stopping_criteria or ():
        name = type(criterion).__name__
        if name == "MaxLengthCriteria":
            lengths.append(int(criterion.max_length))
        elif name == "EosTokenCriteria":
            eos.extend(int(t) for t in torch.as_tensor(criterion.eos_token_id).reshape(-1).tolist())
        else:
            others.append(criterion)
    max_length = min(lengths) if lengths else int(generation_config.max_length)
    return max_length, tuple(dict.fromkeys(eos)), others

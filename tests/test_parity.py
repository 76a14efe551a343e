"""Parity with `generate()` wherever a user runs it: the model's own generation settings,
attention paths, RoPE variants, near ties. Every comparison is on token ids."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import _ignore_causal_mask_sdpa

from specbound_runtime.adapter import HFCausalLM, sdpa_skips_mask
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import ModelError, UsageError
from specbound_runtime.exactness import divergence, reference_greedy
from specbound_runtime.kernels import Kernels
from specbound_runtime.generation import custom_generate_for, generate_arguments
from specbound_runtime.policy import ExitPolicy
from tiny_models import EOS, ScriptedDrafter, tiny_model

PROMPT = [5, 9, 20, 30, 40, 50, 60, 70]
NEW = 30


def _first_check_policy(num_layers):
    layers = tuple(range(1, num_layers))
    return ExitPolicy(num_layers, layers, (1.0,) * len(layers), (0.0,) * len(layers), 3, 4)


def _drafters(lm, ref):
    """A drafter that is always right, one always wrong, a random one, and early exit at the
    first check (which drafts every time)."""
    return {
        "always-right": ScriptedDrafter(ref, len(PROMPT), 1.0, 5, seed=0),
        "always-wrong": ScriptedDrafter(ref, len(PROMPT), 0.0, 5, seed=1),
        "random": ScriptedDrafter(ref, len(PROMPT), 0.6, 4, seed=2),
        "early-exit": Speculator.for_policy(_first_check_policy(lm.num_layers), frozenset({EOS})),
    }


def _through_generate(model, lm, drafter, new=NEW, eos=(EOS,), **kwargs):
    """SpecBound inside the model's own generate(): its generation config decides processors."""
    ids = torch.tensor([PROMPT])
    run = model.generate(
        ids,
        custom_generate=custom_generate_for(model, lm, lambda _eos: drafter),
        return_dict_in_generate=True,
        **{**generate_arguments(new, eos), **kwargs},
    )
    out = run.sequences
    assert out[0, : len(PROMPT)].tolist() == PROMPT
    return out[0, len(PROMPT) :].tolist(), [run.specbound_stats]


def _speculative(model, lm, drafter, new=NEW, eos=(EOS,)):
    tokens, stats = _through_generate(model, lm, drafter, new, eos)
    assert list(stats[0].token_ids) == tokens
    return tokens


# -- the model's own generation settings --------------------------------------------------------


def _settings(plain):
    """Generation-config settings, each chosen (from the plain greedy output) so it changes it."""
    repeated = plain[2]
    return {
        "repetition_penalty": dict(repetition_penalty=1.8),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
        "min_new_tokens": dict(min_new_tokens=12),
        "min_length": dict(min_length=len(PROMPT) + 12),
        "suppress_tokens": dict(suppress_tokens=[plain[0], plain[4]]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[plain[0]]),
        "bad_words_ids": dict(bad_words_ids=[[plain[1]], [plain[5], plain[6]]]),
        "sequence_bias": dict(sequence_bias={(repeated,): -30.0}),
        "forced_eos_token_id": dict(forced_eos_token_id=EOS),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(4, 1.8)),
        "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.5),
    }


SETTINGS = list(_settings([0] * 8))


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, HFCausalLM(model)


@pytest.mark.parametrize("setting", SETTINGS)
def test_generation_config_setting_is_applied_like_generate(llama, setting, one_thread):
    model, lm = llama
    saved = model.generation_config
    # an EOS that greedy decoding reaches early, so length rules (min_new_tokens, ...) matter
    plain = reference_greedy(model, PROMPT, NEW, (EOS,))
    chosen = _settings(plain)[setting]
    eos = (EOS,)
    if setting in ("min_new_tokens", "min_length"):
        eos = (plain[3],)
        plain = reference_greedy(model, PROMPT, NEW, eos)
    try:
        model.generation_config = saved.__class__.from_dict({**saved.to_dict(), **chosen})
        ref = reference_greedy(model, PROMPT, NEW, eos)
        assert ref != plain, f"{setting} should change the greedy output of this model"
        for name, drafter in _drafters(lm, ref).items():
            ours = _speculative(model, lm, drafter, eos=eos)
            assert ours == ref, f"{setting} with the {name} drafter"
    finally:
        model.generation_config = saved


def test_guidance_scale_is_refused_by_name(llama):
    model, lm = llama
    saved = model.generation_config
    model.generation_config = saved.__class__.from_dict({**saved.to_dict(), "guidance_scale": 1.5})
    try:
        with pytest.raises(UsageError, match="guidance_scale"):
            _speculative(model, lm, NoDrafter())
    finally:
        model.generation_config = saved


def test_a_sampling_config_is_sampled_not_decoded_greedily(llama):
    """do_sample=True in the call (or the model's generation config) samples; beams stay refused."""
    model, lm = llama
    greedy = reference_greedy(model, PROMPT, NEW, (EOS,))
    sampled = [
        _through_generate(model, lm, NoDrafter(), do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(s))[0]
        for s in range(3)
    ]
    assert all(s != greedy for s in sampled) and len({tuple(s) for s in sampled}) == 3
    with pytest.raises(UsageError, match="num_beams=2"):
        _through_generate(model, lm, NoDrafter(), do_sample=True, num_beams=2)


def test_stopping_criteria_stop_at_the_first_token_they_fire_on(llama):
    """A stopping rule passed to generate() ends generation at the same token, even when that
    token arrives in the middle of an accepted run of drafts."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, lm = llama
    plain = reference_greedy(model, PROMPT, NEW, (EOS,))
    stop_token = plain[5]  # inside the second pass, whose six drafts are all right

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    criteria = StoppingCriteriaList([StopAt()])
    ref = reference_greedy(model, PROMPT, NEW, (EOS,), stopping_criteria=criteria)
    assert len(ref) < len(plain) and ref[-1] == stop_token

    drafter = ScriptedDrafter(plain, len(PROMPT), 1.0, 6, seed=0)
    tokens, [ours] = _through_generate(model, lm, drafter, stopping_criteria=criteria)
    assert tokens == ref
    # the pass that stopped counts only the tokens it emitted
    assert sum(ours.accept_lengths) == len(ref) and ours.accept_lengths[-1] < 7


# -- attention paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 3, 6])
def test_sdpa_mask_decision_is_transformers_own(window):
    """Mask or no mask: the same decision generate() makes for the same positions."""
    for start in range(0, 12):
        for k in range(1, 8):
            theirs = _ignore_causal_mask_sdpa(None, k, start + k, start, 0, window)
            assert sdpa_skips_mask(start, k, window) == theirs, (start, k, window)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-sliding", "mistral"])
def test_eager_attention_matches_generate(arch, one_thread):
    model = tiny_model(arch, attn_implementation="eager")
    lm = HFCausalLM(model)
    ref = reference_greedy(model, PROMPT, NEW, ())
    for name, drafter in _drafters(lm, ref).items():
        result = generate(lm, PROMPT, NEW, drafter)
        assert list(result.token_ids) == ref, name


def test_other_attention_implementations_are_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ModelError, match="flex_attention.*sdpa"):
        HFCausalLM(model)


# -- positions -----------------------------------------------------------------------------------


def _rope_llama(rope_parameters):
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters}, attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    ],
    ids=["linear", "llama3", "yarn"],
)
def test_static_rope_variants_match_generate(rope, one_thread):
    model = _rope_llama(rope)
    lm = HFCausalLM(model)
    ref = reference_greedy(model, PROMPT, 40, ())  # runs past original_max_position_embeddings
    for name, drafter in _drafters(lm, ref).items():
        assert list(generate(lm, PROMPT, 40, drafter).token_ids) == ref, name


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
         "original_max_position_embeddings": 16},
    ],
    ids=["dynamic", "longrope"],
)
def test_position_dependent_rope_is_refused(rope):
    with pytest.raises(ModelError, match=rope["rope_type"]):
        HFCausalLM(_rope_llama(rope))


def test_a_cache_write_out_of_place_is_an_error(llama):
    """Each layer's write must land at its own length: a drafter bug becomes an error."""
    model, lm = llama
    with torch.inference_mode():
        cache = lm.new_cache(16)
        hidden = lm.embed(torch.tensor([5, 6, 7]))
        lm.run_layer(0, hidden, 0, cache)
        with pytest.raises(RuntimeError, match="layer 0 holds 3 cached positions but is asked to write at 2"):
            lm.run_layer(0, lm.embed(torch.tensor([8])), 2, cache)
        with pytest.raises(RuntimeError, match="layer 1 holds 0"):
            lm.run_layer(1, hidden, 1, cache)


# -- near ties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["eager", "onednn"])
@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3", "mistral", "qwen3"])
def test_near_tied_logits_still_match_generate(arch, kernels, one_thread):
    """A small init makes the top two logits nearly tied (margins ~1e-5 to 1e-4), so any
    difference in how verification rounds several rows at once would show up here; on every
    kernel path (the prepacked one fuses and reorders the weight products)."""
    model = tiny_model(arch, initializer_range=0.002)
    lm = HFCausalLM(model, kernels=Kernels(model, kernels))
    ref = reference_greedy(model, PROMPT, 60, ())
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT + ref])).logits[0, len(PROMPT) - 1 : -1]
    top2 = logits.topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) < 1e-3, "the fixture must really be near ties"
    for name, drafter in _drafters(lm, ref).items():
        ours = list(generate(lm, PROMPT, 60, drafter).token_ids)
        assert ours == ref, f"{name}: {divergence(model, PROMPT, ours, ref).describe()}"

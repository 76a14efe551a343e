"""Tiny random models of every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
EOS = 3

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    # A wide init makes logits peaked, so greedy choices are not decided by rounding noise.
    initializer_range=0.2,
    eos_token_id=EOS,
    bos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=False,
    attn_implementation="sdpa",
)


def _configs():
    return {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen2-sliding": (
            Qwen2Config,
            Qwen2ForCausalLM,
            {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
        ),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            {
                "head_dim": 16,
                "sliding_window": 5,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                "final_logit_softcapping": 5.0,
                "query_pre_attn_scalar": 16,
            },
        ),
    }


ARCHITECTURES = tuple(_configs())


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = _configs()[name]
    config = config_cls(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    return model_cls(config).eval()


def greedy_reference(model, prompt_ids, max_new_tokens, eos_token_id=EOS):
    """transformers' own greedy decoding: the ground truth, on token ids."""
    from specbound_runtime.exactness import reference_greedy

    return reference_greedy(model, list(prompt_ids), max_new_tokens, () if eos_token_id is None else (eos_token_id,))

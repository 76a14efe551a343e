"""Tiny random models of every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

import random

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


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model; `overrides` change config fields (initializer_range=0.02 gives the
    nearly flat logits where top-two ties are decided by rounding)."""
    config_cls, model_cls, extra = _configs()[name]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return model_cls(config).eval()


def greedy_reference(model, prompt_ids, max_new_tokens, eos_token_id=EOS):
    """transformers' own greedy decoding: the ground truth, on token ids."""
    from specbound_runtime.exactness import reference_greedy

    return reference_greedy(model, list(prompt_ids), max_new_tokens, () if eos_token_id is None else (eos_token_id,))


class ScriptedDrafter:
    """Drafts from a known continuation, each draft pushed at a random depth (0..L-1).

    right_rate=1 is a drafter that is always right, 0 one that is always wrong; in between,
    random. Exercises catch-up of mixed depths, partial acceptance and rollback."""

    def __init__(self, continuation, prompt_len, right_rate, width, seed):
        self.continuation = continuation
        self.prompt_len = prompt_len
        self.right_rate = right_rate
        self.width = width
        self.rng = random.Random(seed)

    def draft(self, seq, budget: int) -> None:
        for _ in range(min(budget, self.width)):
            index = len(seq.tokens) - self.prompt_len + len(seq.drafts)
            if index >= len(self.continuation):
                return
            seq.advance_to(max(seq.frontier_depth, self.rng.randrange(seq.lm.num_layers)))
            token = self.continuation[index]
            if self.rng.random() >= self.right_rate:
                token = (token + 1 + self.rng.randrange(50)) % seq.lm.vocab_size
            seq.push_draft(token, seq.frontier_depth)

    def observe(self, acceptance) -> None:
        pass

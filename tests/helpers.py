"""Tiny, download-free tokenizers and model folders for tests. Import with `from helpers import ...`.

    make_tiny_tokenizer(vocab_size, directory=None) -> PreTrainedTokenizerFast
        A word-level tokenizer over "<unk> <s> </s> <pad> w4 w5 ... w{vocab_size-1}" (ids = the
        numbers), splitting on whitespace, with a ChatML-like chat template. Saved into
        `directory` when one is given. Any text made of those words round-trips exactly.

    make_tiny_model_folder(directory, *, vocab_size=64, seed=0, num_layers=2, model_type="llama",
        hidden_size=32) -> Path
        Writes a randomly initialised fp32 *ForCausalLM (hidden 32 by default, 4 heads, 2 KV heads) with
        config.json + model.safetensors and the tiny tokenizer into `directory`, and returns it.
        The same seed gives the same weights. model_type: any of "llama", "mistral", "qwen2",
        "qwen3", or "gpt2" (an unsupported one, for error tests).

    make_tiny_gguf(path, *, seed=0, vocab_size=64, num_layers=2, architecture="llama") -> Path
        Writes an unquantised (F32) GGUF file of a tiny Llama (same sizes as above, untied
        embeddings) with a byte-free BPE tokenizer: tokens "<unk> <s> </s>", then one printable
        character each from "!" on, and the single merge '! "'. Loads in transformers with
        `from_pretrained(folder, gguf_file=name)` in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_tiny_tokenizer(vocab_size: int, directory: str | Path | None = None) -> PreTrainedTokenizerFast:
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    words = list(SPECIAL_TOKENS) + [f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def _tiny_config(model_type: str, vocab_size: int, num_layers: int, hidden_size: int = 32):
    from transformers import AutoConfig, GPT2Config

    if model_type == "gpt2":
        return GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, vocab_size=vocab_size, n_positions=128, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def make_tiny_model_folder(
    directory: str | Path,
    *,
    vocab_size: int = 64,
    seed: int = 0,
    num_layers: int = 2,
    model_type: str = "llama",
    hidden_size: int = 32,
) -> Path:
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = _tiny_config(model_type, vocab_size, num_layers, hidden_size)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory)
    make_tiny_tokenizer(vocab_size, directory)
    return directory


def make_tiny_gguf(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 64,
    num_layers: int = 2,
    architecture: str = "llama",
) -> Path:
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv_heads = 32, 64, 4, 2
    kv = hidden // heads * kv_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(0)  # all F32
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("!") + i) for i in range(vocab_size - 4)] + ['!"']
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab_size - 3))  # 3 = control, 1 = normal
    writer.add_token_merges(['! "'])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)

    def random(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    random("token_embd.weight", vocab_size, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    random("output.weight", vocab_size, hidden)
    for i in range(num_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        random(f"blk.{i}.attn_q.weight", hidden, hidden)
        random(f"blk.{i}.attn_k.weight", kv, hidden)
        random(f"blk.{i}.attn_v.weight", kv, hidden)
        random(f"blk.{i}.attn_output.weight", hidden, hidden)
        random(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        random(f"blk.{i}.ffn_up.weight", ffn, hidden)
        random(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

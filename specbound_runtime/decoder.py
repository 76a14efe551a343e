"""A loaded model, its exit policy and its tokenizer, ready to decode prompts: conversations in,
text streamed out, and each decoded turn reported (its JSON record and its statistics line)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .engine import GenerationResult
from .errors import InputError
from .generation import generate_arguments
from .sampling import DecodingMode, PromptSampling


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    max_new_tokens: int  # after clamping to the model's context
    clamped: bool


def token_ids(tokenizer, messages: list[dict], chat: bool) -> list[int]:
    """A conversation's token ids through the tokenizer's chat template, with the assistant's turn
    opened (chat), or the last message's raw text with the tokenizer's special tokens."""
    if chat:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"]
    return [int(i) for i in ids]


class Decoder:
    """Prompts in (chat template, the model's context), token ids and statistics out: the layer
    the CLI, the bench and calibration share over a loaded `SpecBound`."""

    def __init__(self, m):
        self.m = m
        self.model = m.model
        self.tokenizer = m.tokenizer
        self.lm = m.lm
        self.policy = m.policy
        self.eos_token_ids = m.eos_token_ids
        self.context = int(getattr(m.model.config, "max_position_embeddings", 0) or 0) or None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, messages: list[dict], chat: bool, max_new_tokens: int) -> Encoded:
        """Token ids of a conversation (chat template) or of raw text (the last message alone)."""
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if not messages or not messages[-1]["content"].strip():
            raise InputError("the prompt is empty; give some text")
        if chat:
            if not self.has_chat_template:
                raise InputError("this tokenizer has no chat template; use --no-chat")
        ids = token_ids(self.tokenizer, messages, chat)
        if not ids:
            raise InputError("the prompt encodes to no tokens; give some text")
        clamped = False
        if self.context is not None:
            if len(ids) >= self.context:
                raise InputError(
                    f"the prompt is {len(ids)} tokens, the model's context is {self.context}; shorten it"
                )
            if len(ids) + max_new_tokens > self.context:
                max_new_tokens, clamped = self.context - len(ids), True
        return Encoded(ids=tuple(ids), max_new_tokens=max_new_tokens, clamped=clamped)

    def generate(
        self, encoded: Encoded, speculation: bool = True, on_tokens=None, mode: DecodingMode | None = None, generator=None
    ) -> GenerationResult:
        """Decoding inside the model's own `generate()`, so its generation config's processors
        and stopping rules apply exactly as they do there. mode: greedy (default) or sampling
        settings; generator: a torch.Generator for sampling (None: torch's global generator)."""
        return self.m.generate_with_stats(
            torch.tensor([encoded.ids]),
            **generate_arguments(encoded.max_new_tokens, self.eos_token_ids, mode),
            generator=generator,
            on_tokens=on_tokens,
            speculation=speculation,
        ).stats

    def generate_batch(self, batch: list[Encoded], speculation: bool = True, mode: DecodingMode | None = None, generator=None):
        """Several encoded prompts decoded together (left-padded, one shared pass a round), each
        answered as if alone: a batch.BatchResult, rows in order. Every row gets the batch's
        smallest clamped max_new_tokens (one limit for the batch, as generate() has)."""
        if len(batch) == 1:  # a batch of one is the one-sequence engine's
            from .batch import BatchResult

            r = self.generate(batch[0], speculation, mode=mode, generator=generator)
            return BatchResult((r,), r.wall_time_s, (1,) * (r.verify_passes - 1), r.pass_widths, r.pass_seconds)
        width = max(len(e.ids) for e in batch)
        pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        ids = torch.tensor([[pad] * (width - len(e.ids)) + list(e.ids) for e in batch])
        mask = torch.tensor([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in batch])
        max_new = min(e.max_new_tokens for e in batch)
        check_batch_memory(self.lm, len(batch), width + max_new)
        return self.m.generate_with_stats(
            ids,
            attention_mask=mask,
            **generate_arguments(max_new, self.eos_token_ids, mode),
            generator=generator,
            speculation=speculation,
        ).stats

    def turn_record(self, encoded: Encoded, result: GenerationResult, text: str, sampling: PromptSampling, index: int, turn: int) -> dict:
        """What `specbound decode --json` prints for turn `turn` of prompt `index`."""
        kernels = self.m.kernels.report
        return {
            "prompt_index": index,
            "turn": turn,
            "text": text,
            "token_ids": list(result.token_ids),
            "new_tokens": result.new_tokens,
            "wall_time_s": round(result.wall_time_s, 4),
            "tokens_per_s": round(result.tokens_per_second, 2),
            "accept_lengths": list(result.accept_lengths),
            "mean_accepted_length": round(result.mean_accepted_length, 4),
            "acceptance_rate": round(result.acceptance_rate, 4),
            "exit_layers": list(result.exit_layers),
            "verify_passes": result.verify_passes,
            "fallbacks": result.fallbacks,
            "clamped": encoded.clamped,
            "rss_mb": _rss_mb(),  # resident memory after this prompt: flat across prompts
            "decoding": sampling.mode.describe(),
            "seed": sampling.seed,  # the prompt's own seed, from (--seed, prompt index)
            # one-time cost at load, apart from the decoding time above
            "kernels": {"path": kernels.path, "setup_s": round(kernels.setup_s, 3), "extra_mb": round(kernels.extra_bytes / 2**20, 1)},
        }


class TextStream:
    """Writes generated text as it is accepted, so that everything written equals the final
    decoded text, for any tokenizer.

    Decoding a prefix of the ids does not always give a prefix of the final text: a multi-byte
    character may be cut, and a tokenizer's clean-up (" ." -> ".", " n't" -> "n't") or a
    word-initial marker can change the text before the newest token. So, like transformers'
    TextStreamer, it writes only up to a safe boundary, but a stricter one: text before the last
    whitespace of the whole decoded sequence, written only if it extends what was already
    written. Unlike TextStreamer it never decodes a chunk on its own (a chunk decoded alone can
    lose a leading space)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        # Looked up per stream, not bound at import: whoever replaced sys.stdout since gets the text.
        self.out = sys.stdout if out is None else out
        self.ids: list[int] = []
        self.printed = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def __call__(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self._decode()
        cut = max(text.rfind(c) for c in (" ", "\n", "\t", "\r"))
        safe = text[:cut] if cut > 0 else ""
        if "\ufffd" in safe[len(self.printed) :]:  # an incomplete multi-byte character: wait
            safe = safe[: safe.index("\ufffd", len(self.printed))]
        if len(safe) > len(self.printed) and safe.startswith(self.printed):
            self.out.write(safe[len(self.printed) :])
            self.out.flush()
            self.printed = safe

    def finish(self) -> str:
        text = self._decode()
        # The held-back rule above keeps `printed` a prefix of the final text.
        self.out.write(text[len(self.printed) :] + "\n")
        self.out.flush()
        return text


def exit_layer_histogram(exit_layers) -> dict[int, int]:
    hist: dict[int, int] = {}
    for layer in exit_layers:
        hist[layer] = hist.get(layer, 0) + 1
    return dict(sorted(hist.items()))


def turn_line(result: GenerationResult, record: dict, sampled: bool) -> str:
    """The statistics line `specbound decode` writes to stderr after a turn (its `turn_record`,
    with the comparison against generate() where --check-exact added one)."""
    hist = " ".join(f"{k}:{v}" for k, v in exit_layer_histogram(result.exit_layers).items()) or "none"
    return (
        f"[prompt {record['prompt_index']} turn {record['turn']}] {result.new_tokens} tokens in {result.wall_time_s:.2f}s "
        f"= {result.tokens_per_second:.1f} tok/s | mean accepted length {result.mean_accepted_length:.2f} "
        f"| acceptance {result.acceptance_rate:.0%} of {result.drafted} drafts | {result.verify_passes} "
        f"verify passes | exit layers {hist}"
        + (f" | {result.fallbacks} full-depth fallbacks" if result.fallbacks else "")
        + (f" | {record['decoding']}" + (f", seed {record['seed']}" if record["seed"] is not None else "") if sampled else "")
        + (
            ""
            if "exact" not in record
            else f" | generate() {record['generate_wall_time_s']:.2f}s, speedup {record['speedup_vs_generate']}x"
            f" | exact: {'yes' if record['exact'] else 'NO'}"
        )
    )


def batch_memory_bytes(lm, rows: int, length: int) -> int:
    """About what decoding `rows` prompts of up to `length` positions (prompt and new tokens)
    needs beyond the weights: every row's keys and values at every layer, and the prefill's
    largest activations (attention scores, the MLP's widest product, the head's logits)."""
    config = lm.model.config
    size = torch.finfo(lm.dtype).bits // 8
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    cache = lm.num_layers * 2 * rows * kv_heads * length * head_dim * size
    per_position = heads * length + 3 * int(config.intermediate_size) + 4 * int(config.hidden_size)
    return cache + rows * length * per_position * size + rows * lm.vocab_size * size * 16


def check_batch_memory(lm, rows: int, length: int) -> None:
    """Refuse, before any work, a batch whose cache and activations would not fit in the memory
    this machine has free (CPU: MemAvailable; CUDA: the device's free memory)."""
    need = batch_memory_bytes(lm, rows, length)
    free = _free_memory(lm.device)
    if free is not None and need > free:
        raise InputError(
            f"a batch of {rows} prompts up to {length} positions needs about {need / 2**30:.1f} GiB for its cache "
            f"and activations, and {free / 2**30:.1f} GiB is free; use a smaller --batch-size or fewer new tokens"
        )


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    kib = _proc_kib("/proc/meminfo", "MemAvailable:")
    return None if kib is None else kib * 1024


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux VmHWM)."""
    kib = _proc_kib("/proc/self/status", "VmHWM:")
    return None if kib is None else round(kib / 1024, 1)


def _proc_kib(path: str, key: str) -> int | None:
    """A "key: N kB" line of a Linux /proc file, in KiB; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)

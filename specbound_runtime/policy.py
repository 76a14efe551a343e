"""The paper's exit rule as pure math: temperature schedule, exit threshold, depth and width bounds.

Layers are numbered as the paper numbers them: layer l of L is the output of the l-th decoder
layer (1 <= l <= L), so "exit at layer l" means the token's hidden state after l layers is turned
into a draft through the final norm and the LM head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .guard import DraftGuard
from .host import read

# Documented defaults when no artifact is given (see README, "Default schedule").
PAPER_ALPHA = 1.0
PAPER_THRESHOLD = 0.9
PAPER_CHECK_FRACTIONS = (0.5, 0.625, 0.75, 0.875)
PAPER_W_MAX = 4


def paper_temperatures(alpha: float, check_layers: tuple[int, ...], num_layers: int) -> tuple[float, ...]:
    """The paper's annealing T_l = 1 + alpha * (1 - l/L): hotter (less confident) when shallower."""
    return tuple(1.0 + alpha * (1.0 - layer / num_layers) for layer in check_layers)


def _stored(tensor: str, slot: int | None = None, dtype: str = "int64", sparse: bool = False, required: bool = False) -> dict:
    """How the artifact stores a policy field: in tensor `policy.<tensor>` (at `slot` of it, for
    fields packed together), of `dtype`. sparse: written only when it differs from its default, so
    an artifact of a policy without it is byte for byte what it was before the field existed.
    required: an artifact without the tensor is refused; any other field missing from an older
    artifact takes its default."""
    return {"tensor": tensor, "slot": slot, "dtype": dtype, "sparse": sparse, "required": required}


@dataclass(frozen=True)
class Stored:
    """One tensor of the policy in an artifact: its name, dtype, the fields it holds (one, or
    several packed in slot order) and how it is written (`_stored`)."""

    tensor: str
    dtype: str
    fields: tuple[str, ...]
    packed: bool
    sparse: bool
    required: bool
    kind: str  # "vector" (a tuple field, its own tensor), "flag" (a bool, as 0 or 1) or "number"


def storage() -> tuple[Stored, ...]:
    """The artifact's layout of ExitPolicy, derived from its fields' metadata."""
    out: dict[str, Stored] = {}
    for f in dataclasses.fields(ExitPolicy):
        s = f.metadata.get("tensor") and f.metadata
        if not s:
            continue
        have = out.get(s["tensor"])
        names = (have.fields if have else ()) + (f.name,)
        kind = "vector" if str(f.type).startswith("tuple") else "flag" if str(f.type) == "bool" else "number"
        out[s["tensor"]] = Stored(s["tensor"], s["dtype"], names, s["slot"] is not None, s["sparse"], s["required"], kind)
    return tuple(out.values())


@dataclass(frozen=True)
class ExitPolicy:
    """When a drafted token exits early, and when drafting stops.

    check_layers: layers (1..L-1, increasing) where a token's confidence is checked; none at all
      turns early exit off (prompt lookup alone, or with lookup off too, no drafting: plain
      decoding, what calibration chooses where no draft source pays).
    temperatures, thresholds: one per check layer; exit when max softmax(z_l / T_l) >= threshold_l.
    d_max: depth bound; a token that reaches it without exiting is a hard token and ends drafting.
    w_max: width bound; drafting stops when this many drafts exist.
    lookup_ngram, lookup_max: our addition to the paper. When the last lookup_ngram tokens occurred
      earlier in the context, up to lookup_max tokens that followed them are drafted at depth 0,
      at no layer cost (prompt lookup); early-exit drafting goes on from there. 0 turns it off.
    lookup_min: with lookup on, back off: where the last lookup_ngram tokens never occurred
      earlier, try the last lookup_ngram - 1, and so on down to lookup_min tokens (the longest
      match wins). 0: no backoff, only lookup_ngram.
    lookup_floor: with lookup on, draft by the match's length: a match on the last s tokens drafts
      up to max(lookup_floor, s) tokens, never more than lookup_max (a longer match is right more
      often, so it may draft more; SuffixDecoding sizes its speculation by match length too).
      0: every match drafts up to lookup_max.
    head_draft: our addition too. When prompt lookup proposes nothing at the start of a round, one
      draft from the fitted next-token head (exit_head.py), also at no layer cost; needs an exit
      head that holds one. Prompt lookup and early exit go on after it.
    guard_costs: the run-time guard on those two sources (guard.py): guard_costs[k - 1] is what k
      such drafts add to a verification pass, in plain decoding steps. A source whose recent
      drafts verification keeps too few of to pay that pauses, and probes again later. Empty: no
      guard (artifacts written before it).
    """

    num_layers: int  # the model's; an artifact takes it from its model fingerprint
    check_layers: tuple[int, ...] = field(metadata=_stored("check_layers", required=True))
    temperatures: tuple[float, ...] = field(metadata=_stored("temperatures", dtype="float64", required=True))
    thresholds: tuple[float, ...] = field(metadata=_stored("thresholds", dtype="float64", required=True))
    d_max: int = field(metadata=_stored("bounds", slot=0, required=True))
    w_max: int = field(metadata=_stored("bounds", slot=1, required=True))
    lookup_ngram: int = field(default=0, metadata=_stored("lookup", slot=0))
    lookup_max: int = field(default=0, metadata=_stored("lookup", slot=1))
    head_draft: bool = field(default=False, metadata=_stored("head_draft", sparse=True))
    lookup_min: int = field(default=0, metadata=_stored("lookup_backoff", sparse=True))
    lookup_floor: int = field(default=0, metadata=_stored("lookup_floor", sparse=True))
    guard_costs: tuple[float, ...] = field(default=(), metadata=_stored("guard_costs", dtype="float32", sparse=True))

    def to_dict(self) -> dict:
        """Every field by its name (tuples as lists): what `inspect --json` and the bench's
        results show, and what `from_dict` reads back."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in dataclasses.fields(self) for v in (getattr(self, f.name),)}

    @classmethod
    def from_dict(cls, data: dict) -> "ExitPolicy":
        """The policy `to_dict` wrote (lists back to tuples); a missing field takes its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown policy fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def __post_init__(self) -> None:
        L = self.num_layers
        if L < 2:
            raise ValueError(f"a model needs at least 2 layers to exit early, got {L}")
        layers = self.check_layers
        if layers and (list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= L):
            raise ValueError(f"check layers must be increasing and within 1..{L - 1}, got {list(layers)}")
        if len(self.temperatures) != len(layers) or len(self.thresholds) != len(layers):
            raise ValueError("need exactly one temperature and one threshold per check layer")
        for t in self.temperatures:
            if not (t > 0 and t < float("inf")):
                raise ValueError(f"temperatures must be finite and > 0, got {t}")
        for p in self.thresholds:
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"thresholds must lie in [0, 1], got {p}")
        if not (1 <= self.d_max <= L):
            raise ValueError(f"d_max must lie in 1..{L}, got {self.d_max}")
        if self.w_max < 1:
            raise ValueError(f"w_max must be >= 1, got {self.w_max}")
        if self.lookup_ngram < 0 or self.lookup_max < 0 or (self.lookup_ngram == 0) != (self.lookup_max == 0):
            raise ValueError(
                f"lookup_ngram and lookup_max must both be 0 (off) or both >= 1, got {self.lookup_ngram}, {self.lookup_max}"
            )
        if self.lookup_min and not (1 <= self.lookup_min <= self.lookup_ngram):
            raise ValueError(
                f"lookup_min must be 0 (no backoff) or within 1..lookup_ngram ({self.lookup_ngram}), got {self.lookup_min}"
            )
        if self.lookup_floor and not (self.lookup_ngram and 1 <= self.lookup_floor <= self.lookup_max):
            raise ValueError(
                f"lookup_floor must be 0 (drafts fixed at lookup_max) or within 1..lookup_max ({self.lookup_max}) "
                f"with lookup on, got {self.lookup_floor}"
            )
        object.__setattr__(self, "guard_costs", tuple(float(c) for c in self.guard_costs))
        if not all(c >= 0 and c < float("inf") for c in self.guard_costs):
            raise ValueError(f"guard_costs must be finite and >= 0, got {list(self.guard_costs)}")
        if not isinstance(self.head_draft, bool):
            raise ValueError(f"head_draft must be True or False, got {self.head_draft!r}")

    @property
    def drafts(self) -> bool:
        """Whether this policy drafts at all (early exit, prompt lookup or the next-token head)."""
        return bool(self.sources)

    @property
    def sources(self) -> tuple[str, ...]:
        """The draft sources this policy uses, in the order a round consults them: those that cost
        no layers first ("lookup", then "head"; the first of them that proposes drafts opens the
        round), then "early-exit", which drafts on up to the width bound."""
        on = (("lookup", self.lookup_ngram > 0), ("head", self.head_draft), ("early-exit", bool(self.check_layers)))
        return tuple(name for name, used in on if used)

    @property
    def lookup_rule(self) -> tuple[int, int]:
        """Prompt lookup's match rule: (longest tail, shortest tail it backs off to; 0: no backoff)."""
        return self.lookup_ngram, self.lookup_min

    def guard(self) -> DraftGuard | None:
        """A fresh run-time guard on the no-layer sources (guard.DraftGuard) at this policy's
        prices; None for a policy without them."""
        return DraftGuard(self.guard_costs) if self.guard_costs else None

    def describe(self) -> str:
        """The policy in one line of words (what `specbound inspect` prints)."""
        lookup = lookup_words(self.lookup_ngram, self.lookup_min, self.lookup_max, self.lookup_floor) if self.lookup_ngram else "off"
        guard = self.guard_costs
        return (
            f"checks {list(self.check_layers)} temperatures {[round(t, 3) for t in self.temperatures]} thresholds "
            f"{[round(t, 3) for t in self.thresholds]} d_max {self.d_max} w_max {self.w_max} prompt lookup {lookup} "
            f"head draft: {'on' if self.head_draft else 'off'}"
            + (f"; guard on lookup and head: {len(guard)} drafts pay from {guard[-1]:.2f} kept tokens" if guard else "; no run-time guard")
        )

    def lookup_width(self, matched: int) -> int:
        """How many tokens prompt lookup may draft after a match on the last `matched` tokens."""
        if not self.lookup_floor:
            return self.lookup_max
        return min(self.lookup_max, max(self.lookup_floor, matched))

    def lookup_drafts(self, tokens: list[int], limit: int) -> list[int]:
        """What prompt lookup drafts after `tokens` (at most `limit`): the continuation of the
        longest matching tail (lookup_match), as many tokens as lookup_width allows. [] with
        lookup off or no match."""
        if not self.lookup_ngram:
            return []
        end, matched = lookup_match(tokens, self.lookup_ngram, self.lookup_min)
        return tokens[end + 1 : end + 1 + min(self.lookup_width(matched), limit)] if matched else []

    @property
    def active_checks(self) -> tuple[tuple[int, float, float], ...]:
        """(layer, temperature, threshold) for the check layers within the depth bound."""
        return tuple(
            (l, t, p)
            for l, t, p in zip(self.check_layers, self.temperatures, self.thresholds)
            if l <= self.d_max
        )

    @classmethod
    def paper_default(
        cls,
        num_layers: int,
        alpha: float = PAPER_ALPHA,
        threshold: float = PAPER_THRESHOLD,
        check_layers: tuple[int, ...] | None = None,
        d_max: int | None = None,
        w_max: int = PAPER_W_MAX,
    ) -> "ExitPolicy":
        if check_layers is None:
            check_layers = default_check_layers(num_layers)
        return cls(
            num_layers=num_layers,
            check_layers=tuple(check_layers),
            temperatures=paper_temperatures(alpha, tuple(check_layers), num_layers),
            thresholds=(threshold,) * len(check_layers),
            d_max=check_layers[-1] if d_max is None else d_max,
            w_max=w_max,
        )


def default_check_layers(num_layers: int) -> tuple[int, ...]:
    layers = sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in PAPER_CHECK_FRACTIONS})
    return tuple(layers)


@dataclass(frozen=True)
class ExitDecision:
    confidence: float
    token: int
    exits: bool


def exit_confidence(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """max softmax(z / T) and its argmax, for one position's logits (shape [V]), as 0-d tensors
    on the logits' device (reading them on the host is a device synchronisation)."""
    z = logits.float() / temperature
    top, token = z.max(dim=-1)
    # max softmax = 1 / sum(exp(z - max)); logsumexp keeps it stable.
    return torch.exp(top - torch.logsumexp(z, dim=-1)), token


def decide_exit(
    logits: torch.Tensor,
    temperature: float,
    threshold: float,
    draft_probs: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
) -> ExitDecision:
    """The exit rule, with one host read (one device synchronisation) per decision.

    Greedy: the draft is the argmax. Sampling: pass draft_probs (q over the same columns as
    logits) and a uniform number; the draft is drawn from q by inverse CDF (`sampling.sample_index`),
    in the same read. The exit rule itself is the same in both modes: calibrated confidence
    max softmax(z / T) against the threshold."""
    confidence, token = exit_confidence(logits, temperature)
    # NaN or +inf never produces a draft: the token goes on to the depth bound. (-inf is a
    # legitimate "impossible token", e.g. outside a fitted vocabulary short-list.)
    broken = torch.isnan(logits).any() | torch.isposinf(logits).any()
    if draft_probs is not None:
        from .sampling import sample_index

        if uniform is None:
            raise ValueError("sampling a draft needs a uniform number")
        # a q without finite mass (every column removed by the processors: NaN) drafts nothing
        broken = broken | ~(draft_probs.sum() > 0)
        token = sample_index(torch.nan_to_num(draft_probs, nan=0.0), uniform)
    exits = ~broken & (confidence >= threshold)
    # float32 holds any token id below 2**24 exactly (and MPS has no float64); one transfer
    flag, index, conf = read(torch.stack([exits.float(), token.float(), confidence.float()]))
    return ExitDecision(confidence=conf, token=int(index), exits=bool(flag))


def lookup_continuation(tokens: list[int], ngram: int, max_tokens: int, min_ngram: int = 0) -> list[int]:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the last
    `ngram` tokens (at most max_tokens of them); [] when there is none. With min_ngram (1 ..
    ngram), back off to shorter tails down to min_ngram tokens: the longest one that occurred wins."""
    end, _ = lookup_match(tokens, ngram, min_ngram)
    if end < 0 or max_tokens < 1:
        return []
    return tokens[end + 1 : end + 1 + max_tokens]


def lookup_match(tokens: list[int], ngram: int, min_ngram: int = 0) -> tuple[int, int]:
    """Where prompt lookup's match ends, and how many tokens it matched: the most recent earlier
    occurrence of the longest tail of `tokens` (ngram tokens, backing off down to min_ngram; 0:
    ngram only) that occurred before. (-1, 0) when there is none. One scan of the context,
    whatever the backoff."""
    n = len(tokens)
    lowest = min_ngram or ngram
    if ngram < 1 or n <= lowest:
        return -1, 0
    last = tokens[-1]
    best_end, best = -1, 0
    for end in range(n - 2, lowest - 2, -1):  # `end`: index of the match's last token
        if tokens[end] != last:
            continue
        k = 1
        while k < ngram and k <= end and tokens[end - k] == tokens[n - 1 - k]:
            k += 1
        if k > best:  # later (more recent) matches of the same length were seen first
            best_end, best = end, k
            if k == ngram:
                break
    return (best_end, best) if best >= lowest else (-1, 0)


def lookup_sizes(ngram: int, min_ngram: int = 0) -> range:
    """The tail lengths prompt lookup tries, longest first: ngram, then down to min_ngram (0: ngram only)."""
    return range(ngram, (min_ngram or ngram) - 1, -1)


def lookup_words(ngram: int, lookup_min: int, lookup_max: int, lookup_floor: int) -> str:
    """Prompt lookup's rule in words: "8-gram backing off to 2 x3-7 by match length". A match is
    at most `ngram` tokens long, so that bounds what a match-sized rule drafts beyond its floor."""
    gram = f"{ngram}-gram backing off to {lookup_min}" if lookup_min and lookup_min != ngram else f"{ngram}-gram"
    if not lookup_floor:
        return f"{gram} x{lookup_max}"
    most = min(lookup_max, max(lookup_floor, ngram))
    return f"{gram} x{lookup_floor}-{most} by match length" if lookup_floor < most else f"{gram} x{most}"

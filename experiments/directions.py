"""Issue 12 study: predict, from recorded data, what each direction for raising the speed ceiling
would give on the packaged model (SmolLM2-135M-Instruct, fp32, CPU), before any of it is built.

    .venv/bin/python experiments/directions.py --calibration-run runs/calibrate-NAME --costs COSTS.json
    .venv/bin/python experiments/directions.py --help

Last ran in full at b8056ad (the tables of docs/directions.md); 9177759 since changed how it
tokenizes prompts (specbound_runtime.decoder.token_ids). The defaults of --calibration-run, --costs
and --artifact name files on the machine it ran on, which a checkout lacks: pass a greedy
calibration's work folder (`specbound calibrate --work-dir`), a cost model (`specbound costs
--out`, or ~/.cache/specbound/costs/r4-*.json) and the quick start's artifact. Without
--calibration-run it trains on less data without saying so; without --costs it fails at the
analysis, after the 15-minute recording.

Stages (each cached under --out, default runs/directions/; delete a file to redo its stage):

1. answers.json: the model's greedy answers (generate(do_sample=False), 128 new tokens) to
   bench prompts (`task_prompts`, first turn, never seen by calibration: the test set) and to
   extra calibration-side prompts (more of the model's own answers to train on).
2. states-<set>.npz: one teacher-forced pass per sequence (HFCausalLM.layer_states, the decode
   path): the normed final state at every position, normed shallow states (layers 1, 2, 4), and
   the full model's greedy token.
3. The analysis (seconds): prints the markdown tables of docs/directions.md.

Data splits. train: calibration prompts that are not held out (their prompt text and the
model's recorded answers, <--calibration-run>/answers), the extra own answers, and
calibration documents; val: the calibration's held-out prompts' answers (choices such as the
ridge strength, the lookup n-gram and the tree shape are made here); test: the bench answers.

Decode model (zero-layer-cost drafts). A round starts at position t with the bonus token x_t
known and the final state h_{t-1} of the last verified position. Drafts for x_{t+1}..x_{t+k}
(a chain, or a tree of k nodes) are verified in one pass over k+1 positions, which costs
L*layer_base + k*L*layer_extra + head_base + k*head_extra + round_overhead (the simulator's
charge, calibrate/simulate.py); the round emits the accepted drafts plus one token. Plain
decoding costs L*layer_base + head_base + round_overhead per token. Drafting through the fitted
head costs one short-list head read per tree level (`check`, batched rows at the head's
extra/base ratio); through a shallow state of depth l, l layer calls per level, which the
verification pass then does not repeat. Speedups are over the engine's plain decoding, prefill
excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # keep numpy to one core
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAL_RUN = Path("/work/main/runs/calibrate-llama-L30-c8b10f5b1f86")
ARTIFACT = Path("/work/main/artifacts/smollm2-135m.safetensors")
# The greedy artifact's own cost model was measured under heavy contention (layer_base 20 ms,
# round_overhead 411 ms: ten times the plain step measured by bench); this file is the same
# machine's later measurement, whose plain step (48 ms) matches bench's hf-greedy (43 ms).
COSTS = Path.home() / ".cache/specbound/costs/c3e1c3eac88951db-s4096-t2-x86_64-c2-samplee24879ad.json"
SHALLOW = (1, 2, 4)  # shallow layers whose states are recorded
MAX_RANK = 16  # ranks at or beyond this count as a miss
DEPTHS = 3


# -- stage 1 and 2: recorded data -------------------------------------------------------------


@dataclass
class Seq:
    id: str
    split: str  # train / val / test
    kind: str  # own (a prompt and the model's answer) / doc (human text)
    task: str
    tokens: list[int]
    start: int  # index of the first answer token (0 for a document)


def load_model(threads: int):
    import torch

    from specbound_runtime.adapter import HFCausalLM
    from specbound_runtime.models import resolve_model

    torch.set_num_threads(threads)
    loaded = resolve_model("smollm2-135m", dtype="float32", device="cpu")
    return loaded, HFCausalLM(loaded.model)


def generate_answers(path: Path, args, loaded) -> dict:
    """Greedy answers to bench prompts (test) and to extra calibration-side prompts (train)."""
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from specbound.calibrate.corpus import load_corpus
    from specbound_runtime.decoder import token_ids
    from specbound.data.tasks import TASKS, task_prompts

    tok = loaded.tokenizer
    base = {p.id for p in load_corpus("default", 64, 64, 0.1, args.seed).prompts}
    wide = load_corpus("default", 64 + 4 * args.extra_own, 64, 0.1, args.seed).prompts
    extra = [p for p in wide if p.id not in base and not p.held_out][: args.extra_own]
    jobs = [("test", t, p.id, p.turns[0]) for t in TASKS for p in task_prompts(t, args.bench_per_task, args.seed)]
    jobs += [("train", "calibration", p.id, p.text) for p in extra]
    out = []
    started = time.perf_counter()
    for i, (split, task, pid, text) in enumerate(jobs):
        prompt = token_ids(tok, [{"role": "user", "content": text}], True)
        with torch.no_grad():
            ids = loaded.model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.eos_token_id,
            )
        answer = [int(x) for x in ids[0, len(prompt):]]
        out.append({"split": split, "task": task, "id": pid, "prompt": prompt, "answer": answer})
        print(f"  answer {i + 1}/{len(jobs)} {task} {pid}: {len(answer)} tokens, {time.perf_counter() - started:.0f} s", flush=True)
    path.write_text(json.dumps(out))
    return out


def build_sequences(args, loaded, answers: list[dict]) -> list[Seq]:
    from specbound.calibrate.corpus import load_corpus
    from specbound_runtime.decoder import token_ids

    tok = loaded.tokenizer
    recorded = {}
    for f in sorted((args.calibration_run / "answers").glob("shard-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recorded[r["id"]] = r["answer"]
    corpus = load_corpus("default", 64, 64, 0.1, args.seed)
    seqs = []
    for p in corpus.prompts:
        prompt = token_ids(tok, [{"role": "user", "content": p.text}], True)
        if recorded.get(p.id):
            seqs.append(Seq(p.id, "val" if p.held_out else "train", "own", "calibration", prompt + recorded[p.id], len(prompt)))
    for a in answers:
        task = a["task"] if a["split"] == "test" else "extra"
        seqs.append(Seq(a["id"], a["split"], "own", task, a["prompt"] + a["answer"], len(a["prompt"])))
    for d in corpus.documents[: args.documents]:
        if not d.held_out:
            ids = [int(i) for i in tok(d.text)["input_ids"]][: args.doc_tokens]
            seqs.append(Seq(d.id, "train", "doc", "document", ids, 0))
    return seqs


def record_states(path: Path, seqs: list[Seq], lm) -> dict:
    """Teacher-forced states of every sequence, concatenated, with per-sequence offsets."""
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import torch

    finals, shallow, greedy, offsets = [], {l: [] for l in SHALLOW}, [], [0]
    started = time.perf_counter()
    with torch.no_grad():
        for i, s in enumerate(seqs):
            states, logits = lm.layer_states(s.tokens)
            finals.append(lm.normed(states[-1][None])[0].float().numpy())
            for l in SHALLOW:
                shallow[l].append(lm.normed(states[l - 1][None])[0].numpy().astype(np.float16))
            greedy.append(logits.argmax(-1).numpy().astype(np.int32))
            offsets.append(offsets[-1] + len(s.tokens))
            if (i + 1) % 20 == 0:
                print(f"  states {i + 1}/{len(seqs)}, {time.perf_counter() - started:.0f} s", flush=True)
    out = {"final": np.concatenate(finals), "greedy": np.concatenate(greedy), "offsets": np.asarray(offsets)}
    for l in SHALLOW:
        out[f"layer{l}"] = np.concatenate(shallow[l])
    np.savez(path, **out)
    return out


# -- the decode model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    L: int
    base: float
    extra: float
    head_base: float
    head_extra: float
    check: float
    overhead: float

    @classmethod
    def read(cls, path: Path) -> "Costs":
        c = json.loads(path.read_text())
        c = c.get("cost_model", c)
        return cls(c["num_layers"], c["layer_base"], c["layer_extra"], c["head_base"], c["head_extra"], c["check"], c["round_overhead"])

    @property
    def plain(self) -> float:
        return self.L * self.base + self.head_base + self.overhead

    def verify(self, k):
        """One pass over the bonus token and k drafted positions."""
        return self.L * self.base + k * (self.L * self.extra + self.head_extra) + self.head_base + self.overhead

    def drafting(self, d: "Drafts", j: int) -> float:
        """Drafting work of one round: fitted-head reads (one short-list row each, `check`; further
        rows of a batched read at the head's extra/base ratio) and shallow layer calls (which the
        verification pass then does not repeat: the simulator's depth_sum term)."""
        return (d.reads[j] + d.rows[j] * self.head_extra / self.head_base) * self.check + d.shallow[j] * (self.base - self.extra)


@dataclass
class Drafts:
    """Per round-start position: accepted drafts, drafted positions, and the drafting work
    (single-row head reads, further batched rows, shallow layer calls)."""

    accepted: np.ndarray
    drafted: np.ndarray
    reads: np.ndarray
    rows: np.ndarray
    shallow: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Drafts":
        return cls(*(np.zeros(n, np.int64) for _ in range(5)))

    def _parts(self):
        return (self.accepted, self.drafted, self.reads, self.rows, self.shallow)

    def __or__(self, other: "Drafts") -> "Drafts":
        """Both in one tree (separate branches: positions and work add up, the longer accepted path wins)."""
        a, b = self._parts(), other._parts()
        return Drafts(np.maximum(a[0], b[0]), *(x + y for x, y in zip(a[1:], b[1:])))

    def either(self, other: "Drafts") -> "Drafts":
        """This source where it proposes, else the other."""
        use = self.drafted > 0
        return Drafts(*(np.where(use, x, y) for x, y in zip(self._parts(), other._parts())))

    def set(self, pos, accepted, drafted, reads=0, rows=0, shallow=0) -> "Drafts":
        for arr, v in zip(self._parts(), (accepted, drafted, reads, rows, shallow)):
            arr[pos] = v
        return self


def replay(d: Drafts, seqs: list[Seq], offsets: np.ndarray, costs: Costs, which: list[int]) -> tuple[float, float]:
    """The decode loop over the answers of sequences `which`: (speedup over plain, mean accepted length)."""
    total = tokens = rounds = 0.0
    for i in which:
        o, n, t = offsets[i], len(seqs[i].tokens), seqs[i].start
        while t < n:
            j = o + t
            a = min(int(d.accepted[j]), n - 1 - t)
            total += costs.verify(d.drafted[j]) + costs.drafting(d, j)
            tokens += a + 1
            rounds += 1
            t += a + 1
    return costs.plain * tokens / total, tokens / rounds


# -- direction 1 and 2: fitted multi-token head ---------------------------------------------------


def gram(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations' sums, with a bias column."""
    X = np.hstack([X, np.ones((len(X), 1), X.dtype)]).astype(np.float64)
    return X.T @ X, X.T @ Y.astype(np.float64)


def ridge(G: np.ndarray, XtY: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form ridge, bias unregularised; lam is relative to the mean feature power."""
    G = G.copy()
    k = np.arange(G.shape[0] - 1)
    G[k, k] += lam * np.trace(G[:-1, :-1]) / len(k)
    return np.linalg.solve(G, XtY).astype(np.float32)


def apply(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ W[:-1] + W[-1]


class Head:
    """A feature recipe for the multi-token head: which inputs predict the next normed final state."""

    def __init__(self, name: str, inp: str, two: bool = False):
        self.name, self.inp, self.two = name, inp, two  # inp: "emb" or "layerN"; two: also h_{t-2}
        self.layers = 0 if inp == "emb" else int(inp[5:])

    def features(self, prev2, prev, token_vec):
        return np.hstack([prev2, prev, token_vec] if self.two else [prev, token_vec])


def train_positions(seqs, offsets, which, kinds, answers_only):
    out = []
    for i in which:
        s = seqs[i]
        if s.kind not in kinds:
            continue
        first = max(2, s.start if answers_only else 2)
        out.append(np.arange(offsets[i] + first, offsets[i] + len(s.tokens)))
    return np.concatenate(out)


def round_positions(seqs, offsets, which):
    """Round starts t (the bonus x_t known) in the answers, with depth d valid while t+d <= n-1."""
    return np.concatenate([np.arange(offsets[i] + max(seqs[i].start, 2), offsets[i] + len(seqs[i].tokens)) for i in which])


def head_ranks(head, W, pos, D, shortlist_rows, slot, depth=DEPTHS):
    """Ranks (MAX_RANK = miss) of the full model's greedy token at depths 1..depth, along the
    true token path, states fed back recursively, and the head's confidence: its top-1 softmax
    probability at each depth and its second one at depth 1. D: the recorded arrays."""
    F, G, valid_end, tv = D["final"], D["greedy"], D["end"], D[head.inp]
    ranks = np.full((len(pos), depth), MAX_RANK, np.int16)
    conf = np.zeros((len(pos), depth + 1), np.float32)
    prev2, prev = F[pos - 2], F[pos - 1]
    for d in range(depth):
        p = pos + d  # the token x_p is an input; the target is the greedy token at p
        ok = p < valid_end[pos]
        pc = np.minimum(p, len(G) - 1)
        pred = apply(W, head.features(prev2, prev, tv[pc].astype(np.float32)))
        logits = pred @ shortlist_rows.T
        col = slot[G[pc]]
        tgt = np.where(col >= 0, logits[np.arange(len(pos)), np.maximum(col, 0)], np.inf)
        r = (logits > tgt[:, None]).sum(1)
        ranks[:, d] = np.where(ok & (col >= 0), np.minimum(r, MAX_RANK), MAX_RANK)
        top2 = np.sort(np.partition(logits, -2, axis=1)[:, -2:], axis=1)
        z = np.exp(logits - top2[:, 1:]).sum(1)
        conf[:, d] = 1 / z
        if d == 0:
            conf[:, depth] = np.exp(top2[:, 0] - top2[:, 1]) / z
        prev2, prev = prev, pred
    return ranks, conf


def prefix_counts(ranks, depth):
    """How often the true rank path starts with each rank tuple (up to `depth`)."""
    c = Counter()
    for row in ranks[:, :depth].tolist():
        for d in range(depth):
            if row[d] >= MAX_RANK:
                break
            c[tuple(row[: d + 1])] += 1
    return c


def best_tree(counts: Counter, size: int) -> list[tuple]:
    """The `size` most frequent prefixes: a prefix-closed tree maximising expected acceptance."""
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:size]]


def tree_drafts(ranks, tree):
    """Accepted length per round of a tree (a prefix-closed set of rank paths), its size, and its
    head reads: one per level, and one further batched row per further node expanded there."""
    nodes = set(tree)
    depth = max(len(k) for k in tree)
    acc = np.zeros(len(ranks), np.int64)
    for i, row in enumerate(ranks[:, :depth].tolist()):
        a = 0
        while a < depth and tuple(row[: a + 1]) in nodes:
            a += 1
        acc[i] = a
    parents = [len({k[:-1] for k in tree if len(k) == d}) for d in range(1, depth + 1)]
    return acc, len(tree), len(parents), sum(parents) - len(parents)


def tree_text(tree) -> str:
    widths = [sum(1 for k in tree if len(k) == d) for d in range(1, max(len(k) for k in tree) + 1)]
    return "x".join(map(str, widths))


# -- direction 3: prompt lookup and a draft datastore ---------------------------------------------


def lookup_proposals(tokens: list[int], start: int, ngram: int, max_tokens: int) -> dict[int, list[int]]:
    """lookup_continuation(tokens[:t+1], ngram, max_tokens) for every t >= start, incrementally."""
    last: dict[tuple, int] = {}
    out = {}
    for t in range(len(tokens)):
        if t >= start:
            key = tuple(tokens[t - ngram + 1 : t + 1]) if t + 1 > ngram else None
            end = last.get(key)
            out[t] = tokens[end + 1 : min(t + 1, end + 1 + max_tokens)] if end is not None else []
        if t >= ngram - 1:  # the n-gram ending at t may serve later positions
            last[tuple(tokens[t - ngram + 1 : t + 1])] = t
    return out


class Datastore:
    """n-gram continuation table (REST / SuffixDecoding style): for each context of 1..max_n tokens
    seen at least `min_count` times, its most frequent next token and that token's share."""

    def __init__(self, sequences, max_n: int, min_count: int):
        counts = defaultdict(Counter)
        for toks in sequences:
            for t in range(len(toks) - 1):
                for n in range(1, max_n + 1):
                    if t + 1 >= n:
                        counts[tuple(toks[t - n + 1 : t + 1])][toks[t + 1]] += 1
        self.max_n = max_n
        self.table = {}
        for k, c in counts.items():
            total = sum(c.values())
            if total >= min_count:
                tok, cnt = c.most_common(1)[0]
                self.table[k] = (tok, cnt / total)

    def propose(self, ctx: list[int], min_n: int, max_tokens: int, min_share: float) -> list[int]:
        out = []
        ctx = list(ctx[-self.max_n :])
        while len(out) < max_tokens:
            hit = None
            for n in range(self.max_n, min_n - 1, -1):
                if len(ctx) >= n and (e := self.table.get(tuple(ctx[-n:]))) is not None:
                    hit = e
                    break
            if hit is None or hit[1] < min_share:
                break
            out.append(hit[0])
            ctx = ctx[1:] + [hit[0]]
        return out


def chain_accepted(prop: list[int], G: np.ndarray, j: int, end: int) -> int:
    a = 0
    while a < len(prop) and j + a < end and prop[a] == G[j + a]:
        a += 1
    return a


def source_drafts(N, seqs, offsets, which, G, proposer) -> Drafts:
    d = Drafts.empty(N)
    for i in which:
        s, o = seqs[i], offsets[i]
        props = proposer(s)
        for t, prop in props.items():
            d.drafted[o + t] = len(prop)
            d.accepted[o + t] = chain_accepted(prop, G, o + t, o + len(s.tokens))
    return d


def acceptance_row(d: Drafts, pos) -> tuple[float, float, float]:
    """(share of rounds with a proposal, drafted tokens right, mean accepted per proposal)."""
    has = d.drafted[pos] > 0
    if not has.any():
        return 0.0, 0.0, 0.0
    return has.mean(), d.accepted[pos].sum() / d.drafted[pos].sum(), d.accepted[pos][has].mean()


# -- the analysis -------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def analyse(args, seqs: list[Seq], data: dict, lm) -> None:
    import torch

    from specbound_runtime.artifact import read_artifact

    started = time.perf_counter()
    costs = Costs.read(args.costs)
    offsets = data["offsets"]
    N = int(offsets[-1])
    tokens = np.concatenate([np.asarray(s.tokens, np.int64) for s in seqs])
    G = data["greedy"].astype(np.int64)
    D = {"final": data["final"], "greedy": G}
    with torch.no_grad():
        D["emb"] = lm.embed(torch.as_tensor(tokens))[0].numpy()
        head_w = lm.lm_head_weight.detach().numpy()
    for l in SHALLOW:
        D[f"layer{l}"] = data[f"layer{l}"]
    D["end"] = np.concatenate([np.full(len(s.tokens), offsets[i] + len(s.tokens) - 1) for i, s in enumerate(seqs)])
    shortlist = read_artifact(args.artifact).exit_weights.shortlist.numpy()
    rows_sl = head_w[shortlist]
    slot = np.full(head_w.shape[0], -1, np.int64)
    slot[shortlist] = np.arange(len(shortlist))

    split = {k: [i for i, s in enumerate(seqs) if s.split == k and s.kind == "own"] for k in ("train", "val", "test")}
    test_tasks = sorted({seqs[i].task for i in split["test"]})
    by_task = {t: [i for i in split["test"] if seqs[i].task == t] for t in test_tasks}
    pos = {k: round_positions(seqs, offsets, split[k]) for k in split}
    own = [i for i, s in enumerate(seqs) if s.kind == "own"]
    answer_mask = np.zeros(N, bool)
    for i in own:
        answer_mask[offsets[i] + seqs[i].start : offsets[i] + len(seqs[i].tokens)] = True
    same = (tokens[1:] == G[:-1])[answer_mask[1:]]
    out = []

    def say(text=""):
        print(text, flush=True)
        out.append(text)

    n_ans = {k: int(sum(len(seqs[i].tokens) - seqs[i].start for i in split[k])) for k in split}
    say(f"Data: train {len(split['train'])} own answers ({n_ans['train']} tokens) + "
        f"{sum(s.kind == 'doc' for s in seqs)} documents; val {len(split['val'])} answers ({n_ans['val']} tokens); "
        f"test (bench, never in calibration) {len(split['test'])} answers ({n_ans['test']} tokens) over {len(test_tasks)} tasks. "
        f"The decode path's greedy token equals the generated one at {same.mean():.1%} of answer positions.")
    say(f"Cost model ({args.costs.name}), ms: layer {costs.base:.3f} + {costs.extra:.3f}/extra position, "
        f"head {costs.head_base:.3f} + {costs.head_extra:.3f}, check {costs.check:.3f}, round {costs.overhead:.3f}; "
        f"plain step {costs.plain:.1f}, each verified draft {costs.L * costs.extra + costs.head_extra:.2f} "
        f"(break-even acceptance {(costs.L * costs.extra + costs.head_extra) / costs.plain:.1%}).")
    say()

    def sim(d: Drafts, which=None):
        return replay(d, seqs, offsets, costs, split["test"] if which is None else which)

    # -- 1. fitted multi-token head: data and regularisation --------------------------------
    say("## 1. Fitted multi-token head\n")
    emb = Head("embedding", "emb")
    cal_own = [i for i in split["train"] if seqs[i].task == "calibration"]
    extra_own = [i for i in split["train"] if seqs[i].task == "extra"]
    docs = [i for i, s in enumerate(seqs) if s.kind == "doc"]
    recipes = {
        "recorded own answers": (cal_own, True),
        "+ extra own answers": (cal_own + extra_own, True),
        "+ their prompts": (cal_own + extra_own, False),
        "+ documents": (cal_own + extra_own + docs, False),
    }
    lams = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    rows, fits = [], {}
    for name, (which, answers_only) in recipes.items():
        tp = train_positions(seqs, offsets, which, ("own", "doc"), answers_only)
        sums = gram(emb.features(None, D["final"][tp - 1], D["emb"][tp]), D["final"][tp])
        for lam in lams:
            W = ridge(*sums, lam)
            sample = tp[answer_mask[tp]][:: max(1, int(answer_mask[tp].sum()) // 3000)]
            tr = head_ranks(emb, W, sample, D, rows_sl, slot, depth=1)[0][:, 0]
            va = head_ranks(emb, W, pos["val"], D, rows_sl, slot, depth=1)[0][:, 0]
            te = head_ranks(emb, W, pos["test"], D, rows_sl, slot, depth=1)[0][:, 0]
            fits[(name, lam)] = (va == 0).mean()
            rows.append([name, len(tp), f"{lam:g}", (tr == 0).mean(), (va == 0).mean(), (te == 0).mean(), (te < 5).mean()])
    say("Depth-1 agreement (draft for x_{t+1} from h_{t-1} and the embedding of x_t) by training data and ridge strength:\n")
    say(table(["training data", "positions", "lambda", "train top-1", "val top-1", "test top-1", "test top-5"], rows))
    best_data, best_lam = max(fits, key=fits.get)
    say(f"\nChosen on val: {best_data}, lambda {best_lam}.\n")

    which, answers_only = recipes[best_data]
    tp = train_positions(seqs, offsets, which, ("own", "doc"), answers_only)
    heads = [emb, Head("embedding, last 2 states", "emb", two=True)] + [Head(f"layer-{l} state of x_t", f"layer{l}") for l in SHALLOW]
    ranks, confs = {}, {}
    rows = []
    for h in heads:
        tpp = tp[tp - 2 >= 0]
        W = ridge(*gram(h.features(D["final"][tpp - 2], D["final"][tpp - 1], D[h.inp][tpp].astype(np.float32)), D["final"][tpp]), best_lam)
        got = {k: head_ranks(h, W, pos[k], D, rows_sl, slot) for k in ("val", "test")}
        ranks[h.name] = {k: v[0] for k, v in got.items()}
        confs[h.name] = {k: v[1] for k, v in got.items()}
        r = ranks[h.name]["test"]
        row = [h.name, h.layers]
        for d in range(DEPTHS):
            for k in (1, 3, 5):
                cond = np.all(r[:, :d] < k, axis=1)
                row.append((r[cond, d] < k).mean() if cond.any() else 0.0)
        rows.append(row)
    hdr = ["head input", "layers"] + [f"d{d + 1} top-{k}" for d in range(DEPTHS) for k in (1, 3, 5)]
    say("Test agreement with the full model's greedy token at depth d (conditional on depths < d being within the same top-k):\n")
    say(table(hdr, rows))
    say()

    # speedup as a chain, alone and beside prompt lookup
    look = {}
    for n in (1, 2, 3, 4):
        for m in (1, 2, 4, 8):
            look[(n, m)] = source_drafts(N, seqs, offsets, split["val"] + split["test"], G,
                                         lambda s, n=n, m=m: lookup_proposals(s.tokens, max(s.start, 2), n, m))
    from specbound_runtime.policy import lookup_continuation

    s0 = seqs[split["test"][0]]
    for t, prop in lookup_proposals(s0.tokens, s0.start, 2, 4).items():  # the incremental form is the runtime's
        assert prop == lookup_continuation(s0.tokens[: t + 1], 2, 4), t
    val = lambda d: replay(d, seqs, offsets, costs, split["val"])[0]
    best_look = max(look, key=lambda k: val(look[k]))
    L0 = look[best_look]

    def head_chain(name, depth, layers):
        d = Drafts.empty(N)
        for k, r in ranks[name].items():
            d.set(pos[k], np.cumprod(r[:, :depth] == 0, axis=1).sum(1), depth, depth, 0, depth * layers)
        return d

    rows = [[f"{n}", *(f"{val(look[(n, m)]):.3f} / {sim(look[(n, m)])[0]:.3f}" for m in (1, 2, 4, 8))] for n in (1, 2, 3, 4)]
    say("Prompt lookup (the runtime's rule) by n-gram and tokens proposed, predicted speedup val / test "
        "(the shipped artifact uses n-gram 3, 1 token):\n")
    say(table(["n-gram", "1 token", "2 tokens", "4 tokens", "8 tokens"], rows))
    rows = []
    say(f"\nChosen on val: n-gram {best_look[0]}, up to {best_look[1]} tokens: "
        f"test speedup {sim(L0)[0]:.3f}x, mean accepted length {sim(L0)[1]:.2f}.\n")
    for h in heads:
        for depth in (1, 2, 3):
            d = head_chain(h.name, depth, h.layers)
            s_alone, m_alone = sim(d)
            s_or, m_or = sim(L0.either(d))
            s_union, m_union = sim(L0 | d)
            rows.append([h.name, depth, s_alone, m_alone, s_or, s_union, m_union])
    say("Predicted test speedup over plain decoding, top-1 chains of the head (lookup: lookup where it proposes, else the head; tree: both branches verified):\n")
    say(table(["head input", "chain depth", "alone", "mean acc. len", "lookup else head", "lookup + head tree", "mean acc. len"], rows))
    say()

    def gated(name, tau, tau2=None):
        """A chain of up to DEPTHS drafts that stops at the first depth whose top-1 probability is
        under tau (EAGLE-2's dynamic depth); with tau2, the depth-1 runner-up too when its
        probability reaches tau2 (a second branch from the same head read)."""
        d = Drafts.empty(N)
        for k in ranks[name]:
            r, c = ranks[name][k], confs[name][k]
            passes = np.cumprod(c[:, :DEPTHS] >= tau, axis=1).astype(bool)
            chain = passes.sum(1)
            acc = np.cumprod((r == 0) & passes, axis=1).sum(1)
            drafted = chain
            if tau2 is not None:
                alt = c[:, DEPTHS] >= tau2
                drafted = drafted + alt
                acc = np.maximum(acc, alt & (r[:, 0] == 1))
            d.set(pos[k], acc, drafted, np.minimum(chain + 1, DEPTHS))
        return d

    taus = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
    rows = []
    for tau in taus:
        d = gated(emb.name, tau)
        has = d.drafted[pos["test"]] > 0
        right = d.accepted[pos["test"]].sum() / max(1, d.drafted[pos["test"]].sum())
        rows.append([tau, has.mean(), d.drafted[pos["test"]].mean(), right, sim(d)[0], sim(L0.either(d))[0]])
    say("Confidence-gated chains (embedding head, up to 3 drafts, stop below a top-1 probability tau), test:\n")
    say(table(["tau", "rounds drafting", "drafts per round", "drafts right", "alone", "lookup else head"], rows))
    grid = [(tau, tau2) for tau in taus for tau2 in (None, 0.05, 0.1, 0.2, 0.3)]
    best_gate = max(grid, key=lambda g: val(L0.either(gated(emb.name, *g))))
    G0 = gated(emb.name, *best_gate)
    say(f"\nBest on val beside lookup: tau {best_gate[0]}, runner-up at depth 1 from probability {best_gate[1]}: "
        f"test {sim(G0)[0]:.3f}x alone, {sim(L0.either(G0))[0]:.3f}x as lookup else head "
        f"(mean accepted length {sim(L0.either(G0))[1]:.2f}).")
    say()

    # -- 2. token trees ------------------------------------------------------------------------
    say("## 2. Token trees from the fitted head\n")
    tree_rows, trees = [], {}
    for name in ("embedding", "embedding, last 2 states"):
        counts = prefix_counts(ranks[name]["val"], DEPTHS)
        for size in (1, 2, 3, 4, 6, 8, 12, 16, 24):
            tree = best_tree(counts, size)
            d = Drafts.empty(N)
            for k in ("val", "test"):
                d.set(pos[k], *tree_drafts(ranks[name][k], tree))
            trees[(name, size)] = d
            s, m = sim(d)
            s_union, m_union = sim(L0 | d)
            tree_rows.append([name, size, tree_text(tree), val(d), s, m, s_union, m_union])
    say("Trees of the most frequent rank paths on val (widths per depth), predicted speedup (val, test) alone and with the lookup chain as one more branch:\n")
    say(table(["head", "nodes", "widths", "val", "test", "mean acc. len", "+ lookup", "mean acc. len"], tree_rows))
    best_tree_key = max(trees, key=lambda k: val(L0 | trees[k]))
    say(f"\nBest on val (with lookup): {best_tree_key[0]}, {best_tree_key[1]} nodes.\n")
    limit = [[k, (k + 1) * costs.plain / costs.verify(k)] for k in (1, 2, 4, 8, 16)]
    say("Limit: every one of k drafts free and right (verification cost alone):\n")
    say(table(["k", "speedup"], limit))
    say()

    # -- 3. draft datastore ------------------------------------------------------------------
    say("## 3. Draft datastore (n-gram continuations of calibration text and own answers)\n")
    train_seqs = [seqs[i].tokens for i, s in enumerate(seqs) if s.split == "train"]
    stores = {mc: Datastore(train_seqs, 4, mc) for mc in (1, 2)}
    ds = {}
    for mc, store in stores.items():
        for min_n in (1, 2, 3):
            for m in (1, 2, 4):
                for share in (0.0, 0.5):
                    ds[(mc, min_n, m, share)] = source_drafts(
                        N, seqs, offsets, split["val"] + split["test"], G,
                        lambda s, a=(min_n, m, share), st=store: {t: st.propose(s.tokens[max(0, t - 7) : t + 1], *a) for t in range(max(s.start, 2), len(s.tokens))})
    best_ds = max(ds, key=lambda k: val(L0 | ds[k]))
    best_ds_alone = max(ds, key=lambda k: val(ds[k]))
    rows = []
    for label, key in (("datastore alone (best on val)", best_ds_alone), ("datastore beside lookup (best on val)", best_ds)):
        mc, min_n, m, share = key
        d = ds[key]
        pr, right, per = acceptance_row(d, pos["test"])
        rows.append([label, f"count>={mc}, n>={min_n}, <= {m} tok, share>={share}", len(stores[mc].table), pr, right, per, sim(d)[0], sim(L0 | d)[0], sim(L0.either(d))[0]])
    pr, right, per = acceptance_row(L0, pos["test"])
    rows.append(["prompt lookup alone", f"n={best_look[0]}, <= {best_look[1]} tok", 0, pr, right, per, sim(L0)[0], sim(L0)[0], sim(L0)[0]])
    say(table(["source", "settings", "table entries", "proposes (share of rounds)", "drafts right", "accepted per proposal",
               "speedup alone", "+ lookup (tree)", "lookup else datastore"], rows))
    say()

    # -- 4. cheap exits (from the calibration report) ------------------------------------------
    say("## 4. Shallow early exits (recorded in the calibration report, no new runs)\n")
    rep = json.loads(args.artifact.with_suffix(".report.json").read_text())
    rows = []
    for lens, plain in zip(rep["calibration"]["lens"]["layers"], rep["calibration"]["plain"]["layers"]):
        l = lens["layer"]
        p = lens["fitted"]["agreement"]
        one = (1 + p) * costs.plain / (costs.verify(1) + l * (costs.base - costs.extra) + costs.check)
        rows.append([l, plain["fitted"]["agreement"], p, l * costs.base / costs.plain, one])
    say("Agreement on calibration held-out positions; cost of reaching the layer as a share of a plain step; "
        "speedup of one such draft per round (its layers reused by verification):\n")
    say(table(["layer", "plain head agreement", "ridge lens agreement", "cost / plain step", "1-draft speedup"], rows))
    say()

    # -- 5. adaptivity -------------------------------------------------------------------------
    say("## 5. Per task (test answers)\n")
    best_head = heads[0].name
    policies = {
        "lookup": L0,
        "datastore": ds[best_ds_alone],
        "lookup + datastore": L0 | ds[best_ds],
        "head chain 2": head_chain(best_head, 2, 0),
        "gated head": G0,
        "lookup else gated head": L0.either(G0),
        "lookup + datastore, else gated head": (L0 | ds[best_ds]).either(G0),
        f"head tree {best_tree_key[1]}": trees[best_tree_key],
        f"lookup + head tree {best_tree_key[1]}": L0 | trees[best_tree_key],
        f"lookup + datastore + head tree {best_tree_key[1]}": L0 | ds[best_ds] | trees[best_tree_key],
    }
    rows = []
    per_task_best = {}
    for pname, d in policies.items():
        row = [pname]
        for t in test_tasks:
            s, m = sim(d, by_task[t])
            row.append(f"{s:.2f}x ({m:.2f})")
            per_task_best[t] = max(per_task_best.get(t, 0), s)
        s, m = sim(d)
        row.append(f"{s:.2f}x ({m:.2f})")
        rows.append(row)
    say("Predicted speedup (mean accepted length) per task:\n")
    say(table(["policy"] + test_tasks + ["overall"], rows))
    tok_task = {t: sum(len(seqs[i].tokens) - seqs[i].start for i in by_task[t]) for t in test_tasks}
    # overall of a per-task choice: time-weighted (tokens / speedup)
    overall = sum(tok_task.values()) / sum(tok_task[t] / per_task_best[t] for t in test_tasks)
    say(f"\nBest policy chosen per task (in hindsight, an upper bound on a per-task policy): overall {overall:.3f}x; "
        f"worst task {min(per_task_best, key=per_task_best.get)} {min(per_task_best.values()):.2f}x.")
    say()

    # -- sensitivity to the cost model ------------------------------------------------------------
    say("## Cost-model sensitivity\n")
    art = json.loads(read_artifact(args.artifact).metadata["cost_model"])
    alt = Costs(art["num_layers"], art["layer_base"], art["layer_extra"], art["head_base"], art["head_extra"], art["check"], art["round_overhead"])
    rows = []
    for pname, d in policies.items():
        rows.append([pname, sim(d)[0], replay(d, seqs, offsets, alt, split["test"])[0]])
    say(f"Test speedup under this study's cost model and under the greedy artifact's own (layer {alt.base:.1f} ms + "
        f"{alt.extra:.1f} per extra position, round {alt.overhead:.0f} ms: each verified draft costs "
        f"{(alt.L * alt.extra + alt.head_extra) / alt.plain:.0%} of a plain step instead of "
        f"{(costs.L * costs.extra + costs.head_extra) / costs.plain:.0%}):\n")
    say(table(["policy", "this cost model", "artifact's cost model"], rows))
    say(f"\n(analysis took {time.perf_counter() - started:.0f} s)")
    (args.out / "tables.md").write_text("\n".join(out) + "\n")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs/directions", help="cache folder (default runs/directions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model runs (default 1)")
    p.add_argument("--bench-per-task", type=int, default=3, help="bench prompts per task, the test set (default 3)")
    p.add_argument("--extra-own", type=int, default=24, help="extra calibration-side prompts to answer for training (default 24)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--documents", type=int, default=64, help="calibration documents to train on (default 64)")
    p.add_argument("--doc-tokens", type=int, default=512, help="tokens kept per calibration document (default 512)")
    p.add_argument("--costs", type=Path, default=COSTS, help="cost model JSON (CostModel fields, ms)")
    p.add_argument("--calibration-run", type=Path, default=CAL_RUN, help="calibration run whose answers/ to train on")
    p.add_argument("--artifact", type=Path, default=ARTIFACT, help="artifact (short list, its cost model; its .report.json: the lens)")
    p.add_argument("--collect-only", action="store_true", help="stop after recording answers and states")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    np.random.seed(args.seed)
    loaded, lm = load_model(args.threads)
    tag = f"s{args.seed}-b{args.bench_per_task}-x{args.extra_own}-n{args.new_tokens}"
    answers = generate_answers(args.out / f"answers-{tag}.json", args, loaded)
    seqs = build_sequences(args, loaded, answers)
    data = record_states(args.out / f"states-{tag}-d{args.documents}x{args.doc_tokens}.npz", seqs, lm)
    if args.collect_only:
        return
    analyse(args, seqs, data, lm)


if __name__ == "__main__":
    main()

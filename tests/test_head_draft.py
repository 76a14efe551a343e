"""The fitted next-token head as a draft source: losslessness at the extremes on token ids (a head
that is always right, always wrong, random, one that drafts EOS), greedy and under sampling; one
head draft per round, only where prompt lookup proposes nothing; the state it reads is the one
verification already computed; the artifact round trip and its refusals.

"Always right" is a head fitted the way calibration fits it (least squares from [norm(h_t); e(x_{t+1})]
to norm(h_{t+1})) on the very trajectories decoded: with fewer positions than features the fit
reproduces every target state, so its argmax is the full model's own next token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clitools import invoke, save_tiny_artifact
from helpers import make_tiny_model_folder
from tiny_models import ARCHITECTURES, greedy_reference, tiny_model

import specbound_runtime.engine as E
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.artifact import load_artifact, read_artifact
from specbound_runtime.engine import generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import ArtifactError, UsageError
from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy, lookup_continuation
from specbound_runtime.sampling import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ([7], [5, 9, 20, 30, 40, 50, 60, 70, 80, 90, 11, 12])
NEW_TOKENS = 40


def fitted_head(lm: HFCausalLM, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares (minimum norm) from [norm(h_t); e(x_{t+1}); 1] to norm(h_{t+1}) over every
    position of `sequences`, through the same layer path as decoding."""
    xs, ys = [], []
    with torch.inference_mode():
        for ids in sequences:
            states, _ = lm.layer_states(list(ids))
            normed = lm.normed(states[-1]).double().numpy()
            emb = lm.embed(list(ids))[0].double().numpy()
            xs.append(np.concatenate([normed[:-1], emb[1:], np.ones((len(ids) - 1, 1))], axis=1))
            ys.append(normed[1:])
    x, y = np.concatenate(xs), np.concatenate(ys)
    _, first = np.unique(np.round(x, 4), axis=0, return_index=True)  # a shared prefix is one position
    x, y = x[np.sort(first)], y[np.sort(first)]
    assert x.shape[0] < x.shape[1]  # fewer positions than features: the fit reproduces every target
    solution = np.linalg.lstsq(x, y, rcond=None)[0]
    return torch.from_numpy(solution[:-1]).float(), torch.from_numpy(solution[-1]).float()


def constant_head(lm: HFCausalLM, token: int, other: int) -> ExitHeadWeights:
    """A head that drafts `token` whatever it reads: W = 0, and a bias that scores `token` above
    `other`, the only other column of its short-list."""
    rows = lm.lm_head_weight.detach().float()
    H = rows.shape[1]
    return ExitHeadWeights(
        shortlist=torch.tensor([token, other]), lens={}, next_head=(torch.zeros(2 * H, H), rows[token] - rows[other])
    )


def head_weights(kind: str, lm: HFCausalLM, refs: dict, eos: int | None = None) -> ExitHeadWeights:
    H = lm.lm_head_weight.shape[1]
    if kind == "right":
        return ExitHeadWeights(None, {}, fitted_head(lm, [list(p) + r for p, r in refs.items()]))
    if kind == "random":
        g = torch.Generator().manual_seed(5)
        return ExitHeadWeights(None, {}, (torch.randn(2 * H, H, generator=g) * 0.3, torch.randn(H, generator=g)))
    if kind == "eos":
        return constant_head(lm, eos, (eos + 1) % lm.vocab_size)
    seen = {t for p, r in refs.items() for t in list(p) + r}
    never = [t for t in range(lm.vocab_size) if t not in seen]
    return constant_head(lm, never[0], never[1])  # "wrong": a token no reference ever holds


def _policies(L: int) -> dict[str, ExitPolicy]:
    checks = tuple(range(1, L))
    return {
        "head-alone": ExitPolicy(L, (), (), (), L, 1, head_draft=True),
        "head-lookup-exits": ExitPolicy(L, checks, (1.0,) * len(checks), (0.3,) * len(checks), L - 1, 4, 1, 3, True),
    }


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    model = tiny_model(request.param)
    lm = HFCausalLM(model)
    refs = {tuple(p): greedy_reference(model, p, NEW_TOKENS, eos_token_id=None) for p in PROMPTS}
    return model, lm, refs


@pytest.mark.parametrize("policy_name", ["head-alone", "head-lookup-exits"])
@pytest.mark.parametrize("kind", ["right", "wrong", "random"])
def test_head_drafts_match_generate(arch, kind, policy_name):
    model, lm0, refs = arch
    lm = HFCausalLM(model, exit_weights=head_weights(kind, lm0, refs))
    policy = _policies(lm.num_layers)[policy_name]
    for prompt in PROMPTS:
        result = generate(lm, list(prompt), NEW_TOKENS, Speculator.for_policy(policy))
        assert list(result.token_ids) == refs[tuple(prompt)]
        drafted, accepted = result.drafted_sources.count("head"), result.accepted_sources.count("head")
        assert drafted > 0
        assert len(result.drafted_sources) == result.drafted and len(result.accepted_sources) == result.accepted
        assert drafted <= result.verify_passes - 1  # at most one head draft a round, none at the prefill
        if kind == "right":
            assert accepted == drafted
        if kind == "wrong":
            assert accepted == 0
        if policy_name == "head-alone":
            assert set(result.drafted_sources) == {"head"}


def test_a_head_that_drafts_eos_stops_drafting_and_generation_like_generate(arch):
    model, lm0, refs = arch
    prompt = list(PROMPTS[1])
    full = refs[tuple(prompt)]
    eos = next(t for i, t in enumerate(full) if i >= 4 and t not in full[:i])  # first emitted some rounds in
    ref = greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=eos)
    assert ref[-1] == eos and len(ref) >= 5
    lm = HFCausalLM(model, exit_weights=head_weights("eos", lm0, refs, eos))
    L = lm.num_layers
    # early exit would draft at every check (threshold 0): after an EOS draft nothing is drafted
    policy = ExitPolicy(L, tuple(range(1, L)), (1.0,) * (L - 1), (0.0,) * (L - 1), L - 1, 4, head_draft=True)
    result = generate(lm, prompt, NEW_TOKENS, Speculator.for_policy(policy, frozenset({eos})), eos_token_ids=[eos])
    assert list(result.token_ids) == ref
    assert result.drafted > 0 and set(result.drafted_sources) == {"head"}


def test_one_head_draft_a_round_only_where_lookup_proposes_nothing(monkeypatch):
    model = tiny_model("llama")
    lm0 = HFCausalLM(model)
    prompt = [5, 9, 5, 9, 5, 20, 30, 5, 9]  # "5 9" recurs: lookup proposes in some rounds
    ref = greedy_reference(model, prompt, NEW_TOKENS, eos_token_id=None)
    lm = HFCausalLM(model, exit_weights=head_weights("random", lm0, {tuple(prompt): ref}))
    policy = ExitPolicy(6, (2, 4), (1.0, 1.0), (0.2, 0.2), 4, 4, lookup_ngram=1, lookup_max=2, head_draft=True)
    calls = []
    original = E.DecodeState.next_token_draft

    def recording(seq):
        calls.append((len(seq.drafts), lookup_continuation(seq.tokens, 1, 2)))
        return original(seq)

    monkeypatch.setattr(E.DecodeState, "next_token_draft", recording)
    result = generate(lm, prompt, NEW_TOKENS, Speculator.for_policy(policy))
    assert list(result.token_ids) == ref
    assert calls and all(drafts == 0 and found == [] for drafts, found in calls)
    assert len(calls) == result.drafted_sources.count("head")
    assert result.verify_passes - 1 > len(calls)  # lookup proposed in the other rounds
    assert {"lookup", "head", "early-exit"} <= set(result.drafted_sources)


def test_the_head_reads_the_verified_state_of_the_token_just_chosen_and_runs_nothing_again():
    """The state the head reads is the final state that predicted the frontier token (its own
    logits choose that token), and the embedding is that token's; every (layer, position) is
    computed once and the LM head runs once a round, as without the head."""
    model = tiny_model("llama")
    lm0 = HFCausalLM(model)
    prompt = [5, 6, 7]
    ref = greedy_reference(model, prompt, 20, eos_token_id=None)
    weights = head_weights("wrong", lm0, {tuple(prompt): ref})  # always rejected: the kept row must move back
    seen, layers, heads = [], [], []

    class Recording(HFCausalLM):
        def next_token_draft(self, final_hidden, embedded):
            chosen = int(self.final_logits(final_hidden).argmax())
            seen.append(torch.equal(embedded, self.embed([chosen])))
            return super().next_token_draft(final_hidden, embedded)

        def run_layer(self, layer, hidden, start, cache):
            layers.extend((layer, start + i) for i in range(hidden.shape[1]))
            return super().run_layer(layer, hidden, start, cache)

        def final_logits(self, hidden):
            heads.append(hidden.shape[1])
            return super().final_logits(hidden)

    lm = Recording(model, exit_weights=weights)
    result = generate(lm, prompt, 20, Speculator.for_policy(ExitPolicy(6, (), (), (), 6, 1, head_draft=True)))
    assert list(result.token_ids) == ref
    assert seen and all(seen)
    # every rejected head draft costs one position through every layer, nothing else is redone
    verified = [(l, p) for l, p in layers]
    assert result.accepted == 0 and len(verified) == 6 * (len(prompt) + len(ref) - 1 + result.drafted)
    assert len(heads) - len(seen) == result.verify_passes  # LM-head calls beyond the probes: one a round


def test_a_policy_with_the_head_needs_a_head():
    model = tiny_model("llama")
    from specbound_runtime.api import SpecBound

    with pytest.raises(UsageError, match="next-token head"):
        SpecBound(model, None, ExitPolicy(6, (), (), (), 6, 1, head_draft=True), None)
    with pytest.raises(ValueError, match="next-token head"):
        generate(HFCausalLM(model), [5, 6], 4, Speculator.for_policy(ExitPolicy(6, (), (), (), 6, 1, head_draft=True)))


# -- sampling ------------------------------------------------------------------------------------


def test_sampled_with_the_head_follow_the_exact_distribution():
    from scipy.stats import chisquare  # noqa: F401  (the helpers below use it)

    from test_sampling_e2e import ALPHA, EOS, LENGTH, PROMPT, chi_square_pvalue, exact_distribution, generate_processors

    model = tiny_model("llama", seed=1, vocab_size=16)
    lm0 = HFCausalLM(model)
    processors = generate_processors(model, temperature=1.5, top_k=3)
    exact = exact_distribution(model, processors)
    # fitted on every continuation the model can sample: the head drafts the full model's argmax,
    # which sampling accepts with probability p(argmax) < 1, so both paths run
    weights = ExitHeadWeights(None, {}, fitted_head(lm0, [PROMPT + list(s) for s in exact if len(s) == LENGTH]))
    lm = HFCausalLM(model, exit_weights=weights)
    policy = ExitPolicy(6, (3,), (1.0,), (0.0,), 3, 3, head_draft=True)
    g = torch.Generator().manual_seed(3)
    samples, drafted, accepted = [], 0, 0
    for _ in range(600):
        r = generate(lm, PROMPT, LENGTH, Speculator.for_policy(policy), [EOS], logits_processor=processors, sampler=Sampler(g))
        samples.append(tuple(r.token_ids))
        drafted += r.drafted_sources.count("head")
        accepted += r.accepted_sources.count("head")
    assert drafted > 0 and 0.1 < accepted / drafted < 0.9
    assert chi_square_pvalue(exact, samples) >= ALPHA


# -- the artifact ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny Llama folder (hidden 32, vocab 64), loaded."""
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny-head") / "model", num_layers=4, seed=0)
    return folder, resolve_model(str(folder))


def _head(H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * H, H, generator=g) * 0.1, torch.randn(H, generator=g) * 0.1


def _saved(loaded, path, head_draft=True, next_head="fit"):
    policy = ExitPolicy(4, (2,), (1.0,), (0.9,), 2, 3, 2, 3, head_draft)
    weights = ExitHeadWeights(torch.arange(0, 64, 2), {}, _head() if next_head == "fit" else next_head)
    return save_tiny_artifact(loaded, path, policy=policy, exit_weights=weights)


def test_the_head_survives_the_artifact_round_trip_and_decodes_exactly(tiny, tmp_path):
    import specbound_runtime as sb

    folder, loaded = tiny
    path = _saved(loaded, tmp_path / "head.safetensors")
    art = load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    w, b = _head()
    assert art.policy.head_draft is True
    assert torch.equal(art.exit_weights.next_head[0], w) and torch.equal(art.exit_weights.next_head[1], b)
    m = sb.load(str(folder), artifact=path)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = m.generate_with_stats(ids, max_new_tokens=12, do_sample=False)
    assert "head" in out.stats.drafted_sources
    assert torch.equal(out.sequences, m.model.generate(ids, max_new_tokens=12, do_sample=False))
    text = invoke("inspect", path).output
    assert "next-token head" in text and "head draft: on" in text


def test_an_artifact_without_the_head_reads_as_before(tiny, tmp_path):
    _, loaded = tiny
    path = _saved(loaded, tmp_path / "plain.safetensors", head_draft=False, next_head=None)
    from specbound_runtime.artifact import _read

    metadata, tensors = _read(path)
    assert not any(name.startswith(("next_head", "policy.head_draft")) for name in tensors)
    art = read_artifact(path)
    assert art.policy.head_draft is False and art.exit_weights.next_head is None


def _edit(name, value):
    def edit(t, m):
        if value is None:
            t.pop(name)
        else:
            t[name] = value

    return edit


def _poison(t, m):
    w = t["next_head.weight"].clone()
    w[3, 4] = float("nan")
    t["next_head.weight"] = w


HEAD_CONTENT = {
    "head-draft-without-head": (lambda t, m: (t.pop("next_head.weight"), t.pop("next_head.bias")), "the artifact holds none"),
    "head-bias-missing": (_edit("next_head.bias", None), "required tensor 'next_head.bias' is missing"),
    "head-weight-square": (_edit("next_head.weight", torch.zeros(32, 32)), "next-token head must be W [2H, H]"),
    "head-weight-1d": (_edit("next_head.weight", torch.zeros(64)), "'next_head.weight' must be 2-D"),
    "head-bias-too-long": (_edit("next_head.bias", torch.zeros(33)), "next-token head must be W [2H, H]"),
    "head-weight-as-ints": (_edit("next_head.weight", torch.zeros(64, 32, dtype=torch.int64)), "must hold floats"),
    "nan-in-head-weight": (_poison, "'next_head.weight' contains NaN or Inf"),
    "head-draft-two": (_edit("policy.head_draft", torch.tensor([2])), "policy.head_draft must hold one value, 0 or 1"),
    "head-draft-two-values": (_edit("policy.head_draft", torch.tensor([1, 1])), "policy.head_draft must hold one value"),
    "head-draft-as-float": (_edit("policy.head_draft", torch.tensor([1.0], dtype=torch.float64)), "must hold integers"),
}


@pytest.mark.parametrize("case", list(HEAD_CONTENT))
def test_an_artifact_with_a_broken_head_is_refused(case, tiny, tmp_path):
    from test_errors import refused, rewrite

    _, loaded = tiny
    path = _saved(loaded, tmp_path / "a.safetensors")
    edit, fragment = HEAD_CONTENT[case]
    rewrite(path, edit)
    refused(path, loaded, fragment)


def test_a_head_narrower_than_the_model_is_refused_on_load(tiny, tmp_path):
    _, loaded = tiny
    path = _saved(loaded, tmp_path / "narrow.safetensors", next_head=_head(H=16))
    read_artifact(path)  # sound on its own, but not for this model
    with pytest.raises(ArtifactError, match="next-token head is 16-wide, the model's hidden size is 32"):
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)


def test_saving_a_policy_with_the_head_but_no_head_is_refused(tiny, tmp_path):
    _, loaded = tiny
    with pytest.raises(ArtifactError, match="would hold none"):
        _saved(loaded, tmp_path / "x.safetensors", next_head=None)
    assert not (tmp_path / "x.safetensors").exists()

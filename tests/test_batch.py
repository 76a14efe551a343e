"""Batches: every row of a shared-pass batch is answered as its prompt alone would be.

Tiny models built in-process. Drafters that are always right, always wrong and random, on
batches of different prompt lengths (so rows are padded to the longest and sit at different
positions), rows ending early on EOS or on a stopping criterion, the generation config's
processors per row (a row-indexed prefix_allowed_tokens_fn gets the row's own index), sampling's
distribution per row, finished rows leaving the pass, and the API's left-padding rules."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import specbound_runtime as sb
from clitools import assert_one_error, invoke, save_tiny_artifact
from helpers import make_tiny_model_folder
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.batch import BatchKVCache, PassPrices, batch_draft_width, generate_batch
from specbound_runtime.drafters import Speculator
from specbound_runtime.engine import NoDrafter
from specbound_runtime.errors import InputError, UsageError
from specbound_runtime.kernels import Kernels
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy
from specbound_runtime.sampling import Sampler
from test_sampling_e2e import ALPHA, EOS as EOS16, chi_square_pvalue, exact_distribution, generate_processors
from tiny_models import EOS, greedy_reference, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedRows:
    """Drafts each row's known continuation (generate() alone), right with probability
    right_rate, else a wrong token: 1 always right, 0 always wrong, between random."""

    def __init__(self, continuations, right_rate: float, width: int, seed: int):
        self.continuations, self.right_rate, self.w_max = continuations, right_rate, width
        self.rng = random.Random(seed)

    def draft(self, row, budget: int) -> None:
        cont = self.continuations[row.index]
        for _ in range(min(budget, self.w_max)):
            i = len(row.tokens) - len(row.prompt) + len(row.drafts)
            if i >= len(cont):
                return
            token = cont[i]
            if self.rng.random() >= self.right_rate:
                token = (token + 1 + self.rng.randrange(50)) % row.lm.vocab_size
            row.push_draft(token, 0, None, "lookup")

    def observe(self, acceptance) -> None:
        pass


def _prompts(seed: int, rows: int, vocab: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 14))] for _ in range(rows)]


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "gemma3"])
@pytest.mark.parametrize("kernels", ["eager", "onednn"])
def test_rows_equal_generate_alone_with_drafters_right_wrong_and_random(arch, kernels):
    model = tiny_model(arch)
    lm = HFCausalLM(model, kernels=Kernels(model, kernels))
    prompts = _prompts(1, 5)
    alone = [greedy_reference(model, p, 24) for p in prompts]
    for rate in (1.0, 0.0, 0.6):
        result = generate_batch(lm, prompts, 24, lambda: ScriptedRows(alone, rate, 4, 3), (EOS,), adaptive=False)
        assert [list(r.token_ids) for r in result.rows] == alone, (arch, kernels, rate)
        assert all(r.fallbacks == 0 for r in result.rows)
        accepted = sum(r.accepted for r in result.rows)
        assert (accepted == 0) == (rate == 0.0)  # a wrong draft is never kept, a right one is
        if rate == 1.0:  # always right: five tokens a pass, so far fewer passes than tokens
            assert result.verify_passes < 24 // 2


def test_a_row_ending_on_eos_leaves_the_pass_and_the_others_go_on():
    model = tiny_model("llama")
    lm = HFCausalLM(model)
    prompts = _prompts(2, 6)
    alone = [greedy_reference(model, p, 30) for p in prompts]
    # make the row that ends first end on an EOS drafted and accepted: end it there in the script
    lengths = [len(a) for a in alone]
    result = generate_batch(lm, prompts, 30, lambda: ScriptedRows(alone, 0.7, 3, 5), (EOS,))  # the clock decides
    assert [list(r.token_ids) for r in result.rows] == alone
    if min(lengths) < 30:  # some row ended on EOS before the limit: the pass shrank
        assert min(result.pass_rows) < len(prompts)
    ended = [r for r in result.rows if r.new_tokens < 30]
    assert all(r.token_ids[-1] == EOS for r in ended)


def test_rows_that_end_on_eos_shrink_the_pass():
    """A model forced to EOS on some rows (a prefix rule): those rows stop after a few tokens and
    the remaining passes run fewer rows."""
    model = tiny_model("llama")
    lm = HFCausalLM(model)
    prompts = _prompts(3, 4)

    class EndRowsEarly:  # a processor: rows whose prompt starts with an even token get EOS after 3 new tokens
        def __call__(self, ids, scores):
            n = ids.shape[1]
            for prompt in prompts:
                if prompt[0] % 2 == 0 and n == len(prompt) + 3 and ids[0, : len(prompt)].tolist() == prompt:
                    scores = torch.full_like(scores, -1e9)
                    scores[:, EOS] = 0
            return scores

    result = generate_batch(lm, prompts, 20, NoDrafter, (EOS,), logits_processor=EndRowsEarly())
    early = [i for i, p in enumerate(prompts) if p[0] % 2 == 0]
    assert early and len(early) < len(prompts)
    for i, r in enumerate(result.rows):
        assert (r.new_tokens == 4) == (i in early)
    # every pass after the prefill runs exactly the rows still decoding: a finished row costs nothing
    assert sum(result.pass_rows) == sum(len(r.accept_lengths) - 1 for r in result.rows)
    assert result.pass_rows[-1] < len(prompts) and max(result.pass_rows) > min(result.pass_rows)


def test_cache_keeps_each_row_at_its_own_positions_and_drops_finished_rows():
    cache = BatchKVCache(num_layers=1, rows=3, max_length=8)
    cache.begin([0, 2, 5], 2)
    k = torch.arange(3 * 2, dtype=torch.float).view(3, 1, 2, 1)
    keys, _ = cache.update(k, k, 0)
    assert keys.shape == (3, 1, 7, 1)
    assert keys[1, 0, 2:4, 0].tolist() == [2.0, 3.0] and keys[2, 0, 5:7, 0].tolist() == [4.0, 5.0]
    assert keys[0, 0, 2:, 0].abs().sum() == 0  # never written: zeros, never NaN
    cache.keep([2])
    assert cache._keys[0].shape[0] == 1 and cache._keys[0][0, 0, 5:7, 0].tolist() == [4.0, 5.0]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.begin([7], 2)


# -- through the API and generate() -------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    path = make_tiny_model_folder(root / "model", num_layers=4, seed=3)
    loaded = resolve_model(str(path))
    policy = ExitPolicy(4, (), (), (), d_max=3, w_max=4, lookup_ngram=2, lookup_max=3, lookup_min=1)
    # a pass over up to 16 positions costs one over 1: drafts pay at these batch sizes
    cost = {"num_layers": 4, "layer_base": 1.0, "layer_extra": 0.1, "head_base": 1.0, "head_extra": 0.1, "layer_widths": [1.0] * 16, "head_widths": [1.0] * 16}
    artifact = save_tiny_artifact(loaded, root / "lookup.safetensors", policy=policy, metadata={"cost_model": json.dumps(cost)})
    return path, artifact


def _left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _alone(model, prompt, **kwargs):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def test_api_batch_matches_each_prompt_alone_and_pads_like_generate(folder):
    path, artifact = folder
    m = sb.load(str(path), artifact=artifact)
    vocab = m.lm.vocab_size
    prompts = [[1, 9, 10, 11, 9, 10], [1, 7], [1, 20, 21, 22, 20, 21, 22, 20, 21], [1, 5, 6, 5]]
    prompts = [[t % vocab for t in p] for p in prompts]
    ids, mask = _left_padded(prompts)
    out = m.generate_with_stats(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=0)
    assert out.sequences[:, : ids.shape[1]].tolist() == ids.tolist()
    stats = out.stats
    assert stats.drafted > 0  # prompt lookup drafted on some row
    for b, p in enumerate(prompts):
        alone = _alone(m.model, p, max_new_tokens=20, eos_token_id=EOS, pad_token_id=0)
        row = out.sequences[b, ids.shape[1]:].tolist()
        assert row[: len(alone)] == alone
        assert all(t == 0 for t in row[len(alone):])  # a finished row is padded as generate() pads it
        assert list(stats.rows[b].token_ids) == alone
    # and through the model's own generate(), with the same batch
    via = m.model.generate(ids, attention_mask=mask, custom_generate=m.custom_generate, max_new_tokens=20, eos_token_id=EOS, pad_token_id=0)
    assert via.tolist() == out.sequences.tolist()


def test_right_padding_and_streaming_a_batch_are_refused(folder):
    path, artifact = folder
    m = sb.load(str(path), artifact=artifact)
    ids = torch.tensor([[1, 9, 10, 0], [1, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(UsageError, match="left"):
        m.generate(ids, attention_mask=mask, max_new_tokens=4)
    with pytest.raises(UsageError, match="stream"):
        m.generate_with_stats(torch.tensor([[1, 9], [1, 7]]), on_tokens=lambda new: None, max_new_tokens=4)


def test_processors_and_stopping_criteria_apply_per_row_as_alone(folder):
    """A repetition penalty, a prefix_allowed_tokens_fn that reads the row index (each row gets
    its own index, as its own alone run does with that index), and a stopping criterion that
    fires on a token: every row equals generate() alone with the same settings."""
    path, _ = folder
    m = sb.load(str(path))
    lookup = sb.load(str(path)).with_policy(ExitPolicy(4, (), (), (), d_max=3, w_max=3, lookup_ngram=1, lookup_max=3))
    prompts = [[1, 9, 10, 11, 9, 10], [1, 7, 8], [1, 20, 21, 22, 20, 21], [1, 5, 6, 5, 6]]
    ids, mask = _left_padded(prompts)

    def allowed(batch_id, sent):  # row b may only use tokens that are b mod 3 ... or EOS
        return [t for t in range(m.lm.vocab_size) if t % 3 == batch_id % 3 or t == EOS]

    class StopAfter(StoppingCriteria):  # fires when the last token is 15 or 18
        def __call__(self, input_ids, scores, **kwargs):
            return torch.isin(input_ids[:, -1], torch.tensor([15, 18]))

    settings = dict(max_new_tokens=16, eos_token_id=EOS, pad_token_id=0, repetition_penalty=1.3)
    out = lookup.generate_with_stats(
        ids, attention_mask=mask, prefix_allowed_tokens_fn=allowed, stopping_criteria=StoppingCriteriaList([StopAfter()]), **settings
    )
    stopped = 0
    for b, p in enumerate(prompts):
        alone = _alone(
            m.model, p, prefix_allowed_tokens_fn=lambda _i, sent, b=b: allowed(b, sent),
            stopping_criteria=StoppingCriteriaList([StopAfter()]), **settings,
        )
        assert list(out.stats.rows[b].token_ids) == alone, b
        assert all(t % 3 == b % 3 or t == EOS for t in alone)
        stopped += len(alone) < 16
    assert stopped > 0  # the criterion ended some row early


def test_sampled_rows_follow_each_prompts_exact_distribution():
    """Two rows of different prompts sampled together, many times: each row's continuations
    against the exact distribution of its own prompt alone (chi-square, as test_sampling_e2e)."""
    model = tiny_model("llama", seed=1, vocab_size=16)
    processors = generate_processors(model, temperature=1.5, top_k=3)
    prompts = [[5, 9, 5, 9], [7, 2, 7]]
    exact = [exact_distribution(model, processors, prompt=p) for p in prompts]
    policy = ExitPolicy(6, (), (), (), d_max=3, w_max=3, lookup_ngram=1, lookup_max=2)
    lm = HFCausalLM(model)
    g = torch.Generator().manual_seed(0)
    samples: list[list[tuple]] = [[], []]
    drafted = accepted = 0
    for _ in range(600):
        r = generate_batch(
            lm, prompts, 4, lambda: Speculator.for_batch(policy, frozenset({EOS16})), [EOS16],
            logits_processor=processors, sampler=Sampler(g), adaptive=False,
        )
        for b in range(2):
            samples[b].append(tuple(r.rows[b].token_ids))
        drafted, accepted = drafted + r.drafted, accepted + r.accepted
    assert drafted > 0 and 0.1 < accepted / drafted < 0.95
    for b in range(2):
        assert chi_square_pvalue(exact[b], samples[b]) >= ALPHA


def test_batch_draft_width_shrinks_as_the_batch_grows_and_turns_off():
    """Priced by rows times positions: where positions are nearly free up to a knee (a pass over
    1-8 positions costs about one over 1) and then cost in proportion, a row's bound shrinks as
    the batch grows and is 0 where the batch alone passes the knee."""
    flat_then_linear = PassPrices(num_layers=1, layer_widths=(10.0,) * 8, head_widths=(0.0,), layer=(10.0, 10 / 8), head=(0.0, 0.0))
    widths = [batch_draft_width(7, flat_then_linear, rows) for rows in (1, 2, 4, 8, 16, 64)]
    assert widths[0] == 7 and widths[1] == 3 and widths[2] == 1  # 2 x 4 and 4 x 2 positions stay within the knee
    assert widths == sorted(widths, reverse=True) and widths[-1] == 0
    # where every position costs the same (no knee), one draft a row costs as much at any batch size
    # as at one row: the bound keeps the width whose price the policy accepted
    linear = PassPrices(num_layers=1, layer_widths=(), head_widths=(), layer=(1.0, 1.0), head=(0.0, 0.0))
    assert batch_draft_width(3, linear, 4) == 3
    assert batch_draft_width(3, None, 4) == 0 and batch_draft_width(3, None, 1) == 3


def test_a_batch_too_big_for_memory_is_refused_before_it_starts(folder):
    from specbound_runtime.decoder import check_batch_memory

    path, _ = folder
    m = sb.load(str(path))
    check_batch_memory(m.lm, 4, 64)  # fits
    with pytest.raises(InputError, match="smaller --batch-size"):
        check_batch_memory(m.lm, 10**7, 10**4)


def test_decode_cli_batch_gives_each_prompt_its_alone_tokens(folder, tmp_path):
    path, artifact = folder
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["one two one two", "three", "four five four five four", "six", "seven seven"]))
    common = ["decode", "--model", str(path), "--artifact", str(artifact), "--prompt-file", str(prompts), "--no-chat", "-n", "12", "--json"]
    alone = invoke(*common)
    batched = invoke(*common, "--batch-size", "3", "--check-exact")
    assert alone.exit_code == 0 and batched.exit_code == 0, batched.stderr
    a = [json.loads(line) for line in alone.stdout.splitlines()]
    b = [json.loads(line) for line in batched.stdout.splitlines()]
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert all(r["exact"] for r in b) and [r["batch"]["rows"] for r in b] == [3, 3, 3, 2, 2]
    assert batched.stderr.count("tok/s | row latency") == 2 and "peak memory" in batched.stderr
    assert_one_error(invoke(*common, "--batch-size", "0"), 2, "--batch-size must be >= 1")


@pytest.mark.parametrize("kind", ["right", "wrong"])
def test_the_fitted_head_drafts_per_row_from_each_rows_verified_state(kind):
    """The next-token head in a batch reads each row's own verified state: a head fitted to the
    rows' answers is always accepted, one that drafts a token no answer holds never is, and every
    row equals generate() alone."""
    from test_head_draft import NEW_TOKENS, PROMPTS, head_weights

    model = tiny_model("llama")
    refs = {tuple(p): greedy_reference(model, p, NEW_TOKENS, eos_token_id=None) for p in PROMPTS}
    lm = HFCausalLM(model, exit_weights=head_weights(kind, HFCausalLM(model), refs))
    policy = ExitPolicy(lm.num_layers, (), (), (), lm.num_layers, 1, head_draft=True)
    prompts = [list(p) for p in PROMPTS]
    result = generate_batch(lm, prompts, NEW_TOKENS, lambda: Speculator.for_batch(policy), (), adaptive=False)
    for p, r in zip(prompts, result.rows):
        assert list(r.token_ids) == refs[tuple(p)]
        assert r.drafted_sources and set(r.drafted_sources) == {"head"}
        assert r.accepted == (r.drafted if kind == "right" else 0)


def test_one_left_padded_row_with_a_repetition_penalty_is_decoded_as_its_prompt_alone(folder):
    path, artifact = folder
    m = sb.load(str(path), artifact=artifact)
    prompt = [1, 58, 28, 52, 60, 30]  # a prompt whose answer changes when 3 of its tokens go unpenalized
    ids, mask = _left_padded([prompt, [1] * 9])
    settings = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=0, repetition_penalty=1.5)
    out = m.generate(ids[:1], attention_mask=mask[:1], **settings)
    assert out[0, ids.shape[1]:].tolist() == _alone(m.model, prompt, **settings)


def test_a_round_is_as_wide_as_pays_for_the_drafts_the_rows_proposed():
    from specbound_runtime.batch import round_width

    knee = PassPrices(num_layers=1, layer_widths=(10.0,) * 8, head_widths=(0.0,), layer=(10.0, 10 / 8), head=(0.0, 0.0))
    assert round_width([3, 3], 0.9, knee) == 4  # 2 x 4 positions cost one position: keep every draft
    assert round_width([5, 0, 0, 0, 0, 0, 0, 0], 0.9, knee) == 1  # one row's drafts would double eight rows' pass
    assert round_width([5] * 4, 0.9, knee) == 2  # 4 x 2 positions still cost one; 4 x 3 cost more than they give
    assert round_width([5] * 4, 0.05, knee) == 2  # under the knee even drafts rarely right are free
    assert round_width([5] * 8, 0.9, knee) == 1  # past it, a second position doubles the price for 1.9x the tokens
    assert round_width([2, 4], 0.5, None) == 5 and round_width([0, 0], 0.5, knee) == 1


def test_the_round_clock_drafts_only_where_drafting_rounds_cost_less_per_token():
    from specbound_runtime.batch import RoundClock

    def run(spec_cost: float, plain_cost: float, rounds: int = 60) -> list[bool]:
        clock, kinds = RoundClock(), []
        for _ in range(rounds):
            drafted = clock.drafts_next()
            kinds.append(drafted)
            clock.record(drafted, spec_cost if drafted else plain_cost, 1)
        return kinds

    slow_drafts = run(1.2, 1.0, rounds=6 + 12 + 24 + 48)
    assert slow_drafts[:6].count(True) == 3  # both kinds measured first
    assert slow_drafts[6:].count(True) == 3  # then only probes, each further apart: after 12, 24 and 48 rounds
    cheap_drafts = run(0.7, 1.0, rounds=6 + 12 + 24 + 48)
    assert cheap_drafts[6:].count(False) == 3



def test_a_row_whose_logits_go_non_finite_redoes_its_step_without_drafts_and_stays_exact():
    """Non-finite logits in one verification (injected once into the LM head's output): the rows
    whose decision rested on them emit nothing from it, redo the step without drafts, and every
    row still equals generate() alone."""
    model = tiny_model("llama")
    prompts = _prompts(4, 3)
    alone = [greedy_reference(model, p, 16) for p in prompts]
    lm = HFCausalLM(model)
    calls = {"n": 0}

    def poison_third_call(module, args, output):
        calls["n"] += 1
        return output.fill_(float("nan")) if calls["n"] == 3 else output

    handle = model.lm_head.register_forward_hook(poison_third_call)
    try:
        result = generate_batch(lm, prompts, 16, lambda: ScriptedRows(alone, 1.0, 3, 0), (EOS,), adaptive=False)
    finally:
        handle.remove()
    assert [list(r.token_ids) for r in result.rows] == alone
    assert sum(r.fallbacks for r in result.rows) == len(prompts)
    # drafts always right, 3 a round: every pass but the prefill, the redone step and the last
    # emits 4 tokens; the redone step ran without drafts and emitted 1
    for r in result.rows:
        assert list(r.accept_lengths[:3]) == [1, 4, 1], r.accept_lengths

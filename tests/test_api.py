"""The Python API: sb.load, m.generate, m.custom_generate inside transformers' generate(),
streaming, devices and dtypes on CPU, and how often the loop reads from the device."""

from __future__ import annotations

import io
import threading
from contextlib import redirect_stdout

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer

import specbound_runtime as sb
from clitools import save_tiny_artifact
from helpers import make_tiny_model_folder
from specbound_runtime.host import HostReadCounter
from specbound_runtime.errors import ArtifactError, ModelError, SpecBoundError, UsageError
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [[1, 9, 10, 11, 12, 13, 9, 10, 11]]  # "9 10 11" recurs: prompt lookup has work to do
DRAFTING = ExitPolicy(4, (1, 2, 3), (1.0,) * 3, (0.0,) * 3, d_max=3, w_max=4, lookup_ngram=2, lookup_max=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder = make_tiny_model_folder(root / "model", num_layers=4, seed=3)
    loaded = resolve_model(str(folder))
    artifact = save_tiny_artifact(loaded, root / "drafting.safetensors", policy=DRAFTING)
    return folder, loaded, artifact


def _reference(model, ids, **kwargs):
    with torch.inference_mode():
        return model.generate(torch.tensor(ids), do_sample=False, **kwargs)


def test_load_by_path_with_artifact_generates_what_generate_does(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    assert m.calibrated and m.policy == DRAFTING
    ref = _reference(m.model, PROMPT, max_new_tokens=24)
    out = m.generate(torch.tensor(PROMPT), max_new_tokens=24, do_sample=False)
    assert out.dtype == torch.long and out.shape == ref.shape and torch.equal(out, ref)
    run = m.generate_with_stats(torch.tensor(PROMPT), max_new_tokens=24, do_sample=False)
    assert torch.equal(run.sequences, ref)
    stats = run.stats
    assert stats.drafted > 0 and stats.accepted > 0  # speculation happened and paid somewhere
    assert sum(stats.accept_lengths) == stats.new_tokens == 24
    assert stats.verify_passes < 24 and stats.wall_time_s > 0
    assert set(stats.exit_layers) <= {0, 1, 2, 3}


def test_load_an_already_loaded_model_and_its_tokenizer(tiny):
    folder, loaded, artifact = tiny
    attributes = {k: id(v) for k, v in vars(loaded.model).items()}
    config = loaded.model.config.to_dict()
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer, artifact=artifact)
    assert m.model is loaded.model and m.tokenizer is loaded.tokenizer
    assert torch.equal(m.generate(torch.tensor(PROMPT), max_new_tokens=16), _reference(loaded.model, PROMPT, max_new_tokens=16))
    # nothing stashed on the model or its config
    assert {k: id(v) for k, v in vars(loaded.model).items()} == attributes
    assert loaded.model.config.to_dict() == config


def test_load_refuses_bad_input_with_library_errors(tiny, tmp_path):
    folder, loaded, artifact = tiny
    other = resolve_model(str(make_tiny_model_folder(tmp_path / "other", num_layers=4, seed=9)))
    with pytest.raises(ArtifactError, match="fitted for a model with other weights") as info:
        sb.load(other.model, tokenizer=other.tokenizer, artifact=artifact)
    assert "--" not in str(info.value)  # library messages name no CLI flags
    with pytest.raises(ModelError, match="no such file"):
        sb.load(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="device and dtype"):
        sb.load(loaded.model, tokenizer=loaded.tokenizer, dtype="bfloat16")
    with pytest.raises(ModelError, match="unknown dtype"):
        sb.load(str(folder), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            sb.load(str(folder), device="cuda")
    assert issubclass(ArtifactError, SpecBoundError) and issubclass(UsageError, SpecBoundError)


def test_an_unpadded_batch_gives_every_row_the_alone_output_and_odd_shapes_are_refused(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer, artifact=artifact)
    alone = _reference(loaded.model, PROMPT, max_new_tokens=12)
    assert m.generate(torch.tensor(PROMPT * 2), max_new_tokens=12).tolist() == alone.tolist() * 2
    via = loaded.model.generate(torch.tensor(PROMPT * 2), custom_generate=m.custom_generate, max_new_tokens=12)
    assert via.tolist() == alone.tolist() * 2
    with pytest.raises(UsageError, match=r"\[batch, length\]"):
        m.generate(torch.tensor([PROMPT]), max_new_tokens=4)


def test_custom_generate_returns_exactly_what_generate_returns(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer, artifact=artifact)
    model = loaded.model
    saved = model.generation_config
    try:
        for extra in ({}, {"repetition_penalty": 1.4, "no_repeat_ngram_size": 3}):
            model.generation_config = saved.__class__.from_dict({**saved.to_dict(), **extra})
            for n in (1, 7, 30):
                ref = _reference(model, PROMPT, max_new_tokens=n)
                with torch.inference_mode():
                    out = model.generate(
                        torch.tensor(PROMPT), custom_generate=m.custom_generate, max_new_tokens=n,
                        do_sample=False, return_dict_in_generate=True,
                    )
                assert torch.equal(out.sequences, ref), (extra, n)
                assert list(out.specbound_stats.token_ids) == ref[0, len(PROMPT[0]) :].tolist()
    finally:
        model.generation_config = saved


def test_a_run_returns_its_statistics_and_the_old_list_still_works_with_a_warning(tiny):
    """return_dict_in_generate=True returns the sequences and the run's statistics, through
    transformers and through SpecBound's own generate(); specbound_stats=[] keeps working for a
    release, with a FutureWarning; the outputs transformers cannot give here are refused."""
    import warnings

    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    ids = torch.tensor(PROMPT)
    ref = _reference(loaded.model, PROMPT, max_new_tokens=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new way warns of nothing
        out = m.model.generate(ids, custom_generate=m.custom_generate, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        own = m.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    for run in (out, own):
        assert torch.equal(run.sequences, ref) and run["sequences"] is run.sequences
        assert list(run.specbound_stats.token_ids) == ref[0, len(PROMPT[0]) :].tolist() and sum(run.specbound_stats.accept_lengths) == 12
    assert torch.equal(m.generate(ids, max_new_tokens=12, do_sample=False), ref)  # a tensor, as generate() returns
    stats: list = []
    with pytest.warns(FutureWarning, match="specbound_stats= is deprecated"):
        old = m.model.generate(ids, custom_generate=m.custom_generate, max_new_tokens=12, do_sample=False, specbound_stats=stats)
    assert torch.equal(old, ref) and list(stats[0].token_ids) == list(out.specbound_stats.token_ids)
    with pytest.raises(UsageError, match="output_scores=True is not supported"):
        m.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)


def test_custom_generate_of_another_model_is_refused(tiny, tmp_path):
    folder, loaded, artifact = tiny
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer)
    other = resolve_model(str(make_tiny_model_folder(tmp_path / "o", num_layers=4, seed=5))).model
    with pytest.raises(UsageError, match="another model"):
        other.generate(torch.tensor(PROMPT), custom_generate=m.custom_generate, max_new_tokens=3)


def test_text_streamer_prints_what_generate_returns(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    tok = m.tokenizer
    out = io.StringIO()
    with redirect_stdout(out):
        ids = m.generate(torch.tensor(PROMPT), max_new_tokens=20, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    expected = tok.decode(ids[0, len(PROMPT[0]) :], skip_special_tokens=True)
    assert out.getvalue().strip() == expected.strip() and expected


def test_text_iterator_streamer_read_by_a_thread_while_generating(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    streamer = TextIteratorStreamer(m.tokenizer, skip_prompt=True, timeout=60, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("ids", m.generate(torch.tensor(PROMPT), max_new_tokens=20, streamer=streamer)))
    worker.start()
    text = "".join(streamer)  # blocks until generation ends the stream
    worker.join(60)
    assert text.strip() == m.tokenizer.decode(result["ids"][0, len(PROMPT[0]) :], skip_special_tokens=True).strip()


def test_a_failed_generation_still_ends_the_stream(tiny):
    """A reader thread on TextIteratorStreamer must never hang when generation raises."""
    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    streamer = TextIteratorStreamer(m.tokenizer, timeout=30, skip_special_tokens=True)
    with pytest.raises(UsageError):
        m.generate(torch.tensor(PROMPT), max_new_tokens=5, streamer=streamer, num_beams=2)
    # without end() this would raise queue.Empty after the timeout; decoding never started
    assert "".join(streamer) == ""


def test_bf16_on_cpu_matches_generate_in_bf16(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact, dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.calibrated  # an fp32-fitted artifact serves bf16
    ref = _reference(m.model, PROMPT, max_new_tokens=24)
    assert torch.equal(m.generate(torch.tensor(PROMPT), max_new_tokens=24), ref)


def test_host_reads_are_at_most_one_per_exit_decision_and_per_verification(tiny, monkeypatch):
    from specbound_runtime import drafters, engine

    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    decisions = []
    real = drafters.decide_exit
    monkeypatch.setattr(drafters, "decide_exit", lambda *a: decisions.append(1) or real(*a))
    from specbound_runtime.engine import generate
    from specbound_runtime.drafters import Speculator

    with torch.inference_mode():
        generate(m.lm, PROMPT[0], 40, Speculator.for_policy(DRAFTING), m.eos_token_ids)  # builds the RoPE table once
        decisions.clear()
        with HostReadCounter() as reads:
            result = generate(m.lm, PROMPT[0], 40, Speculator.for_policy(DRAFTING), m.eos_token_ids)
    passes = result.verify_passes + result.fallbacks
    assert len(decisions) > 0 and result.drafted > 0
    assert reads.count <= len(decisions) + passes, (reads.count, len(decisions), passes)


def test_a_users_own_length_and_eos_criteria_replace_the_defaults_as_in_generate(tiny):
    """generate() lets a MaxLengthCriteria or EosTokenCriteria passed by the caller replace the
    one built from the generation config; SpecBound must stop where generate() stops."""
    from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    folder, loaded, artifact = tiny
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer, artifact=artifact)
    n = len(PROMPT[0])
    plain = _reference(loaded.model, PROMPT, max_new_tokens=30)[0, n:].tolist()
    for criteria in (
        StoppingCriteriaList([MaxLengthCriteria(max_length=n + 5)]),
        StoppingCriteriaList([EosTokenCriteria(eos_token_id=plain[6])]),
    ):
        ref = _reference(loaded.model, PROMPT, max_new_tokens=30, stopping_criteria=criteria)
        assert ref.shape[1] < n + 30  # the user's rule really stopped generate() early
        with torch.inference_mode():
            out = loaded.model.generate(
                torch.tensor(PROMPT), custom_generate=m.custom_generate, max_new_tokens=30,
                do_sample=False, stopping_criteria=criteria,
            )
        assert torch.equal(out, ref)


def test_custom_generate_streams_to_specbound_streamer_and_ends_it(tiny):
    folder, loaded, artifact = tiny
    m = sb.load(loaded.model, tokenizer=loaded.tokenizer, artifact=artifact)
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", value.reshape(-1).tolist()))

        def end(self):
            calls.append(("end", None))

    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor(PROMPT), custom_generate=m.custom_generate, max_new_tokens=12,
            do_sample=False, specbound_streamer=Recorder(),
        )
    assert calls[0] == ("put", PROMPT[0]) and calls[-1] == ("end", None)
    streamed = [t for kind, v in calls[1:-1] for t in v]
    assert streamed == out[0, len(PROMPT[0]) :].tolist()


def test_host_reads_stay_bounded_through_generate_with_processors_and_a_stopping_rule(tiny):
    """Through m.generate with a repetition penalty and a custom stopping rule: still at most
    one read per exit decision and two per verification (acceptance, then the stopping rule)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from specbound_runtime import drafters, engine

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    folder, loaded, artifact = tiny
    m = sb.load(str(folder), artifact=artifact)
    kwargs = dict(max_new_tokens=40, do_sample=False, repetition_penalty=1.2, stopping_criteria=StoppingCriteriaList([Never()]))
    m.generate(torch.tensor(PROMPT), **kwargs)  # builds the RoPE table once
    decisions = []
    real = drafters.decide_exit
    drafters.decide_exit = lambda *a: decisions.append(1) or real(*a)
    try:
        with HostReadCounter() as reads:
            run = m.generate_with_stats(torch.tensor(PROMPT), **kwargs)
    finally:
        drafters.decide_exit = real
    passes = run.stats.verify_passes + run.stats.fallbacks
    # plus a few reads once per call in generate()'s own preparation (attention-mask checks)
    per_call = 8
    assert decisions and reads.count <= len(decisions) + 2 * passes + per_call, (reads.count, len(decisions), passes)

"""Prompt lookup backing off to shorter tails (policy.lookup_min) and sizing its drafts by the
match's length (policy.lookup_floor): the artifact keeps them, the engine drafts with them and
stays exact, a broken value is refused, and an artifact without them reads as before."""

from __future__ import annotations

import pytest
import torch

from clitools import invoke, save_tiny_artifact
from helpers import make_tiny_model_folder
from specbound_runtime.artifact import _read, load_artifact, read_artifact
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny-backoff") / "model", num_layers=4, seed=0)
    return folder, resolve_model(str(folder))


def _saved(loaded, path, lookup_min):
    policy = ExitPolicy(4, (), (), (), 4, 3, lookup_ngram=3, lookup_max=2, lookup_min=lookup_min)
    return save_tiny_artifact(loaded, path, policy=policy)


def test_backoff_survives_the_artifact_round_trip_and_decodes_exactly(tiny, tmp_path):
    import specbound_runtime as sb

    folder, loaded = tiny
    path = _saved(loaded, tmp_path / "backoff.safetensors", 1)
    art = load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    assert (art.policy.lookup_ngram, art.policy.lookup_min) == (3, 1)
    m = sb.load(str(folder), artifact=path)
    ids = torch.tensor([[5, 6, 7, 8, 5, 9, 7, 8, 6]])
    out = m.generate_with_stats(ids, max_new_tokens=24, do_sample=False)
    assert out.stats.drafted > 0
    assert torch.equal(out.sequences, m.model.generate(ids, max_new_tokens=24, do_sample=False))
    assert "3-gram backing off to 1" in invoke("inspect", path).output


def test_an_artifact_without_backoff_reads_as_before(tiny, tmp_path):
    _, loaded = tiny
    path = _saved(loaded, tmp_path / "plain.safetensors", 0)
    assert "policy.lookup_backoff" not in _read(path)[1]
    assert read_artifact(path).policy.lookup_min == 0


def _sized(loaded, path, floor):
    policy = ExitPolicy(4, (), (), (), 4, 6, lookup_ngram=8, lookup_max=6, lookup_min=1, lookup_floor=floor)
    return save_tiny_artifact(loaded, path, policy=policy)


def test_drafts_sized_by_the_match_survive_the_round_trip_and_decode_exactly(tiny, tmp_path):
    import specbound_runtime as sb

    folder, loaded = tiny
    path = _sized(loaded, tmp_path / "sized.safetensors", 2)
    assert read_artifact(path).policy.lookup_floor == 2
    m = sb.load(str(folder), artifact=path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 5, 6]])
    out = m.generate_with_stats(ids, max_new_tokens=24, do_sample=False)
    assert out.stats.drafted > 0
    assert torch.equal(out.sequences, m.model.generate(ids, max_new_tokens=24, do_sample=False))
    assert "x2-6 by match length" in invoke("inspect", path).output
    # a match is at most 8 tokens, so a cap of 10 drafts at most 8: inspect says what it drafts
    wide = ExitPolicy(4, (), (), (), 4, 10, lookup_ngram=8, lookup_max=10, lookup_min=1, lookup_floor=2)
    assert "x2-8 by match length" in invoke("inspect", save_tiny_artifact(loaded, tmp_path / "wide.safetensors", policy=wide)).output
    plain = _sized(loaded, tmp_path / "fixed.safetensors", 0)
    assert "policy.lookup_floor" not in _read(plain)[1]
    assert read_artifact(plain).policy.lookup_floor == 0


@pytest.mark.parametrize(
    "name,value,fragment",
    [
        ("policy.lookup_backoff", torch.tensor([9]), "lookup_min must be 0 (no backoff) or within 1..lookup_ngram (8)"),
        ("policy.lookup_backoff", torch.tensor([1, 1]), "policy.lookup_backoff must hold one value"),
        ("policy.lookup_backoff", torch.tensor([1.0], dtype=torch.float64), "must hold integers"),
        ("policy.lookup_floor", torch.tensor([7]), "lookup_floor must be 0"),
        ("policy.lookup_floor", torch.tensor([1, 2]), "policy.lookup_floor must hold one value"),
        ("policy.lookup_floor", torch.tensor([1.0], dtype=torch.float64), "must hold integers"),
    ],
    ids=["backoff-past-the-ngram", "backoff-two-values", "backoff-float", "floor-past-lookup-max", "floor-two-values", "floor-float"],
)
def test_a_broken_backoff_or_floor_is_refused(tiny, tmp_path, name, value, fragment):
    from test_errors import refused, rewrite

    _, loaded = tiny
    path = _sized(loaded, tmp_path / "a.safetensors", 2)
    rewrite(path, lambda t, m: t.__setitem__(name, value))
    refused(path, loaded, fragment)

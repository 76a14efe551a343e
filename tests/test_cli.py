"""The `specbound` CLI when everything is right: what decode and inspect print, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from specbound import cli
from clitools import invoke, save_tiny_artifact
from helpers import make_tiny_model_folder

from specbound_runtime.exit_head import ExitHeadWeights
from specbound_runtime.models import resolve_model
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


def test_decode_json_prints_one_record_with_every_field(tiny):
    folder, loaded, _ = tiny
    [record] = records(invoke("decode", "-m", folder, "-p", "w5 w6 w7", "-n", 12, "--json"))
    for name in RECORD_FIELDS:
        assert name in record, name
    assert record["prompt_index"] == 0
    assert record["new_tokens"] == len(record["token_ids"]) and 1 <= record["new_tokens"] <= 12
    assert record["text"] == loaded.tokenizer.decode(record["token_ids"], skip_special_tokens=True)
    assert record["verify_passes"] == len(record["accept_lengths"]) >= 1
    assert all(n >= 1 for n in record["accept_lengths"])
    assert sum(record["accept_lengths"]) >= record["new_tokens"]
    assert record["wall_time_s"] >= 0


def test_speculation_drafts_and_no_speculation_does_not_and_both_give_the_same_tokens(tiny):
    folder, _, artifact = tiny
    args = ("decode", "-m", folder, "-p", "w9 w10 w11 w12", "-n", 16, "--json")
    [spec] = records(invoke(*args, "--artifact", artifact))
    [plain] = records(invoke(*args, "--no-speculation"))
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["exit_layers"] and set(spec["exit_layers"]) <= {2, 3}
    assert spec["verify_passes"] < plain["verify_passes"] or spec["new_tokens"] < 16
    assert plain["exit_layers"] == [] and set(plain["accept_lengths"]) == {1}
    assert plain["verify_passes"] == plain["new_tokens"]


def test_check_exact_compares_with_generate_and_reports_it(tiny):
    folder, _, artifact = tiny
    result = invoke("decode", "-m", folder, "-a", artifact, "-p", "w30 w31", "-n", 10, "--check-exact", "--json")
    [record] = records(result)
    assert record["exact"] is True
    assert "Error" not in result.stderr


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
        "lookup_ngram": 0, "lookup_max": 0,
    }
    assert info["exit_head"] == {"shortlist": 32, "lens_layers": [3]}
    assert info["metadata"]["model_fingerprint"] == loaded.fingerprint.to_dict()
    assert info["metadata"]["tokenizer_fingerprint"] == loaded.tokenizer_fingerprint
    assert info["metadata"]["seed"] == 7 and info["metadata"]["schema_version"] == 1
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

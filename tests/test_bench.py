"""`specbound bench` on a tiny model folder with a hand-built artifact: every method runs, our
methods are exact, every file is written in the documented shape, and bad flags fail with exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from specbound.calibrate import bench as B
from specbound.calibrate.simulate import CostModel
from specbound_runtime.errors import UsageError

NUM_LAYERS = 4
TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny Llama folder and an artifact for it: checks at layers 2 and 3, a lens at 2,
    a short-list, thresholds low enough for a random tiny model's flat logits to draft, and a
    cost model."""
    from helpers import make_tiny_model_folder

    from specbound_runtime.artifact import Artifact, save_artifact
    from specbound_runtime.exit_head import ExitHeadWeights
    from specbound_runtime.models import resolve_model
    from specbound_runtime.policy import ExitPolicy

    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_model_folder(root / "model", vocab_size=64, num_layers=NUM_LAYERS, seed=1)
    loaded = resolve_model(str(model))
    hidden = loaded.fingerprint.hidden_size
    g = torch.Generator().manual_seed(0)
    lens = {2: (torch.eye(hidden) + 0.05 * torch.randn(hidden, hidden, generator=g), torch.zeros(hidden))}
    weights = ExitHeadWeights(shortlist=torch.arange(2, 64), lens=lens)
    policy = ExitPolicy(NUM_LAYERS, (2, 3), (0.5, 0.5), (0.025, 0.0), d_max=3, w_max=3)
    cost = CostModel(num_layers=NUM_LAYERS, layer_base=0.2, layer_extra=0.01, head_base=0.05, head_extra=0.01, check=0.02, round_overhead=0.3)
    metadata = {
        "model_fingerprint": json.dumps(loaded.fingerprint.to_dict(), sort_keys=True),
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "cost_model": json.dumps(cost.to_dict(), sort_keys=True),
    }
    artifact = save_artifact(root / "tiny.safetensors", Artifact(policy, weights, metadata))
    return root, model, artifact


def _run_cli(args):
    from cli import app

    return CliRunner().invoke(app, ["bench", *args])


@pytest.fixture(scope="module")
def outcome(tiny):
    root, model, artifact = tiny
    opts = B.BenchOptions(
        model=str(model), artifact=artifact, tasks=("mt-bench", "qa"), max_new_tokens=TOKENS,
        repeats=2, prompts_per_task=2, out=root / "out", command="specbound bench (test)",
    )
    return B.run_bench(opts, show_progress=False)


def test_every_method_runs_and_our_methods_are_exact(outcome):
    s = outcome.results["summary"]
    assert list(s) == ["mt-bench", "qa", "overall"]
    assert set(s["overall"]) == set(B.METHODS)
    # mt-bench: one question, both turns; qa: two prompts
    assert s["mt-bench"]["hf-greedy"]["answers"] == 2 and s["qa"]["hf-greedy"]["answers"] == 2
    for m in ("hf-greedy", "ar", "specbound-paper", "specbound"):
        assert s["overall"][m]["exact"] == 1.0, s["overall"][m]["divergences"]
        assert s["overall"][m]["repeats"] == 2
    assert s["overall"]["hf-early-exit"]["repeats"] == 1
    for group in s.values():
        assert group["hf-greedy"]["speedup"] == 1.0
        assert group["hf-greedy"]["mean_accepted_length"] == 1.0
        assert group["ar"]["mean_accepted_length"] == 1.0
        assert group["ar"]["acceptance_rate"] is None
        for m in ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound"):
            r = group[m]
            assert r["tokens_per_s"] > 0 and r["speedup"] > 0
            assert 1 <= r["new_tokens"] <= TOKENS * r["answers"]
    # drafts happened and were counted, for our runtime and for transformers' early exit
    assert s["overall"]["specbound"]["drafted"] > 0
    assert s["overall"]["hf-early-exit"]["mean_accepted_length"] >= 1.0
    # the oracle: simulated; it drafts only tokens the full model agrees with
    o = s["overall"]["oracle"]
    assert o["simulated"] and o["speedup_vs_ar"] > 0 and o["oracle_sim"]["acceptance_rate"] in (0.0, 1.0)
    assert o["predicted_sim"]["drafted"] > 0
    assert o["specbound_over_oracle"] == pytest.approx(s["overall"]["specbound"]["speedup_vs_ar"] / o["speedup_vs_ar"], rel=1e-3)


def test_results_json_table_and_plot(outcome, tiny):
    root = tiny[0]
    out = root / "out"
    assert outcome.out_dir == out
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "model", "artifact", "settings", "machine", "versions", "grid", "summary"):
        assert key in results
    assert results["command"] == "specbound bench (test)"
    assert {"platform", "cpu_count", "torch_threads"} <= set(results["machine"])
    assert {"torch", "transformers"} <= set(results["versions"])
    assert results["grid"]["hf-prompt-lookup"]["chosen"] in B.PROMPT_LOOKUP_GRID
    assert results["grid"]["hf-early-exit"]["chosen"] in B.early_exit_layers(NUM_LAYERS)
    table = (out / "table.md").read_text()
    assert table == outcome.table
    assert "| method | mt-bench | qa | overall |" in table and "specbound / oracle" in table
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spec_bench_jsonl_shape(outcome, tiny):
    out = tiny[0] / "out"
    for m in ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound"):
        rows = [json.loads(line) for line in (out / f"{m}.jsonl").read_text().splitlines()]
        assert [r["category"] for r in rows] == ["mt-bench", "qa", "qa"]
        for row in rows:
            assert set(row) == {"question_id", "category", "choices"}
            assert [c["index"] for c in row["choices"]] == list(range(1 if m == "hf-early-exit" else 2))
            for c in row["choices"]:
                turns = 2 if row["category"] == "mt-bench" else 1
                assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == turns
                assert all(isinstance(t, str) for t in c["turns"])
                if c["accept_lengths"]:
                    assert sum(c["accept_lengths"]) == sum(c["new_tokens"])
    assert not (out / "oracle.jsonl").exists()


def test_pass_statistics_read_from_calls():
    # prompt of 5; pass 0 drafts 2 (input 7) and keeps 1 + 1; pass 1 from cache 6 drafts 1, keeps 2
    lengths, passes, drafted = B._pass_statistics([(7, 0), (2, 6), (1, 8)], 5, 6)
    assert lengths == (2, 2, 2) and passes == 3 and drafted == 2 + 1 + 0
    # a call without a readable cache length, or lengths that do not add up: passes only
    assert B._pass_statistics([(7, 0), (2, None)], 5, 3) == (None, 2, None)
    assert B._pass_statistics([(7, 0), (2, 9)], 5, 3) == (None, 2, None)
    assert B._pass_statistics([], 5, 3) == (None, None, None)


def test_parse_names_and_validation():
    assert B.parse_names(None, B.METHODS, "--methods") == B.METHODS
    assert B.parse_names("ar, hf-greedy,ar", B.METHODS, "--methods") == ("hf-greedy", "ar")
    with pytest.raises(UsageError, match="unknown name 'nope'"):
        B.parse_names("ar,nope", B.METHODS, "--methods")
    with pytest.raises(UsageError, match="--repeats"):
        B.BenchOptions(repeats=0).validate()
    assert B.early_exit_layers(30) == (15, 22)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "mt-bench,poetry"], "unknown name 'poetry'"),
        (["--methods", "ar,medusa"], "unknown name 'medusa'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompts-per-task", "0"], "--prompts-per-task must be >= 1"),
    ],
)
def test_bad_flags_exit_2(tiny, args, message):
    result = _run_cli(["--model", str(tiny[1]), *args])
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in result.output


def test_missing_artifact_exits_5(tiny):
    result = _run_cli(["--model", str(tiny[1]), "--artifact", str(tiny[0] / "absent.safetensors"), "--tasks", "qa"])
    assert result.exit_code == 5, result.output


def test_cli_json_without_artifact_skips_specbound(tiny):
    root, model, _ = tiny
    result = _run_cli(
        ["--model", str(model), "--tasks", "qa", "--methods", "ar,specbound,oracle", "--prompts-per-task", "1",
         "--max-new-tokens", "4", "--repeats", "1", "--out", str(root / "cli"), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["summary"]["overall"]) == {"hf-greedy", "ar"}
    assert isinstance(data["command"], str) and data["command"]  # sys.argv: pytest's, here
    assert "skipping specbound, oracle" in result.stderr
    assert (root / "cli" / "table.md").exists()

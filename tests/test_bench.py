"""`specbound bench` on a tiny model folder with a hand-built artifact.

Every method runs and every file is written in the documented shape; the exactness column catches
a method whose tokens really differ; the speedup follows wall time that a test adds on purpose;
an interrupted bench resumes without re-running what it finished; another command in the same
folder is refused; bad flags fail with exit 2. Faults and delays are injected by replacing the
harness's `MethodRunner` with a subclass."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from specbound.bench import harness as H
from specbound.bench import oracle as O
from specbound.bench.hf_hooks import FullDepthCall, PassStatistics, pass_statistics
from specbound.bench.measurements import MEASUREMENTS_FILE, Measurement, MeasurementKey, MeasurementLog, SettingsMismatchError
from specbound.bench.methods import METHODS, PROMPT_LOOKUP_GRID, Generation, MethodRunner, Variant, early_exit_layers
from clitools import assert_one_error, invoke, save_tiny_artifact
from specbound.calibrate.simulate import CostModel
from specbound_runtime.errors import InputError, UsageError

NUM_LAYERS = 4
TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A 4-layer tiny Llama folder and an artifact for it: checks at layers 2 and 3, a lens at 2,
    a short-list, thresholds low enough for a random tiny model's flat logits to draft, and a
    cost model."""
    from helpers import make_tiny_model_folder

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
    artifact = save_tiny_artifact(loaded, root / "tiny.safetensors", policy, weights, {"cost_model": json.dumps(cost.to_dict(), sort_keys=True)})
    with pytest.MonkeyPatch.context() as patch:  # exports for the peers go here, not to the user's cache
        patch.setenv("SPECBOUND_CACHE", str(root / "cache"))
        yield root, model, artifact


def _bench(tiny, out, **options):
    root, model, artifact = tiny
    defaults = dict(model=str(model), artifact=artifact, max_new_tokens=TOKENS, out=out, command="specbound bench (test)")
    return H.run_bench(H.BenchOptions(**{**defaults, **options}), show_progress=False)


class CountingRunner(MethodRunner):
    """Counts the timed generations (warm-up ones have a token cap) by variant name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timed: list[str] = []

    def generate(self, variant, encoded, max_new_tokens=None, seed=None):
        if max_new_tokens is None:
            self.timed.append(variant.name)
        return super().generate(variant, encoded, max_new_tokens, seed)


def _install(monkeypatch, runner_class) -> list:
    """Make the harness build `runner_class`; returns the list the built runners are put in."""
    built = []

    def make(*args, **kwargs):
        built.append(runner_class(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(H, "MethodRunner", make)
    return built


@pytest.fixture(scope="module")
def outcome(tiny):
    return _bench(tiny, tiny[0] / "out", tasks=("mt-bench", "qa"), repeats=2, prompts_per_task=2)


def test_every_method_runs_and_our_methods_are_exact(outcome):
    s = outcome.results["summary"]
    assert list(s) == ["mt-bench", "qa", "overall"]
    # hf-sample is a sampling bench's reference; ONNX Runtime cannot run this tiny model (head size 8,
    # skipped with a warning; test_onnx_runtime_genai_peers_run_on_their_own_cached_export runs it)
    assert set(s["overall"]) == set(METHODS) - {"hf-sample", "ort-genai", "ort-genai-ngram"}
    # mt-bench: one question, both turns; qa: two prompts
    assert s["mt-bench"]["hf-greedy"]["answers"] == 2 and s["qa"]["hf-greedy"]["answers"] == 2
    for m in ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound"):
        assert s["overall"][m]["exact"] == 1.0, s["overall"][m]["divergences"]
        assert s["overall"][m]["repeats"] == (1 if m == "hf-early-exit" else 2)
    for group in s.values():
        # plain decoding: one verification pass per token, nothing drafted
        assert group["hf-greedy"]["mean_accepted_length"] == 1.0
        assert group["ar"]["mean_accepted_length"] == 1.0 and group["ar"]["acceptance_rate"] is None
        for m in ("hf-greedy", "ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper", "specbound"):
            assert 1 <= group[m]["new_tokens"] <= TOKENS * group[m]["answers"]
    # drafts happened and were counted, for our runtime and for transformers' early exit
    assert s["overall"]["specbound"]["drafted"] > 0
    assert s["overall"]["hf-early-exit"]["mean_accepted_length"] >= 1.0
    # the oracle: simulated; it drafts only tokens the full model agrees with
    o = s["overall"]["oracle"]
    assert o["simulated"] and o["speedup_vs_ar"] > 0 and o["oracle_sim"]["acceptance_rate"] in (0.0, 1.0)
    assert o["predicted_sim"]["drafted"] > 0


def test_token_sources_say_where_emitted_tokens_came_from(outcome, tiny):
    s = outcome.results["summary"]
    for group in s.values():
        # plain decoding: every token is the full model's own
        assert group["hf-greedy"]["token_sources"] == {"model": 1.0} and group["ar"]["token_sources"] == {"model": 1.0}
        for m, drafter in (("specbound", "early-exit"), ("specbound-paper", "early-exit"), ("hf-prompt-lookup", "lookup"), ("hf-early-exit", "early-exit")):
            shares = group[m]["token_sources"]
            if shares is None:  # transformers' passes not countable: no sources either
                assert m.startswith("hf-") and group[m]["mean_accepted_length"] is None
                continue
            assert set(shares) <= {drafter, "model"} and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    # the tiny artifact has no prompt lookup: specbound's accepted drafts are all early exits
    overall = s["overall"]["specbound"]
    records = [json.loads(line) for line in (tiny[0] / "out" / MEASUREMENTS_FILE).read_text().splitlines()[1:]]
    ours = [r for r in records if r["method"] == "specbound" and r["repeat"] == 0]
    accepted = sum(sum(r["accepted_by_source"].values()) for r in ours)
    assert sum(sum(r["drafted_by_source"].values()) for r in ours) == overall["drafted"] > 0
    assert set().union(*(r["drafted_by_source"] for r in ours)) == {"early-exit"}
    assert overall["token_sources"].get("early-exit", 0.0) == pytest.approx(accepted / overall["new_tokens"], abs=1e-4)
    assert accepted > 0 and overall["token_sources"]["model"] < 1.0


def test_measurements_keep_sources_and_read_older_lines_without_them(tmp_path):
    from specbound.bench.answers import Answer
    from specbound.data.templates import TaskPrompt

    answer = Answer(0, "qa", TaskPrompt("qa", "q0", ("hello",)), 0)
    with_sources = Generation((4, 5, 6), (3,), 1, 3, (("early-exit", 1), ("lookup", 2)), (("lookup", 2),))
    m = Measurement(MeasurementKey("timed", 0, Variant("specbound"), 0), with_sources, 0.5)
    record = json.loads(json.dumps(m.to_record("h", answer)))
    assert Measurement.from_record(record) == m
    for key in ("drafted_by_source", "accepted_by_source"):  # a line from before sources were recorded
        del record[key]
    old = Measurement.from_record(record).generation
    assert old.accepted_by_source is None and old.drafted_by_source is None and old.token_ids == (4, 5, 6)


def test_worst_task_is_the_slowest_task_per_method():
    from specbound.bench.summary import worst_tasks

    summary = {
        "writing": {"ar": {"speedup": 1.2}, "specbound": {"speedup": 1.5}},
        "translation": {"ar": {"speedup": 0.9}, "specbound": {"speedup": 1.7}},
        "rag": {"ar": {"speedup": 1.0}, "specbound": {"speedup": None}},
        "overall": {"ar": {"speedup": 1.0}, "specbound": {"speedup": 1.6}, "hf-early-exit": {"speedup": None}},
    }
    assert worst_tasks(summary, ("writing", "translation", "rag")) == {
        "ar": {"task": "translation", "speedup": 0.9},
        "specbound": {"task": "writing", "speedup": 1.5},
    }


def test_limit_responds_to_width_and_to_the_cost_of_extra_positions():
    def cost(extra: float) -> CostModel:
        return CostModel(num_layers=30, layer_base=1.0, layer_extra=extra, head_base=0.3, head_extra=extra / 3, check=0.2, round_overhead=0.5)

    answers = [128, 90, 128]
    cheap = {w: O.limit_simulate(cost(0.05), w, answers) for w in (0, 1, 3, 6)}
    assert cheap[0]["speedup"] == pytest.approx(1.0)  # no drafts: plain decoding
    assert cheap[1]["speedup"] < cheap[3]["speedup"] < cheap[6]["speedup"]  # a wider free draft pays
    for w, sim in cheap.items():
        assert sim["tokens"] == sum(answers) and sim["speedup"] <= w + 1
        assert w < sim["mean_accepted_length"] <= w + 1  # w + 1 a pass; fewer at the prefill and at answer ends
    # when an extra position costs as much as a token, width buys nothing back
    dear = {w: O.limit_simulate(cost(1.0), w, answers)["speedup"] for w in (1, 6)}
    assert dear[6] < cheap[6]["speedup"] / 3 and dear[6] < 1.5
    assert O.limit_simulate(cost(0.05), 3, [0, 0]) is None


def test_limit_is_above_the_oracle_and_on_the_reference_scale(outcome):
    for group in outcome.results["summary"].values():
        limit, oracle = group["limit"], group["oracle"]
        assert limit["simulated"] and limit["w_max"] == 3
        # free, always-right drafts at the width bound beat perfect exits that still cost layers
        assert limit["speedup_vs_ar"] >= oracle["speedup_vs_ar"] > 0
        assert limit["speedup"] == pytest.approx(limit["speedup_vs_ar"] * group["ar"]["speedup"], rel=1e-3)


def test_answers_per_task_count_turns_of_multi_turn_tasks():
    from specbound.bench.answers import bench_answers
    from specbound.data.tasks import DEFAULT_TASKS

    one = bench_answers(("writing", "translation"), 1)
    assert [(a.task, a.turn) for a in one] == [("writing", 0), ("translation", 0)]
    three = bench_answers(("mt-bench",), 3)
    assert [a.turn for a in three] == [0, 1, 0] and three[0].prompt == three[1].prompt != three[2].prompt
    default = bench_answers(DEFAULT_TASKS, H.DEFAULT_PROMPTS_PER_TASK)
    assert len(default) == len(DEFAULT_TASKS) == 13 and [a.index for a in default] == list(range(13))


def test_oracle_row_puts_the_measured_speedup_beside_the_simulated_ones():
    # simulated over ar: oracle 2.0x, the calibrated policy 1.6x; measured: ar 1.1x of
    # hf-greedy, specbound 1.2x of ar
    sim = {
        "oracle": {"speedup": 2.0, "mean_accepted_length": 3.0, "acceptance_rate": 1.0},
        "predicted": {"speedup": 1.6, "mean_accepted_length": 2.0, "acceptance_rate": 0.5},
    }
    row = O.oracle_row(sim, {"ar": {"speedup": 1.1}, "specbound": {"speedup_vs_ar": 1.2}})
    assert row["speedup"] == pytest.approx(2.2)  # on hf-greedy's scale
    assert row["specbound_over_oracle"] == pytest.approx(0.6)
    assert row["specbound_over_predicted"] == pytest.approx(0.75)
    assert row["predicted_specbound"]["speedup_vs_ar"] == 1.6


def test_oracle_replays_the_next_token_head_the_policy_drafts_with():
    """The oracle decides exits perfectly; the head has no decision to make, so with the head in
    the policy both replays draft with it, from its recorded right/wrong per position."""
    import numpy as np

    from specbound.calibrate.fit import TEMPERATURE_GRID

    n = 60
    cost = CostModel(num_layers=30, layer_base=1.0, layer_extra=0.02, head_base=0.5, head_extra=0.05, check=0.1, round_overhead=0.5)

    from specbound.calibrate.collect import HEADS, Records
    from specbound.calibrate.replay import replays
    from specbound_runtime.policy import ExitPolicy

    def setup(head_draft: bool) -> O.OracleSetup:
        return O.OracleSetup(None, {}, (), ExitPolicy(30, (), (), (), 30, 1, head_draft=head_draft), cost)

    def rec(head_right: bool, head_draft: bool = True) -> dict:
        k = n + 1
        rows = Records(
            np.zeros(k, np.int32), np.zeros(k, bool), np.ones(k, bool), np.zeros(k, np.int64), np.zeros((k, len(HEADS), 0), bool),
            np.zeros((k, len(HEADS), 0, len(TEMPERATURE_GRID)), np.float32), (), head_right=np.full(k, head_right),
        )
        return {
            "conf": np.zeros((k, 0, len(TEMPERATURE_GRID)), np.float32), "right": np.zeros((k, 0), bool),
            "tokens": n, "free": replays(rows, setup(head_draft).policy),
        }

    right, wrong = (O.oracle_simulate(setup(True), [rec(r)]) for r in (True, False))
    for sim in (right, wrong):
        assert sim["oracle"]["head_reads"] == sim["predicted"]["head_reads"] > n / 3
    assert right["oracle"]["speedup"] > 1.5 > 1.0 > wrong["oracle"]["speedup"]
    assert right["oracle"]["mean_accepted_length"] > 1.9
    assert O.oracle_simulate(setup(False), [rec(True, head_draft=False)])["oracle"]["head_reads"] == 0  # not in the policy: not drafted


class WrongTokensRunner(MethodRunner):
    """`ar` returns a wrong token in its second timed run of every answer (repeat 1): at position
    2, or one token too many when the answer is shorter. Records what it changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timed_runs: dict[tuple, int] = {}
        self.changed: dict[tuple, dict] = {}  # prompt ids -> what the reference check must report

    def generate(self, variant, encoded, max_new_tokens=None, seed=None):
        g = super().generate(variant, encoded, max_new_tokens, seed)
        if variant.method != "ar" or max_new_tokens is not None:
            return g
        n = self.timed_runs[encoded.ids] = self.timed_runs.get(encoded.ids, 0) + 1
        if n != 2:
            return g
        tokens = list(g.token_ids)
        if len(tokens) > 2:
            pos, reference = 2, tokens[2]
            tokens[2] = 5 if tokens[2] != 5 else 6
        else:
            pos, reference = len(tokens), None
            tokens.append(5)
        self.changed[encoded.ids] = {"position": pos, "ours": tokens[pos], "reference": reference}
        return Generation(tuple(tokens), None, None, None)


def test_a_method_with_wrong_tokens_is_reported_not_exact_at_the_first_divergence(tiny, monkeypatch):
    built = _install(monkeypatch, WrongTokensRunner)
    result = _bench(tiny, tiny[0] / "wrong", tasks=("qa",), methods=("ar", "specbound-paper"), repeats=2, prompts_per_task=2)
    s = result.results["summary"]["overall"]
    assert s["hf-greedy"]["exact"] == 1.0 and s["specbound-paper"]["exact"] == 1.0
    assert s["ar"]["exact"] == 0.0 and s["ar"]["exact_answers"] == 0
    changed = list(built[0].changed.values())
    assert len(changed) == 2
    found = [{k: d[k] for k in ("position", "ours", "reference")} for d in s["ar"]["divergences"]]
    assert found == changed
    assert all(d["repeat"] == 1 for d in s["ar"]["divergences"])
    assert result.table.count("ar NOT exact on") == 2
    assert "| overall | ar |" in result.table and "| 0% (0/2) |" in result.table


class SlowRunner(MethodRunner):
    """Adds a known sleep inside every timed generation (0.1 s to hf-greedy, 0.4 s to ar) and
    times each one with its own clock, by variant and prompt, in run order."""

    SLEEP = {"hf-greedy": 0.1, "ar": 0.4}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_times: dict[str, dict[tuple, list[float]]] = {}

    def generate(self, variant, encoded, max_new_tokens=None, seed=None):
        if max_new_tokens is not None:  # warm-up: untimed
            return super().generate(variant, encoded, max_new_tokens, seed)
        started = time.perf_counter()
        time.sleep(self.SLEEP[variant.method])
        g = super().generate(variant, encoded, max_new_tokens, seed)
        self.own_times.setdefault(variant.name, {}).setdefault(encoded.ids, []).append(time.perf_counter() - started)
        return g


def test_speedup_follows_wall_time_measured_independently(tiny, monkeypatch):
    built = _install(monkeypatch, SlowRunner)
    result = _bench(tiny, tiny[0] / "slow", tasks=("qa",), methods=("ar",), repeats=3, prompts_per_task=2)
    s = result.results["summary"]["overall"]
    # the test's own clock: per repeat, the two answers' times added up; then the median
    own = {m: statistics.median(map(sum, zip(*built[0].own_times[m].values()))) for m in ("hf-greedy", "ar")}
    assert all(len(t) == 3 for m in own for t in built[0].own_times[m].values())
    for m in own:
        assert s[m]["median_wall_time_s"] == pytest.approx(own[m], abs=0.01)
    assert s["ar"]["speedup"] == pytest.approx(own["hf-greedy"] / own["ar"], rel=0.02)
    # and the added sleeps dominate a tiny model's 6 tokens: ar is reported ~4x slower
    assert s["ar"]["median_wall_time_s"] >= 2 * 0.4 and s["ar"]["speedup"] < 0.6


class InterruptingRunner(CountingRunner):
    """Like Ctrl-C (or SIGTERM, which the CLI turns into it) in the middle of timed run N + 1."""

    STOP_AFTER = 14  # the 2 grid runs, the first answer (9), and 3 of the second answer's 9

    def generate(self, variant, encoded, max_new_tokens=None, seed=None):
        if max_new_tokens is None and len(self.timed) == self.STOP_AFTER:
            raise KeyboardInterrupt
        return super().generate(variant, encoded, max_new_tokens, seed)


def _comparable(summary: dict) -> dict:
    """A summary without what timing decides (wall times, their ratios, the early-exit layer)."""
    keep = ("answers", "new_tokens", "repeats", "exact", "exact_answers", "divergences", "mean_accepted_length", "acceptance_rate", "drafted")
    return {
        g: {m: {k: r[k] for k in keep if m != "hf-early-exit" or k in keep[:6]} for m, r in row.items() if m != "oracle"}
        for g, row in summary.items()
    }


def test_an_interrupted_bench_resumes_without_rerunning_finished_measurements(tiny, monkeypatch):
    options = dict(tasks=("mt-bench", "qa"), methods=("ar", "hf-prompt-lookup", "hf-early-exit", "specbound-paper"), repeats=2, prompts_per_task=2, prompt_lookup_grid=(3,))
    # 4 answers x (2 repeats x 4 variants + hf-early-exit once) + its 2-layer grid on the first answer
    total = 4 * (2 * 4 + 1) + len(early_exit_layers(NUM_LAYERS))
    out = tiny[0] / "resumed"
    log_path = out / MEASUREMENTS_FILE

    first = _install(monkeypatch, InterruptingRunner)
    with pytest.raises(KeyboardInterrupt):
        _bench(tiny, out, **options)
    stop = InterruptingRunner.STOP_AFTER
    assert len(first[0].timed) == stop
    kept = log_path.read_bytes()
    assert len(kept.splitlines()) == 1 + stop  # the settings line, then one line per finished run
    with open(log_path, "ab") as f:  # a write torn by a kill
        f.write(b'{"settings_hash": "')

    second = _install(monkeypatch, CountingRunner)
    resumed = _bench(tiny, out, **options)
    assert len(second[0].timed) == total - stop  # the finished ones were loaded, not run again
    data = log_path.read_bytes()
    assert data.startswith(kept) and len(data.splitlines()) == 1 + total
    assert all(json.loads(line) for line in data.splitlines())  # the torn line is gone

    fresh = _bench(tiny, tiny[0] / "uninterrupted", **options)
    assert _comparable(resumed.results["summary"]) == _comparable(fresh.results["summary"])
    for m in ("hf-greedy", "ar", "hf-prompt-lookup", "specbound-paper"):
        texts = [[c["turns"] for c in json.loads(line)["choices"]] for line in (out / f"{m}.jsonl").read_text().splitlines()]
        fresh_texts = [[c["turns"] for c in json.loads(line)["choices"]] for line in (tiny[0] / "uninterrupted" / f"{m}.jsonl").read_text().splitlines()]
        assert texts == fresh_texts
    # the stored timings are the ones reported: the first interrupted run's hf-greedy time is in there
    first_ref = next(json.loads(line) for line in kept.splitlines()[1:] if json.loads(line)["method"] == "hf-greedy")
    rows = [json.loads(line) for line in (out / "hf-greedy.jsonl").read_text().splitlines()]
    assert rows[0]["choices"][first_ref["repeat"]]["wall_time"][first_ref["turn"]] == round(first_ref["wall_time_s"], 6)

    third = _install(monkeypatch, CountingRunner)
    again = _bench(tiny, out, **options)  # complete: nothing left to run, the same tables
    assert third[0].timed == [] and again.table == resumed.table


def test_another_command_in_the_same_folder_is_refused(tiny, monkeypatch):
    root, model, _ = tiny
    out = root / "refused"
    common = ["--model", str(model), "--tasks", "qa", "--methods", "ar", "--prompts-per-task", "1", "--repeats", "1", "--out", str(out)]
    assert invoke("bench", *common, "--max-new-tokens", "3").exit_code == 0
    before = (out / MEASUREMENTS_FILE).read_bytes()
    built = _install(monkeypatch, CountingRunner)
    assert_one_error(invoke("bench", *common, "--max-new-tokens", "4"), 2, "max_new_tokens differ", "pass another --out")
    assert built[0].timed == [] and (out / MEASUREMENTS_FILE).read_bytes() == before


def _measurement(answer: int, repeat: int) -> Measurement:
    return Measurement(MeasurementKey("timed", answer, Variant("ar"), repeat), Generation((4, 5), (1, 1), 2, 0), 0.5)


def test_measurement_log_keeps_finished_lines_and_refuses_what_it_cannot_trust(tmp_path):
    from specbound.bench.answers import Answer
    from specbound.data.templates import TaskPrompt

    answer = Answer(0, "qa", TaskPrompt("qa", "q0", ("hello",)), 0)
    path = tmp_path / MEASUREMENTS_FILE
    with MeasurementLog.open(path, {"repeats": 2}) as log:
        log.append(_measurement(0, 0), answer)
        log.append(_measurement(0, 1), answer)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines) + lines[-1][:20])  # torn last line
    with MeasurementLog.open(path, {"repeats": 2}) as log:
        assert log.loaded == 2 and log.get(_measurement(0, 1).key) == _measurement(0, 1)
    assert path.read_bytes() == b"".join(lines)
    with pytest.raises(SettingsMismatchError, match=r"\(repeats differ\); pass another --out"):
        MeasurementLog.open(path, {"repeats": 3})
    path.write_bytes(lines[0] + b"garbage\n" + lines[1])  # damage before the end is not a torn write
    with pytest.raises(InputError, match="line 2 is not a measurement"):
        MeasurementLog.open(path, {"repeats": 2})


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
    # the kernels' one-time set-up, apart from the timed answers; the policy with every field
    assert results["kernels"]["path"] in ("onednn", "eager") and results["kernels"]["setup_s"] >= 0
    assert {"lookup_ngram", "lookup_min", "lookup_floor", "head_draft"} <= set(results["artifact"]["policy"])
    assert results["grid"]["hf-prompt-lookup"]["chosen"] in PROMPT_LOOKUP_GRID
    grid = results["grid"]["hf-early-exit"]
    times = {int(k): v for k, v in grid["first_answer_wall_time_s"].items()}
    assert sorted(times) == list(early_exit_layers(NUM_LAYERS)) and times[grid["chosen"]] == min(times.values())  # the fastest
    table = (out / "table.md").read_text()
    assert table == outcome.table
    assert "| method | mt-bench | qa | overall | worst task |" in table and "specbound / oracle" in table
    assert "| limit (simulated) |" in table and "tokens from" in table
    # the worst task, per method, in results.json and beside the overall figure
    for m, w in results["worst_task"].items():
        assert w["task"] in ("mt-bench", "qa") and results["summary"]["overall"][m]["worst_task"] == w
    assert {"ar", "specbound", "oracle", "limit"} <= set(results["worst_task"])
    ar = results["worst_task"]["ar"]
    assert ar["speedup"] == min(results["summary"][t]["ar"]["speedup"] for t in ("mt-bench", "qa"))
    assert f"{ar['speedup']:.2f}x ({ar['task']}) |" in table.split("| ar |")[1].splitlines()[0]
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 4 answers x (2 repeats x 7 variants + hf-early-exit once) + 2 grid layers, after the settings line
    assert len((out / MEASUREMENTS_FILE).read_text().splitlines()) == 1 + 4 * (2 * 7 + 1) + 2


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
    calls = [FullDepthCall(7, 0), FullDepthCall(2, 6), FullDepthCall(1, 8)]
    assert pass_statistics(calls, 5, 6) == PassStatistics((2, 2, 2), 3, 2 + 1 + 0)
    # a call without a readable cache length, or lengths that do not add up: passes only
    assert pass_statistics([FullDepthCall(7, 0), FullDepthCall(2, None)], 5, 3) == PassStatistics(None, 2, None)
    assert pass_statistics([FullDepthCall(7, 0), FullDepthCall(2, 9)], 5, 3) == PassStatistics(None, 2, None)
    assert pass_statistics([], 5, 3) == PassStatistics(None, None, None)


def test_parse_names_and_validation():
    assert H.parse_names(None, METHODS, "--methods") == METHODS
    assert H.parse_names("ar, hf-greedy,ar", METHODS, "--methods") == ("hf-greedy", "ar")
    with pytest.raises(UsageError, match="unknown name 'nope'"):
        H.parse_names("ar,nope", METHODS, "--methods")
    with pytest.raises(UsageError, match="--repeats"):
        H.BenchOptions(repeats=0).validate()
    assert early_exit_layers(30) == (15, 19, 22, 26)  # SmolLM2: the paper's check layers


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "mt-bench,poetry"], "unknown name 'poetry' in --tasks; choose from: writing, roleplay, reasoning, math, coding"),
        (["--methods", "ar,medusa"], "unknown name 'medusa'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompts-per-task", "0"], "--prompts-per-task must be >= 1"),
    ],
)
def test_bad_flags_exit_2(tiny, args, message):
    assert_one_error(invoke("bench", "--model", tiny[1], *args), 2, message)


def test_missing_artifact_exits_5(tiny):
    assert_one_error(invoke("bench", "--model", tiny[1], "--artifact", tiny[0] / "absent.safetensors", "--tasks", "qa"), 5)


def test_cli_json_without_artifact_skips_specbound(tiny):
    root, model, _ = tiny
    result = invoke(
        "bench", "--model", model, "--tasks", "qa", "--methods", "ar,specbound,oracle", "--prompts-per-task", "1",
        "--max-new-tokens", "4", "--repeats", "1", "--out", root / "cli", "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["summary"]["overall"]) == {"hf-greedy", "ar"}
    assert isinstance(data["command"], str) and data["command"]  # sys.argv: pytest's, here
    assert "skipping specbound, oracle" in result.stderr
    assert (root / "cli" / "table.md").exists()


def test_speedup_compares_time_per_token_when_answers_differ_in_length():
    """Under sampling each method emits its own answer: one twice as long that takes twice the
    time is as fast, not half as fast; with equal answers it is the ratio of wall times."""
    from specbound.bench.summary import summarise

    def run(n_tokens: int, seconds: float, repeat: int) -> Measurement:
        return Measurement(MeasurementKey("timed", 0, Variant("ar"), repeat), Generation(tuple(range(n_tokens)), None, None, None), seconds)

    ref = [[run(40, 2.0, r) for r in range(3)]]
    assert summarise([[run(80, 4.0, r) for r in range(3)]], ref, [None], [0])["speedup"] == pytest.approx(1.0)
    assert summarise([[run(40, 1.0, r) for r in range(3)]], ref, [None], [0])["speedup"] == pytest.approx(2.0)
    # the same against `ar` (speedup_vs_ar): a sampled answer twice as long in twice the time is as
    # fast as ar's, not half as fast (the bench compared wall times there until 2026-12-03)
    from specbound.bench.summary import relative_speed

    ar = summarise(ref, ref, [None], [0])
    assert relative_speed(summarise([[run(80, 4.0, r) for r in range(3)]], ref, [None], [0]), ar) == pytest.approx(1.0)
    assert relative_speed(summarise([[run(6, 0.42, r) for r in range(3)]], ref, [None], [0]), ar) == pytest.approx((6 / 0.42) / 20, abs=1e-4)


def test_compiled_reference_runs_transformers_recipe_on_its_own_copy(tiny, monkeypatch):
    """hf-greedy-compiled: the static cache and torch.compile on a second copy of the model, warmed
    up outside every timed answer; its tokens are checked against hf-greedy's like any method's."""
    import torch._dynamo

    built = _install(monkeypatch, CountingRunner)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = _bench(tiny, tiny[0] / "compiled", tasks=("qa",), methods=("hf-greedy-compiled",), repeats=1, prompts_per_task=2)
    runner = built[0]
    # the recipe ran on a copy: the reference's model keeps its own forward and dynamic cache
    assert runner.compiled is not runner.model
    assert runner.compiled.generation_config.cache_implementation == "static"
    assert getattr(runner.model.generation_config, "cache_implementation", None) != "static"
    assert "forward" not in vars(runner.model) and "forward" in vars(runner.compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # it compiled
    s = result.results["summary"]["overall"]
    assert s["hf-greedy-compiled"]["exact"] == 1.0, s["hf-greedy-compiled"]["divergences"]
    assert runner.timed.count("hf-greedy-compiled") == 2  # two answers, one repeat
    warm = result.results["compiled_warm_up"]
    assert warm["first_call_s"] > 0 and warm["second_call_s"] > 0 and warm["load_s"] > 0
    assert "hf-greedy-compiled: transformers' static cache and torch.compile; one-time warm-up" in result.table


def test_compiled_reference_is_skipped_with_one_line_where_it_cannot_compile(tiny, monkeypatch, capsys):
    from specbound.bench import compiled as C

    def broken(model):  # what inductor does on a machine without a C compiler: fail at the first call
        def forward(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        model.forward = forward

    monkeypatch.setattr(C, "compile_recipe", broken)
    result = _bench(tiny, tiny[0] / "no-compiler", tasks=("qa",), methods=("ar", "hf-greedy-compiled"), repeats=1, prompts_per_task=1)
    err = capsys.readouterr().err
    assert "warning: skipping hf-greedy-compiled: torch.compile failed on this machine (RuntimeError: InvalidCxxCompiler" in err
    assert set(result.results["summary"]["overall"]) == {"hf-greedy", "ar"}
    assert result.results["compiled_warm_up"] is None


def test_onnx_runtime_genai_peers_run_on_their_own_cached_export(tiny, monkeypatch, tmp_path):
    """ort-genai and ort-genai-ngram: ONNX Runtime GenAI on an fp32 export of the same checkpoint,
    made once and cached; their tokens are compared with generate()'s, never assumed equal."""
    from helpers import make_tiny_model_folder

    monkeypatch.setenv("SPECBOUND_CACHE", str(tmp_path / "cache"))
    # ONNX Runtime's attention wants a head size that is a multiple of 16 (the shared tiny model's is 8)
    model = make_tiny_model_folder(tmp_path / "model", vocab_size=64, num_layers=2, hidden_size=64, seed=3)
    run = lambda out, methods, n: H.run_bench(H.BenchOptions(  # noqa: E731
        model=str(model), max_new_tokens=TOKENS, out=out, tasks=("qa",), methods=methods, repeats=1, prompts_per_task=n,
    ), show_progress=False)
    built = _install(monkeypatch, CountingRunner)
    first = run(tmp_path / "ort", ("ort-genai", "ort-genai-ngram"), 2)
    s = first.results["summary"]["overall"]
    assert set(s) == {"hf-greedy", "ort-genai", "ort-genai-ngram"}
    warm = first.results["peers_warm_up"]["ort-genai"]
    assert warm["export_s"] > 0 and (tmp_path / "cache" / "peers").is_dir() and warm["export"].startswith(str(tmp_path / "cache"))
    assert sorted(built[0].timed) == ["hf-greedy"] * 2 + ["ort-genai"] * 2 + ["ort-genai-ngram"] * 2
    for m in ("ort-genai", "ort-genai-ngram"):
        assert 1 <= s[m]["new_tokens"] <= TOKENS * 2 and s[m]["exact"] is not None
    # other kernels (and, on this random tiny model, a position table of 256 that the long qa prompts
    # outrun): their tokens are compared with generate()'s, and every difference located and measured
    for m in ("ort-genai", "ort-genai-ngram"):
        assert len(s[m]["divergences"]) == round((1 - s[m]["exact"]) * 2)
        assert all(d["margin"] is not None and d["position"] < TOKENS for d in s[m]["divergences"])
    again = run(tmp_path / "ort-again", ("ort-genai",), 1)
    assert again.results["peers_warm_up"]["ort-genai"]["export_s"] == 0  # the cached export


def test_peers_are_skipped_with_one_line_where_their_wheels_are_missing(tiny, monkeypatch, capsys):
    from specbound.bench import peers as P

    monkeypatch.setattr(P, "ort_missing", lambda: "onnxruntime_genai not installed (pip install 'specbound[peers]')")
    result = _bench(tiny, tiny[0] / "no-ort", tasks=("qa",), methods=("ar", "ort-genai", "ort-genai-ngram"), repeats=1, prompts_per_task=1)
    err = capsys.readouterr().err
    assert "warning: skipping ort-genai, ort-genai-ngram: onnxruntime_genai not installed (pip install 'specbound[peers]')" in err
    assert set(result.results["summary"]["overall"]) == {"hf-greedy", "ar"} and result.results["peers_warm_up"] is None


def test_batch_bench_runs_every_method_on_the_same_batches_and_checks_rows_alone(tiny, tmp_path):
    from specbound.bench.batches import run_batch_bench

    root, model, artifact = tiny
    results = run_batch_bench(str(model), artifact, ("writing", "coding", "translation"), 2, TOKENS, [1, 4], tmp_path, show_progress=False)
    assert [p["label"].split("/")[0] for p in results["prompts"]] == ["writing", "coding", "translation"] * 2
    four = results["sizes"]["4"]
    assert [len(b) for b in four["batches"]] == [4, 2]  # formed in advance, in prompt order
    for size in ("1", "4"):
        methods = results["sizes"][size]["methods"]
        assert set(methods) == {"hf-greedy", "ar", "specbound"}
        assert methods["specbound"]["identity_rate"] == 1.0 and methods["ar"]["identity_rate"] == 1.0
        assert len({m["tokens"] for m in methods.values()}) == 1  # the same tokens counted for every exact method
        assert methods["hf-greedy"]["speedup_vs_hf"] == 1.0
    alone = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]
    assert len(alone) == 6
    assert "| 4 | specbound |" in (tmp_path / "table.md").read_text()


def test_batch_bench_flags_are_checked_before_anything_loads(tiny):
    root, model, artifact = tiny
    from clitools import assert_one_error, invoke

    assert_one_error(invoke("bench", "--model", str(model), "--artifact", str(artifact), "--batch-size", "0"), 2, "sizes >= 1")
    assert_one_error(invoke("bench", "--model", str(model), "--artifact", str(artifact), "--batch-size", "4", "--temperature", "0.7"), 2, "greedy")
    assert_one_error(invoke("bench", "--model", str(model), "--artifact", str(root / "none.safetensors"), "--batch-size", "4"), 5, "not found")

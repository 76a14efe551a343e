"""Calibration jobs: the job file, `calibrate --job/--check/--from-artifact`, `specbound costs`,
the resolved job in the artifact, and byte identity across thread counts, noise below the stated
precision and a clean clone running the CI example's commands. Tiny in-process models."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import assert_one_error, invoke
from helpers import make_tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

JOB = """\
[model]
name = "model"

[corpus]
files = ["corpus.jsonl"]

[collect]
answer_tokens = 12
shortlist_size = 64

[tuning]
seed = 3
trials = 20

[costs]
file = "costs.json"

[measure]
prompts = 0

[output]
artifact = "{artifact}"
work_dir = "{work}"
"""


def write_corpus(path: Path, seed: int = 0, texts: int = 30, prompts: int = 16) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(texts):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(50))}) + "\n")
        for _ in range(prompts):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(4, 64)}" for _ in range(6))}) + "\n")
    return path


def write_costs(folder: Path, model: Path, shortlist_size: int = 64) -> Path:
    """A pinned cost model (fixed numbers, as `specbound costs` would write them)."""
    import specbound_runtime as sb
    from specbound.calibrate.costs import pinned_costs
    from specbound.calibrate.simulate import CostModel

    fp = sb.load(str(model)).fingerprint
    cost = CostModel(num_layers=fp.num_layers, layer_base=0.2, layer_extra=0.01, head_base=0.05, head_extra=0.01, check=0.02, round_overhead=0.3)
    path = folder / "costs.json"
    path.write_text(json.dumps(pinned_costs(cost, fp, shortlist_size), sort_keys=True))
    return path


def job_folder(root: Path, hidden_size: int = 32) -> Path:
    make_tiny_model_folder(root / "model", vocab_size=64, num_layers=4, seed=0, hidden_size=hidden_size)
    write_corpus(root / "corpus.jsonl")
    write_costs(root, root / "model")
    return root


def write_job(folder: Path, name: str, extra: str = "", **fields) -> Path:
    text = JOB.format(artifact=fields.pop("artifact", f"out/{name}.safetensors"), work=fields.pop("work", f"runs/{name}"))
    path = folder / f"{name}.toml"
    path.write_text(text + extra)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """One job built with `specbound calibrate --job`: (folder, job path, artifact bytes)."""
    folder = job_folder(tmp_path_factory.mktemp("jobs"))
    job = write_job(folder, "ref")
    result = invoke("calibrate", "--job", job)
    assert result.exit_code == 0, result.stderr
    return folder, job, (folder / "out" / "ref.safetensors").read_bytes()


# -- the job file -------------------------------------------------------------------------------


def test_every_calibrate_option_is_a_job_key():
    from specbound.calibrate.job import BY_FIELD, NOT_IN_JOB
    from specbound.calibrate.options import CalibrateOptions

    assert {f.name for f in dataclasses.fields(CalibrateOptions)} == set(BY_FIELD) | set(NOT_IN_JOB)


def test_a_bad_section_or_value_is_an_error_naming_its_line(tmp_path):
    job = write_job(tmp_path, "bad")
    text = job.read_text()
    job.write_text(text + "\n[extras]\nx = 1\n")
    line = len(text.splitlines()) + 2
    assert_one_error(invoke("calibrate", "--job", job), 3, f"{job}:{line}:", "unknown section [extras]")
    job.write_text(text.replace('file = "costs.json"', 'file = "costs.json"\nremeasure = 3'))
    line = job.read_text().splitlines().index("remeasure = 3") + 1
    assert_one_error(invoke("calibrate", "--job", job), 3, f"{job}:{line}:", "[costs] remeasure must be true or false")


def test_an_unknown_key_is_an_error_naming_the_key_and_its_line(tmp_path):
    job = write_job(tmp_path, "typo")
    lines = job.read_text().splitlines()
    lines.insert(lines.index("trials = 20") + 1, "trails = 50")
    job.write_text("\n".join(lines) + "\n")
    number = lines.index("trails = 50") + 1
    error = assert_one_error(invoke("calibrate", "--job", job), 3, f"{job}:{number}:", "unknown key 'trails' in [tuning]")
    assert "trials" in error  # the known keys are listed


# -- building, checking, rebuilding ---------------------------------------------------------------


def test_check_passes_on_identical_bytes_and_reports_each_field_that_moved(built):
    from specbound_runtime.artifact import Artifact, read_artifact, save_artifact
    from specbound_runtime.exit_head import ExitHeadWeights

    folder, job, reference = built
    ok = invoke("calibrate", "--job", job, "--check")
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.startswith("identical:")
    # tamper: another width bound, one short-list token dropped, the lens and the next-token head
    # nudged, a metadata number changed
    art = read_artifact(folder / "out" / "ref.safetensors")
    policy = dataclasses.replace(art.policy, w_max=art.policy.w_max + 2)
    shortlist = art.exit_weights.shortlist[art.exit_weights.shortlist != 5]
    lens = {l: (w + 1e-3, b) for l, (w, b) in art.exit_weights.lens.items()} or {2: (torch.eye(32), torch.zeros(32))}
    assert art.exit_weights.next_head is not None, "the fixture's artifact must hold a next-token head"
    next_head = (art.exit_weights.next_head[0] + 1e-3, art.exit_weights.next_head[1])
    meta = dict(art.metadata)
    sim = json.loads(meta["simulation"])
    sim["fit"]["speedup"] += 0.5
    meta["simulation"] = json.dumps(sim, sort_keys=True)
    meta.pop("checksum")
    tampered = folder / "out" / "tampered.safetensors"
    save_artifact(tampered, Artifact(policy, ExitHeadWeights(shortlist, lens, next_head), meta))
    job2 = write_job(folder, "tampered", work="runs/ref")
    result = invoke("calibrate", "--job", job2, "--check", "--json")
    assert_one_error(result, 8, "differs from", str(tampered))
    report = json.loads(result.stdout)
    assert not report["identical"]
    moved = {d["field"]: d for d in report["differences"]}
    assert moved["policy.w_max"]["by"].startswith("by -2")  # the rebuilt one has the tuned bound back
    assert moved["shortlist"]["by"] == "0 dropped [], 1 added [5]"  # the rebuilt one has token 5 back
    assert any(f.startswith("lens.") for f in moved)  # a lens nudged, or one added where the policy keeps none
    assert "values differ" in moved["next_head.weight"]["by"]  # the head was in no report before
    assert moved["metadata.simulation.fit.speedup"]["by"].startswith("by -0.5")


def test_the_artifact_records_the_resolved_job_and_rebuilds_from_it_alone(built, tmp_path, monkeypatch):
    from specbound.calibrate.job import KEYS
    from specbound_runtime.artifact import read_artifact

    folder, _, reference = built
    art = read_artifact(folder / "out" / "ref.safetensors")
    job = art.meta_json("job")
    recorded = {(s, k) for s, t in job.items() if isinstance(t, dict) for k in t}
    # every key that decides the content, defaults and pins resolved (an optional key left unset,
    # such as a sampling setting of a greedy job, is absent: TOML has no null); nothing about where
    assert {(k.section, k.name) for k in KEYS if k.recorded and not k.optional} <= recorded <= {(k.section, k.name) for k in KEYS if k.recorded}
    assert {("model", "fingerprint"), ("model", "device"), ("model", "dtype"), ("corpus", "sha256"), ("collect", "candidate_layers"), ("costs", "file")} <= recorded
    assert job["tuning"] == {"seed": 3, "trials": 20, "batch": 8, "multi_objective": False}
    assert job["collect"]["chunk_tokens"] == 256 and job["collect"]["candidate_layers"] == [2, 3]
    assert job["model"]["fingerprint"] == json.loads(art.metadata["model_fingerprint"])["weights_sha256"]
    assert set(job["corpus"]["sha256"]) == {"corpus.jsonl"}
    assert str(folder) not in json.dumps(dict(art.metadata))
    # rebuilt from the artifact alone (paths in its job are relative to the current folder), its
    # cost model included: the pinned file is not needed any more
    monkeypatch.chdir(folder)
    (folder / "costs.json").rename(tmp_path / "costs.json")
    try:
        result = invoke(
            "calibrate", "--from-artifact", "out/ref.safetensors", "--out", tmp_path / "again.safetensors",
            "--work-dir", tmp_path / "w", "--measure-prompts", "0",
        )
    finally:
        (tmp_path / "costs.json").rename(folder / "costs.json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == reference
    # a corpus that changed since is refused by the recorded pin
    (folder / "corpus.jsonl").write_text((folder / "corpus.jsonl").read_text().replace("w5 ", "w6 ", 1))
    try:
        again = invoke("calibrate", "--from-artifact", "out/ref.safetensors", "--out", tmp_path / "x.safetensors")
        assert_one_error(again, 3, "corpus file corpus.jsonl has sha256", "not the pinned")
    finally:
        write_corpus(folder / "corpus.jsonl")


def test_a_retune_under_another_cost_model_reuses_the_records_and_says_what_changed(built, tmp_path, monkeypatch):
    """Moving an artifact to a machine whose wide passes are dear: `--from-artifact A --costs
    theirs.json` with the calibration's work folder tunes again without recording anything, and
    says which policy fields moved; inspect names where each artifact's costs came from."""
    import specbound_runtime as sb
    from specbound.calibrate import collect, record
    from specbound.calibrate.costs import pinned_costs
    from specbound.calibrate.simulate import CostModel
    from specbound_runtime.artifact import read_artifact

    folder, _, _ = built
    assert read_artifact(folder / "out" / "ref.safetensors").policy.drafts
    fp = sb.load(str(folder / "model")).fingerprint
    dear = CostModel(
        num_layers=fp.num_layers, layer_base=0.2, layer_extra=0.5, head_base=0.05, head_extra=0.3, check=0.02, round_overhead=0.3,
        layer_widths=(0.2, 0.7, 1.2), head_widths=(0.05, 0.35, 0.65),
    )
    (tmp_path / "theirs.json").write_text(json.dumps(pinned_costs(dear, fp, 64)))

    def no_recording(*args, **kwargs):
        raise AssertionError("the retune recorded statistics again")

    monkeypatch.setattr(collect, "records_shard", no_recording)
    monkeypatch.setattr(record, "_moments_shard", no_recording)
    monkeypatch.setattr(record, "answers_shard", no_recording)
    monkeypatch.chdir(folder)
    result = invoke(
        "calibrate", "--from-artifact", "out/ref.safetensors", "--costs", tmp_path / "theirs.json", "--work-dir", "runs/ref",
        "--out", tmp_path / "retuned.safetensors", "--measure-prompts", "0", "--json",
    )
    assert result.exit_code == 0, result.stderr
    changed = {c["field"] for c in json.loads(result.stdout)["changed_from_source"]}
    assert "metadata.predicted_speedup" in changed and any(f.startswith("policy.") for f in changed)
    assert not read_artifact(tmp_path / "retuned.safetensors").policy.drafts  # every draft is too dear there
    text = invoke("inspect", tmp_path / "retuned.safetensors").output
    assert f"costs from: the pinned file {tmp_path / 'theirs.json'}" in text and "cost model: a pass over 1, 2 positions costs 0.9, 3.1 ms (1.00x, 3.71x of one)" in text


def test_flags_override_the_job_and_say_so(built, tmp_path):
    folder, job, reference = built
    out = tmp_path / "more.safetensors"
    result = invoke("calibrate", "--job", job, "--trials", "24", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "note: --trials overrides the job's [tuning] trials = 20" in result.stderr
    assert "note: --out overrides the job's [output] artifact" in result.stderr
    from specbound_runtime.artifact import read_artifact

    assert read_artifact(out).meta_json("job")["tuning"]["trials"] == 24


def test_a_pinned_cost_model_is_used_instead_of_measuring(built, tmp_path, monkeypatch):
    """`specbound costs` writes the file; a job naming it never measures; the artifact carries it."""
    from specbound.calibrate import costs as costs_module
    from specbound_runtime.artifact import read_artifact

    folder, _, _ = built
    made = invoke("costs", "--model", folder / "model", "--out", tmp_path / "c.json", "--shortlist-size", "64", "--json")
    assert made.exit_code == 0, made.stderr
    pinned = json.loads((tmp_path / "c.json").read_text())
    assert json.loads(made.stdout) == pinned and set(pinned["cost_model"]) >= {"layer_base", "check", "round_overhead"}

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cost model was measured although the job pins one")

    monkeypatch.setattr(costs_module, "measure_costs", no_measuring)
    job = write_job(folder, "pinned", work="runs/ref")
    job.write_text(job.read_text().replace('file = "costs.json"', f'file = "{tmp_path / "c.json"}"'))
    result = invoke("calibrate", "--job", job, "--force")
    assert result.exit_code == 0, result.stderr
    assert read_artifact(folder / "out" / "pinned.safetensors").meta_json("cost_model") == pinned["cost_model"]
    # a cost model measured for another short-list size is refused
    job.write_text(job.read_text().replace("shortlist_size = 64", "shortlist_size = 32").replace("runs/ref", "runs/s32"))
    assert_one_error(invoke("calibrate", "--job", job, "--force"), 3, "short-list size 64", "uses 32")


# -- identity across threads, noise, and a clean clone --------------------------------------------


def _build_in_process(job: Path):
    from specbound.calibrate.job import options_from_job
    from specbound.calibrate.run import run_calibration

    return run_calibration(options_from_job(job, {"force": True}, lambda _: None)).artifact.read_bytes()


def test_one_and_two_threads_give_identical_bytes(tmp_path):
    """Hidden size 128: large enough for BLAS to split its work over threads. One thread here,
    two in a fresh process (torch and OpenBLAS read their thread counts at start)."""
    folder = job_folder(tmp_path, hidden_size=128)
    job = write_job(folder, "threads")
    job.write_text(job.read_text().replace("trials = 20", "trials = 8").replace("[collect]\n", "[collect]\ncandidate_layers = [1, 2, 3]\n"))
    one = _build_in_process(job)
    shutil.rmtree(folder / "runs")
    threads = {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    two = subprocess.run(
        [sys.executable, "-m", "specbound.cli", "calibrate", "--job", str(job), "--force"],
        env=dict(os.environ, **threads), capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr
    assert (folder / "out" / "threads.safetensors").read_bytes() == one


# the kernels an older CPU kind runs: every library's dispatch capped at AVX2
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}


def test_a_float64_recording_gives_the_same_bytes_under_another_cpu_kinds_kernels(tmp_path):
    """[collect] record_dtype = "float64" (calibrate.precision rule 4): built here, and in a fresh
    process whose libraries dispatch the AVX2 kernels an older CI runner has, the bytes are equal.
    (On an AVX-512 machine the same job recorded in float32 moves next-head bytes: the failure
    this guards; on an AVX2 machine both runs use the same kernels.)"""
    folder = job_folder(tmp_path)
    job = write_job(folder, "portable")
    job.write_text(job.read_text().replace("trials = 20", "trials = 8").replace("[collect]\n", "[collect]\nrecord_dtype = 'float64'\n"))
    here = _build_in_process(job)
    shutil.rmtree(folder / "runs")
    env = dict(os.environ, **AVX2_KERNELS)
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], env=env, capture_output=True, text=True)
    assert probe.stdout.strip() in ("AVX2", "DEFAULT"), probe  # the cap took hold
    other = subprocess.run([sys.executable, "-m", "specbound.cli", "calibrate", "--job", str(job), "--force"], env=env, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert (folder / "out" / "portable.safetensors").read_bytes() == here


def test_an_unknown_record_dtype_is_a_usage_error(tmp_path):
    folder = job_folder(tmp_path)
    result = invoke("calibrate", "--job", write_job(folder, "bad"), "--record-dtype", "float16")
    assert_one_error(result, 2, "--record-dtype must be one of float64")


def test_moments_are_exact_in_any_order_and_lens_fits_do_not_depend_on_threads():
    from threadpoolctl import threadpool_limits

    from specbound.calibrate.fit import ridge_lens
    from specbound.calibrate.precision import exact_moments, moments_as_float, round_bits

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1500, 128)) * 3, rng.normal(size=(1500, 128))
    whole = exact_moments(x, y)
    order = rng.permutation(1500)
    parts = [exact_moments(x[order[a:b]], y[order[a:b]]) for a, b in ((0, 100), (100, 1100), (1100, 1500))]
    assert all(np.array_equal(sum(p[i] for p in parts), whole[i]) for i in (0, 1))
    fits = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            w, b = ridge_lens(moments_as_float(whole[0]), moments_as_float(whole[1]), 1.0)
        fits.append((round_bits(w).tobytes(), round_bits(b).tobytes()))
    assert fits[0] == fits[1]


def test_noise_below_the_stated_precision_leaves_the_bytes_alone(built, tmp_path, monkeypatch):
    """Perturb, far below 2^-16 relative, what float64 arithmetic can change from one machine to
    another: the fitted temperatures and alpha, and the lens solve (BLAS and LAPACK kernels). The
    recorded confidences are float32: noise below their last bit cannot be injected, and noise at
    it moves some of their rounded values (calibrate.precision says so)."""
    from specbound.calibrate import collect, report

    folder, _, reference = built
    rng = np.random.default_rng(1)

    def jitter(x, scale=1e-9):  # 2^-16 is 1.5e-5
        return x * (1 + scale * rng.uniform(-1, 1, np.shape(x)))

    temperature, alpha, lens = report.fit_temperature, report.fit_paper_alpha, collect.ridge_lens
    monkeypatch.setattr(report, "fit_temperature", lambda *a: float(jitter(temperature(*a))))
    monkeypatch.setattr(report, "fit_paper_alpha", lambda *a: float(jitter(alpha(*a))))
    monkeypatch.setattr(collect, "ridge_lens", lambda *a: tuple(jitter(v, 1e-10) for v in lens(*a)))
    job = write_job(folder, "noisy", artifact=str(tmp_path / "noisy.safetensors"), work=str(tmp_path / "w"))
    assert _build_in_process(job) == reference
    # the records, made with the (rounded) lens, are the same bytes too
    records = sorted((folder / "runs" / "ref" / "shards").glob("*.arrow"))
    assert records and [p.read_bytes() for p in records] == [(tmp_path / "w" / "shards" / p.name).read_bytes() for p in records]


def _workflow_commands(path: Path) -> list[str]:
    """The `run:` commands of a GitHub Actions workflow, in order (one line each)."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*(?:-\s*)?run:\s*(.+)$", path.read_text(), re.M)]


def test_a_clean_clone_runs_the_ci_example_and_its_check_passes(tmp_path):
    """What examples/ci/workflow.yml does on GitHub, here: clone, install, run its commands. The
    install is the venv scripts/setup.sh would make (its stamp matches), with the clone's own
    code, so the check runs exactly what is committed."""
    commands = _workflow_commands(ROOT / "examples" / "ci" / "workflow.yml")
    assert commands == ["bash scripts/setup.sh", ".venv/bin/specbound calibrate --job examples/ci/job.toml --check"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = clone / ".venv"
    (venv / "bin").mkdir(parents=True)
    shim = tmp_path / "site"
    (shim).mkdir()
    (shim / "specbound").symlink_to(clone)  # the wheel's layout: the clone's root is `specbound`
    (venv / "bin" / "specbound").write_text(
        # -S: this venv's site-packages without its .pth files, so not this checkout's editable install
        f"#!{sys.executable} -S\nimport sys\nsys.path[:0] = [{str(shim)!r}, {str(clone)!r}]\n"
        f"sys.path.append({sysconfig.get_path('purelib')!r})\n"
        "import os, specbound.cli, specbound_runtime\n"
        f"assert all(os.path.realpath(m.__file__).startswith({str(clone.resolve())!r}) for m in (specbound.cli, specbound_runtime))\n"
        "sys.exit(specbound.cli.main())\n"
    )
    (venv / "bin" / "specbound").chmod(0o755)
    stamp = subprocess.run(
        "cat requirements.lock requirements-data.lock pyproject.toml | sha256sum | cut -d' ' -f1",
        shell=True, cwd=clone, capture_output=True, text=True, check=True,
    ).stdout.strip()
    (venv / ".specbound-setup").write_text(stamp + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"OMP_NUM_THREADS": "1"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert done.stdout.startswith(f"identical: {clone / 'examples' / 'ci' / 'artifact.safetensors'}")


def test_check_reports_how_far_each_threshold_moved():
    from specbound.calibrate.check import compare_artifacts
    from specbound_runtime.artifact import Artifact
    from specbound_runtime.exit_head import ExitHeadWeights
    from specbound_runtime.policy import ExitPolicy

    weights = ExitHeadWeights(torch.arange(8), {})
    policy = ExitPolicy(6, (2, 4), (1.0, 1.2), (0.5, 0.7), 4, 3)
    moved = dataclasses.replace(policy, thresholds=(0.5, 0.725))
    diffs = {d.field: d for d in compare_artifacts(Artifact(policy, weights, {}), Artifact(moved, weights, {}))}
    assert set(diffs) == {"policy.thresholds"}
    assert diffs["policy.thresholds"].by == "max |difference| 0.025"

"""The helper scripts run: the GPU check's exactness part on CPU (it has no GPU here, CI never
has one), so it cannot rot between the sessions that have a GPU; and the experiments that run
without the packaged model run from a plain checkout, so they cannot rot either."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_exactness_runs_on_cpu_and_reports_every_architecture():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--dtypes", "float32", "--quick"],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[exactness float32] 24/24 identical to generate()" in out.stdout


def _experiment(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_simulator_timing_experiment_runs_from_a_plain_checkout():
    run = _experiment("experiments/sim_speed.py", "3000")
    assert run.returncode == 0, run.stderr
    assert "3000 positions" in run.stdout and "one trial takes" in run.stdout


def test_the_policy_variant_experiment_changes_only_the_fields_it_names(tmp_path):
    import specbound_runtime as sb
    from clitools import save_tiny_artifact
    from helpers import make_tiny_model_folder
    from specbound_runtime.artifact import read_artifact
    from specbound_runtime.models import resolve_model
    from specbound_runtime.policy import ExitPolicy

    folder = make_tiny_model_folder(tmp_path / "model", num_layers=4, seed=0)
    policy = ExitPolicy(4, (1, 2), (1.0, 1.0), (0.5, 0.5), d_max=2, w_max=4, lookup_ngram=3, lookup_max=5)
    source = save_tiny_artifact(resolve_model(str(folder)), tmp_path / "a.safetensors", policy=policy)
    run = _experiment("experiments/policy_variant.py", source, tmp_path / "b.safetensors", "lookup_max=2", "head_draft=false")
    assert run.returncode == 0, run.stderr
    variant = read_artifact(tmp_path / "b.safetensors")
    assert variant.policy == dataclasses.replace(policy, lookup_max=2)
    assert "lookup_max" in variant.metadata["ablation"]
    sb.load(str(folder), artifact=tmp_path / "b.safetensors")  # loads for the same model
    bad = _experiment("experiments/policy_variant.py", source, tmp_path / "c.safetensors", "nope=1")
    assert bad.returncode != 0 and "Error: 'nope' is not a policy field" in bad.stderr

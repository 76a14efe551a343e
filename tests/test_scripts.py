"""The helper scripts run: the GPU check's exactness part on CPU (it has no GPU here, CI never
has one), so it cannot rot between the sessions that have a GPU."""

from __future__ import annotations

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

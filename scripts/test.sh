#!/usr/bin/env bash
# The test suite, from a fresh clone: set up the pinned environment, then run every test
# (unit tests on tiny in-process models, and integration tests on the packaged SmolLM2).
# pytest's "no tests collected" (exit 5) fails like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

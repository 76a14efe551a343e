#!/usr/bin/env bash
# The test suite, from a fresh clone: set up the pinned environment, then run every test
# (unit tests on tiny in-process models, and integration tests on the packaged SmolLM2).
# pytest's "no tests collected" (exit 5) fails like any other failure. The worker tests need a
# real PostgreSQL server: its programs are installed with apt-get when missing (scripts/pg.sh),
# and the tests start and stop a server of their own; without one they fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/pg.sh ensure >/dev/null
exec .venv/bin/python -m pytest -q "$@"

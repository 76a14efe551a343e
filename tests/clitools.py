"""Running the `specbound` CLI in-process, and tiny artifacts, for tests. `from clitools import ...`.

    invoke(*args, env=None) -> click.testing.Result
        Runs `specbound ARGS` through typer's CliRunner; stdout and stderr are kept apart.

    assert_one_error(result, exit_code, *fragments) -> str
        The run failed with `exit_code`, stderr holds exactly one line starting with `Error: `
        and no traceback, and that line contains every fragment. Returns the line.

    save_tiny_artifact(loaded, path, policy=None, exit_weights=None, metadata=None) -> Path
        A valid artifact for a LoadedModel (its model and tokenizer fingerprints filled in).
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from specbound import cli
from specbound_runtime.artifact import Artifact, save_artifact
from specbound_runtime.policy import ExitPolicy


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=env)


def assert_one_error(result, exit_code: int, *fragments: str) -> str:
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def save_tiny_artifact(loaded, path, policy: ExitPolicy | None = None, exit_weights=None, metadata: dict | None = None) -> Path:
    policy = policy or ExitPolicy.paper_default(loaded.fingerprint.num_layers)
    meta = {
        "model_fingerprint": json.dumps(loaded.fingerprint.to_dict(), sort_keys=True),
        "tokenizer_fingerprint": json.dumps(loaded.tokenizer_fingerprint.to_dict(), sort_keys=True),
        **(metadata or {}),
    }
    return save_artifact(path, Artifact(policy=policy, exit_weights=exit_weights, metadata=meta))

"""Regenerate docs/cli.md from the CLI's own --help (a test fails when it drifts):
    .venv/bin/python scripts/cli_reference.py > docs/cli.md
"""

from __future__ import annotations

import os
import sys


def render() -> str:
    os.environ["COLUMNS"] = "100"
    os.environ["TERMINAL_WIDTH"] = "100"
    from typer.testing import CliRunner

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from specbound import cli

    runner = CliRunner()
    parts = ["# CLI reference\n\nGenerated from `--help` by `scripts/cli_reference.py`; do not edit.\n"]
    for args in ([], ["decode"], ["calibrate"], ["costs"], ["inspect"], ["bench"]):
        result = runner.invoke(cli.app, [*args, "--help"], terminal_width=100, env={"COLUMNS": "100"}, prog_name="specbound")
        title = " ".join(["specbound", *args])
        parts.append(f"## `{title}`\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())

"""Every Python example in the README's "Python" section runs as written (on the real model,
with an artifact at the path the examples name)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_python_section_has_examples():
    blocks = python_examples()
    assert len(blocks) >= 2 and "sb.load" in blocks[0] and "custom_generate" in blocks[1]


def test_readme_python_examples_run_as_written(tmp_path, capsys):
    import specbound_runtime as sb
    from clitools import save_tiny_artifact

    base = sb.load("smollm2-135m")
    # the artifact the examples name, fitted for this model (the paper's policy: any valid one will do)
    save_tiny_artifact(base, tmp_path / "artifacts" / "smollm2-135m.safetensors")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        for block in python_examples():
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert namespace["out"].shape[0] == 1 and namespace["result"].specbound_stats.accept_lengths and printed.strip()

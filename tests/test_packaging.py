"""Packaging: the wheel installs only `specbound` and `specbound_runtime`, and every third-party
module the code imports is declared where it is needed (the runtime's dependencies for the runtime
and the CLI, the `calibrate` extra for calibration and bench), with nothing declared but unused."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME_DEPS = PYPROJECT["dependencies"]
EXTRAS = PYPROJECT["optional-dependencies"]
FIRST_PARTY = {"specbound", "specbound_runtime"}
# Folders and modules installed under the `specbound` namespace: importable by their bare names
# only from a checkout, never from the wheel.
NAMESPACED = {p.stem for p in ROOT.iterdir() if p.name in ("cli.py", "calibrate", "data", "bench")}

# What each group of code may import beyond the standard library, and which requirement lists
# those imports are looked up in. The runtime and the CLI run on `pip install specbound` alone.
RUNTIME_CODE = ("specbound_runtime", "cli.py", "__init__.py")
CALIBRATE_CODE = ("calibrate", "data", "bench")
TEST_CODE = ("tests",)

# Distributions the code needs without importing them: (why, whether the code still does it).
USED_WITHOUT_IMPORT = {
    "numpy": (
        "Tensor.numpy() / torch.from_numpy need numpy, which torch does not require",
        lambda call: isinstance(call.func, ast.Attribute) and call.func.attr in ("numpy", "from_numpy"),
    ),
    "gguf": (
        "transformers reads a .gguf model with the gguf package",
        lambda call: any(k.arg == "gguf_file" for k in call.keywords),
    ),
    "accelerate": (
        "transformers refuses to load a .gguf model without accelerate",
        lambda call: any(k.arg == "gguf_file" for k in call.keywords),
    ),
    **{
        dist: (
            "ONNX Runtime GenAI's model builder, which the bench runs (bench.peers), imports it",
            lambda call: isinstance(call.func, ast.Name) and call.func.id == "ort_missing",
        )
        for dist in ("onnxruntime", "onnx", "onnx-ir")
    },
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_canonical(Requirement(r).name) for r in requirements}


def _python_files(parts: tuple[str, ...]) -> list[Path]:
    files = []
    for part in parts:
        path = ROOT / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


def _scan(parts: tuple[str, ...]) -> tuple[dict[str, set[str]], set[str]]:
    """(third-party top-level module -> files importing it, distributions used without import).
    specbound's own modules imported by their bare names count as the module "<bare>.NAME"."""
    local = {p.stem for p in _python_files(parts) if p.parent.name == "tests"}  # tests' helpers
    imported: dict[str, set[str]] = {}
    used: set[str] = set()
    for path in _python_files(parts):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                if isinstance(node, ast.Call):
                    used |= {dist for dist, (_, uses) in USED_WITHOUT_IMPORT.items() if uses(node)}
                continue
            for module in modules:
                top = module.split(".")[0]
                top = f"<bare>.{top}" if top in NAMESPACED else top
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top not in local:
                    imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return imported, used


def _distributions(module: str) -> set[str]:
    if module.startswith("<bare>."):
        return set()  # reported by test_specbound_modules_are_imported_through_the_namespace
    dists = md.packages_distributions().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it; declare and install it"
    return {_canonical(d) for d in dists}


@pytest.mark.parametrize(
    "parts, allowed",
    [
        (RUNTIME_CODE, ("dependencies",)),
        (CALIBRATE_CODE, ("dependencies", "calibrate", "peers")),
        (TEST_CODE, ("dependencies", "calibrate", "test")),
    ],
    ids=["runtime-and-cli", "calibration-and-bench", "tests"],
)
def test_every_import_is_declared_where_it_is_needed(parts, allowed):
    declared = set()
    for name in allowed:
        declared |= _names(RUNTIME_DEPS if name == "dependencies" else EXTRAS[name])
    imported, used_without_import = _scan(parts)
    missing = {
        module: sorted(files)
        for module, files in imported.items()
        if not module.startswith("<bare>.") and not _distributions(module) & declared
    }
    missing.update({dist: USED_WITHOUT_IMPORT[dist][0] for dist in used_without_import - declared})
    assert not missing, f"imported but not declared in {' or '.join(allowed)} of pyproject.toml: {missing}"


@pytest.mark.parametrize(
    "declared, parts, minus",
    [
        (RUNTIME_DEPS, RUNTIME_CODE, ()),
        (EXTRAS["calibrate"], CALIBRATE_CODE, RUNTIME_DEPS),
        (EXTRAS["peers"], CALIBRATE_CODE, RUNTIME_DEPS),
        (EXTRAS["test"], TEST_CODE, ()),
    ],
    ids=["dependencies", "calibrate-extra", "peers-extra", "test-extra"],
)
def test_nothing_declared_goes_unused(declared, parts, minus):
    imported, used_without_import = _scan(parts)
    used = set(used_without_import)
    for module in imported:
        used |= _distributions(module)
    unused = _names(declared) - used
    assert not unused, f"declared but never imported or used by {', '.join(parts)}: {sorted(unused)}"
    doubled = _names(declared) & _names(list(minus))
    assert not doubled, f"declared both in the extra and in the runtime's dependencies: {sorted(doubled)}"


def test_specbound_modules_are_imported_through_the_namespace():
    imported, _ = _scan(RUNTIME_CODE + CALIBRATE_CODE + TEST_CODE)
    bare = {m.removeprefix("<bare>."): sorted(f) for m, f in imported.items() if m.startswith("<bare>.")}
    assert not bare, f"import these as specbound.NAME (bare names work only in a checkout): {bare}"


def test_the_cli_names_every_module_of_the_calibrate_extra():
    """A missing module of the extra is reported as `pip install 'specbound[calibrate]'` only if
    the CLI knows the module belongs to the extra."""
    from specbound import cli

    extra = _names(EXTRAS["calibrate"])
    modules = {m for m, dists in md.packages_distributions().items() if {_canonical(d) for d in dists} & extra}
    imported, _ = _scan(CALIBRATE_CODE)
    assert set(cli.EXTRA_MODULES["calibrate"]) == modules & set(imported)


def test_pyproject_has_ranges_and_the_lock_pins_each_one_inside_them():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.lock must pin exactly: {line}"
            lock[_canonical(req.name)] = Version(spec.version)
    for line in RUNTIME_DEPS + [r for extra in EXTRAS.values() for r in extra]:
        req = Requirement(line)
        assert all(s.operator != "==" for s in req.specifier), f"pyproject.toml pins {line}; use a range, pin in requirements.lock"
        name = _canonical(req.name)
        assert name in lock, f"{req.name} is declared in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(lock[name]), f"requirements.lock pins {req.name}=={lock[name]}, outside {line!r}"
    # torch first and pinned (an unpinned one pulls a multi-GB CUDA build): setup.sh reads the lock's pin
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert setup.index("^torch==") < setup.index("-r requirements.lock")


def test_the_wheel_installs_only_specbound_and_specbound_runtime(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".*", "runs", "artifacts", "build", "tests", "docs", "*.egg-info", "__pycache__"),
    )
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = out.glob("specbound-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    top = {n.split("/")[0].removesuffix(".py") for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == FIRST_PARTY
    for module in ("specbound/cli.py", "specbound/calibrate/pipeline.py", "specbound/data/tasks.py", "specbound_runtime/decoder.py"):
        assert module in names
    assert "specbound = specbound.cli:main" in scripts

"""The job file: everything that decides an artifact, in TOML, committed beside the model.

    [model]    name, fingerprint (a pin: the weights' sha256 or a prefix of it), device, dtype
    [corpus]   files ("default" or a list of paths), sha256 (pins, file -> digest), prompts,
               documents, held_out_fraction, held_out_per_kind (the default corpus's held-out
               prompts of each kind)
    [collect]  answer_tokens, chunk_tokens, shortlist_size, candidate_layers, record_dtype
               ("float64": the same bytes on any CPU kind; calibrate.precision rule 4)
    [tuning]   seed, trials, batch, multi_objective, storage, study_name, workers
    [costs]    file (a cost model pinned with `specbound costs`), remeasure
    [decoding] temperature, top_k, top_p, min_p: the sampling mode to tune for (none: greedy)
    [measure]  prompts, tokens (the live check on held-out prompts after export)
    [output]   artifact, work_dir, force

Relative paths (model folder, corpus files, cost file, artifact, work folder, a sqlite storage)
are relative to the job file's folder. Unknown sections and keys are errors naming the line.

The artifact records the resolved job (`recorded_job`): every key that decides its content, with
the defaults used and the pins resolved (the model's weights digest, each corpus file's digest,
the candidate layers). Left out, because they do not change a byte: where things are written
(output), which storage holds the study and under which name, how many workers ran, the live
measurement, and the flags `force` and `remeasure`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specbound_runtime.errors import InputError, UsageError

from .options import CalibrateOptions

JOB_FORMAT = 1


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    field: str  # CalibrateOptions field
    kind: str  # str, int, float, bool, path, files, digests, layers
    recorded: bool  # decides the artifact's content: recorded in it
    optional: bool = False  # None allowed


KEYS = (
    Key("model", "name", "model", "str", True),
    Key("model", "fingerprint", "model_fingerprint", "str", True, optional=True),
    Key("model", "device", "device", "str", True, optional=True),
    Key("model", "dtype", "dtype", "str", True, optional=True),
    Key("corpus", "files", "corpus", "files", True),
    Key("corpus", "sha256", "corpus_sha256", "digests", True, optional=True),
    Key("corpus", "prompts", "prompts", "int", True),
    Key("corpus", "documents", "documents", "int", True),
    Key("corpus", "held_out_fraction", "held_out_fraction", "float", True),
    Key("corpus", "held_out_per_kind", "held_out_per_kind", "int", True),
    Key("collect", "answer_tokens", "answer_tokens", "int", True),
    Key("collect", "chunk_tokens", "chunk_tokens", "int", True),
    Key("collect", "shortlist_size", "shortlist_size", "int", True),
    Key("collect", "candidate_layers", "candidate_layers", "layers", True, optional=True),
    Key("collect", "record_dtype", "record_dtype", "str", True, optional=True),
    Key("tuning", "seed", "seed", "int", True),
    Key("tuning", "trials", "trials", "int", True),
    Key("tuning", "batch", "trial_batch", "int", True),
    Key("tuning", "multi_objective", "multi_objective", "bool", True),
    Key("tuning", "storage", "storage", "str", False, optional=True),
    Key("tuning", "study_name", "study_name", "str", False, optional=True),
    Key("tuning", "workers", "workers", "int", False),
    Key("costs", "file", "costs_file", "str", True, optional=True),
    Key("costs", "remeasure", "remeasure_costs", "bool", False),
    Key("decoding", "temperature", "temperature", "float", True, optional=True),
    Key("decoding", "top_k", "top_k", "int", True, optional=True),
    Key("decoding", "top_p", "top_p", "float", True, optional=True),
    Key("decoding", "min_p", "min_p", "float", True, optional=True),
    Key("measure", "prompts", "measure_prompts", "int", False),
    Key("measure", "tokens", "measure_tokens", "int", False),
    Key("output", "artifact", "out", "path", False, optional=True),
    Key("output", "work_dir", "work_dir", "path", False, optional=True),
    Key("output", "force", "force", "bool", False),
)
BY_FIELD = {k.field: k for k in KEYS}
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS))
# CalibrateOptions fields that are not job keys: where relative paths start, and a cost model
# handed over in memory (from an artifact, or from the process that started the workers).
NOT_IN_JOB = ("base_dir", "cost_model")


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """1-based line of `key` in `[section]` (or of the section's header when key is None)."""
    current = None
    header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")
    for number, line in enumerate(text.splitlines(), start=1):
        m = header.match(line)
        if m:
            current = m.group(1).strip().strip('"').strip("'")
            if key is None and current == section:
                return number
            continue
        if key is not None and current == section:
            m = re.match(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""", line)
            if m and key in m.groups():
                return number
        if key is not None and section is None and current is None:
            if re.match(rf"^\s*{re.escape(key)}\s*[.=]", line):
                return number
    return None


def _where(path: Path, text: str, section: str | None, key: str | None) -> str:
    line = _line_of(text, section, key)
    return f"{path}:{line}" if line else str(path)


def _convert(key: Key, value: Any, at: str) -> Any:
    label = f"[{key.section}] {key.name}"

    def bad(want: str):
        return InputError(f"{at}: {label} must be {want}, got {value!r}")

    if key.kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if key.kind == "int":
        if type(value) is not int:
            raise bad("an integer")
        return value
    if key.kind == "float":
        if type(value) not in (int, float):
            raise bad("a number")
        return float(value)
    if key.kind == "bool":
        if type(value) is not bool:
            raise bad("true or false")
        return value
    if key.kind == "path":
        if not isinstance(value, str) or not value:
            raise bad("a path")
        return value
    if key.kind == "files":
        if value == "default":
            return "default"
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v and "," not in v for v in value):
            raise bad('"default" or a non-empty list of file paths (without commas)')
        return ",".join(value)
    if key.kind == "digests":
        if not isinstance(value, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in value.values()):
            raise bad("a table of file = sha256 hex digest")
        return dict(sorted(value.items()))
    if key.kind == "layers":
        if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
            raise bad("a non-empty list of layer numbers")
        return tuple(sorted(set(value)))
    raise AssertionError(key.kind)


def parse_job(path: str | Path) -> dict[str, Any]:
    """Read a job file into CalibrateOptions keyword arguments (plus base_dir). Raises InputError
    naming the file and line for unknown sections or keys and for values of the wrong type."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read job file {path}: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    return job_options(data, path, text, path.resolve().parent)


def job_options(data: dict, path: Path | str, text: str, base_dir: Path) -> dict[str, Any]:
    """Validate a job as a dict (a parsed file, or the job an artifact recorded)."""
    path = Path(path)
    known = {(k.section, k.name): k for k in KEYS}
    options: dict[str, Any] = {"base_dir": base_dir}
    for section, table in data.items():
        if section == "format":
            if table != JOB_FORMAT:
                raise InputError(f"{_where(path, text, None, 'format')}: job format {table!r} is not {JOB_FORMAT}; upgrade specbound")
            continue
        if section not in SECTIONS or not isinstance(table, dict):
            what = "unknown section" if section not in SECTIONS else "not a section"
            line = _where(path, text, section, None) if isinstance(table, dict) else _where(path, text, None, section)
            raise InputError(f"{line}: {what} [{section}]; the sections are {', '.join(f'[{s}]' for s in SECTIONS)}")
        for name, value in table.items():
            key = known.get((section, name))
            at = _where(path, text, section, name)
            if key is None:
                names = ", ".join(k.name for k in KEYS if k.section == section)
                raise InputError(f"{at}: unknown key {name!r} in [{section}]; known keys there: {names}")
            options[key.field] = _convert(key, value, at)
    return options


def recorded_job(opts, *, fingerprint: str, corpus_sha256: dict[str, str], layers, device: str, dtype: str) -> dict:
    """The resolved job an artifact carries: every recorded key, defaults and pins filled in."""
    resolved = {
        "model_fingerprint": fingerprint,
        "corpus_sha256": dict(sorted(corpus_sha256.items())),
        "candidate_layers": list(layers),
        "device": device,
        "dtype": dtype,
    }
    job: dict[str, Any] = {"format": JOB_FORMAT}
    for key in KEYS:
        if not key.recorded:
            continue
        value = resolved[key.field] if key.field in resolved else getattr(opts, key.field)
        if key.kind == "files":
            value = "default" if value == "default" else value.split(",")
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, Path):
            value = str(value)
        job.setdefault(key.section, {})[key.name] = value
    # TOML has no null: a key whose value is None is left out (and means its default)
    job = {s: ({k: v for k, v in t.items() if v is not None} if isinstance(t, dict) else t) for s, t in job.items()}
    if not job.get("decoding"):
        job.pop("decoding", None)  # greedy: a greedy job (and its artifact) reads as before sampling existed
    return job


def job_digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe(field: str, value: Any) -> str:
    """`[section] key = value` for messages (storage URLs redacted)."""
    from .study import redact

    key = BY_FIELD[field]
    shown = redact(str(value)) if isinstance(value, str) else value
    return f"[{key.section}] {key.name} = {shown!r}"


# -- building options: from flags, a job file or an artifact -------------------------------------


def _absolute_flag(field: str, value: Any) -> Any:
    """Paths given as flags are relative to the current folder, not to the job's."""
    if value is None:
        return None
    if field in ("out", "work_dir"):
        return Path(value).absolute()
    if field == "costs_file":
        return str(Path(value).absolute())
    if field == "model" and Path(value).exists():
        return str(Path(value).absolute())
    if field == "corpus" and value != "default":
        return ",".join(str(Path(p).absolute()) for p in value.split(",") if p)
    return value


def merge_flags(options: dict[str, Any], flags: dict[str, Any], source: str, note) -> dict[str, Any]:
    """Flags given on the command line override the job's values, each said on stderr."""
    merged = dict(options)
    for field, value in flags.items():
        key = BY_FIELD[field]
        before = options.get(field)
        was = f"the job's {describe(field, before)}" if field in options else f"the default of [{key.section}] {key.name}"
        note(f"note: --{field.replace('_', '-') if field != 'costs_file' else 'costs'} overrides {was} from {source}")
        merged[field] = _absolute_flag(field, value)
    return merged


def calibrate_options(flags: dict[str, Any], given: set[str], job: Path | None, from_artifact: Path | None, check: bool, note):
    """The options of one `specbound calibrate`: its flags alone, or a job file's (or the job an
    artifact recorded) with the flags `given` on the command line over them."""
    if job is not None and from_artifact is not None:
        raise UsageError("give --job or --from-artifact, not both")
    if job is None and from_artifact is None:
        if check:
            raise UsageError("--check needs --job (or --from-artifact): the job says which artifact to rebuild and compare")
        return CalibrateOptions(**flags)
    chosen = {name: flags[name] for name in flags if name in given}
    return options_from_job(job, chosen, note) if job is not None else options_from_artifact(from_artifact, chosen, note)


def options_from_job(path: Path, flags: dict[str, Any], note):
    options = parse_job(path)
    if "model" not in options and "model" not in flags:
        raise InputError(f"{path}: the job names no model; add [model] name = \"...\"")
    return CalibrateOptions(**merge_flags(options, flags, str(path), note))


def options_from_artifact(path: Path, flags: dict[str, Any], note):
    """The job an artifact recorded, with its cost model, paths relative to the current folder."""
    from specbound_runtime.artifact import read_artifact
    from specbound_runtime.errors import ArtifactError

    artifact = read_artifact(path)
    job, cost = artifact.meta_json("job"), artifact.meta_json("cost_model")
    if not isinstance(job, dict) or not isinstance(cost, dict):
        raise ArtifactError(f"{path} records no job (it predates job files); rebuild it from its job or flags")
    options = job_options(job, f"{path} (recorded job)", "", Path.cwd())
    if flags.get("remeasure_costs"):  # a retune under this machine's costs, measured now
        options.pop("costs_file", None)
    elif "costs_file" not in flags:  # else a retune under the cost file given
        options["cost_model"] = cost
    return CalibrateOptions(**merge_flags(options, flags, f"{path}'s recorded job", note))

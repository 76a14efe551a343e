"""Reading user prompts from files. Plain Python: the runtime installs without `datasets`.

Two file formats, chosen by extension (case-insensitive):

- `.jsonl`, `.json-lines`, `.ndjson`: one JSON object per line, each with either a string
  `prompt` or a `turns` list of strings (the user turns of a multi-turn chat). Blank lines are
  skipped; other fields are ignored.
- anything else: the whole file is ONE plain-text prompt (surrounding whitespace stripped).

Every problem is an `InputError` whose one-line message names the file and says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from specbound_runtime.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Prompt:
    """One prompt. `turns` holds every user turn; `text` is the first one (`turns[0]`).

    Built with `turns` left empty, `turns` becomes `(text,)`. `source_line` is the 1-based line
    of a JSONL file the prompt came from, `None` for a plain-text file or a literal prompt.
    """

    text: str
    turns: tuple[str, ...] = ()
    source_line: int | None = None

    def __post_init__(self) -> None:
        validate_prompt_text(self.text)
        if not self.turns:
            object.__setattr__(self, "turns", (self.text,))
        if not isinstance(self.turns, tuple):
            raise TypeError(f"Prompt.turns must be a tuple of str, got {type(self.turns).__name__}")
        for turn in self.turns:
            validate_prompt_text(turn)
        if self.turns[0] != self.text:
            raise ValueError("Prompt.text must equal Prompt.turns[0]")
        if self.source_line is not None and self.source_line < 1:
            raise ValueError(f"Prompt.source_line is 1-based, got {self.source_line}")

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1


def validate_prompt_text(text: object, where: str = "") -> str:
    """Return `text` unchanged if it is a usable prompt; raise `InputError` if not.

    `where` (e.g. "prompts.jsonl line 3") prefixes the message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(text, str):
        raise InputError(f"{prefix}prompt must be text, got {type(text).__name__}; give a string")
    if not text.strip():
        raise InputError(f"{prefix}prompt is empty; give some text to continue")
    return text


def read_prompt_file(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read the prompts in `path` (see the module docstring for the formats)."""
    path = Path(path)
    text = _read_utf8(path)
    if path.name.lower().endswith(JSONL_SUFFIXES):
        return _parse_jsonl(text, path)
    if not text.strip():
        raise InputError(f"{path}: prompt is empty; write the prompt text into the file")
    return [Prompt(text=text.strip())]


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise InputError(f"prompt file {path} not found; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a prompt file (.txt or .jsonl)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(
            f"cannot read prompt file {path}: {e.strerror or e}; check its permissions"
        ) from None
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: byte offset {e.start + skip} is not valid UTF-8; "
            "the file must be UTF-8 (re-save it as UTF-8)"
        ) from None


def _parse_jsonl(text: str, path: Path) -> list[Prompt]:
    prompts = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other "line breaks".
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{where}: not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        prompts.append(_prompt_from_record(record, where, number))
    if not prompts:
        raise InputError(
            f'{path} has no prompts; write one JSON object per line, e.g. {{"prompt": "..."}}'
        )
    return prompts


def _prompt_from_record(record: object, where: str, number: int) -> Prompt:
    hint = 'give a string "prompt" or a "turns" list of strings'
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {_json_type(record)}; {hint}")
    has_prompt, has_turns = "prompt" in record, "turns" in record
    if has_prompt and has_turns:
        raise InputError(f'{where}: has both "prompt" and "turns"; give only one')
    if has_prompt:
        if not isinstance(record["prompt"], str):
            raise InputError(
                f'{where}: "prompt" must be a string, got {_json_type(record["prompt"])}; {hint}'
            )
        turns = (record["prompt"],)
    elif has_turns:
        value = record["turns"]
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise InputError(f'{where}: "turns" must be a non-empty list of strings; {hint}')
        turns = tuple(value)
    else:
        raise InputError(f'{where}: no "prompt" field; {hint}')
    for i, turn in enumerate(turns, start=1):
        validate_prompt_text(turn, where if len(turns) == 1 else f"{where} turn {i}")
    return Prompt(text=turns[0], turns=turns, source_line=number)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")

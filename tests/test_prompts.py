"""Prompt files: the formats, and one actionable InputError per way a file can be wrong."""

from __future__ import annotations

import json

import pytest

from specbound_runtime.errors import InputError
from specbound_runtime.prompts import Prompt, read_prompt_file, validate_prompt_text


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# Happy paths


def test_plain_text_file_is_one_prompt_with_whitespace_stripped(tmp_path):
    path = write(tmp_path, "p.txt", "  Tell me a story.\n\nAbout a cat.\n")
    assert read_prompt_file(path) == [Prompt(text="Tell me a story.\n\nAbout a cat.")]


def test_file_without_extension_is_plain_text_even_if_it_looks_like_json(tmp_path):
    path = write(tmp_path, "prompt", '{"prompt": "x"}\n')
    assert read_prompt_file(path)[0].text == '{"prompt": "x"}'


def test_jsonl_reads_prompts_and_turns_skipping_blank_lines(tmp_path):
    lines = [
        json.dumps({"prompt": "First?", "id": 7}),
        "",
        "   ",
        json.dumps({"turns": ["Write a poem.", "Now shorten it."]}),
        json.dumps({"prompt": "Ünïcødé \u2028 and a line separator"}),
    ]
    path = write(tmp_path, "p.jsonl", "\r\n".join(lines) + "\n")
    prompts = read_prompt_file(path)
    texts = ["First?", "Write a poem.", "Ünïcødé \u2028 and a line separator"]
    assert [p.text for p in prompts] == texts
    assert [p.source_line for p in prompts] == [1, 4, 5]
    assert prompts[1].turns == ("Write a poem.", "Now shorten it.")
    assert prompts[1].is_multi_turn and not prompts[0].is_multi_turn
    assert prompts[0].turns == ("First?",)


@pytest.mark.parametrize("name", ["p.JSONL", "p.json-lines", "p.ndjson"])
def test_jsonl_extensions(tmp_path, name):
    path = write(tmp_path, name, '{"prompt": "hi"}\n')
    assert read_prompt_file(path) == [Prompt(text="hi", source_line=1)]


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path, "p.txt", b"\xef\xbb\xbfhello")
    assert read_prompt_file(path)[0].text == "hello"


def test_accepts_str_path(tmp_path):
    path = write(tmp_path, "p.txt", "hello")
    assert read_prompt_file(str(path))[0].text == "hello"


# Errors


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(tmp_path / "nope.txt")
    message = one_line_error(excinfo)
    assert "nope.txt" in message and "not found" in message


def test_directory(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(tmp_path)
    assert "is a directory" in one_line_error(excinfo)


@pytest.mark.parametrize(("content", "offset"), [(b"ok\xff rest", 2), (b"\xef\xbb\xbfab\xc3", 5)])
def test_non_utf8_reports_byte_offset(tmp_path, content, offset):
    path = write(tmp_path, "p.txt", content)
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(path)
    message = one_line_error(excinfo)
    assert f"byte offset {offset}" in message and "must be UTF-8" in message


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_plain_text_file(tmp_path, content):
    path = write(tmp_path, "p.txt", content)
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(path)
    assert "prompt is empty" in one_line_error(excinfo)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_without_prompts(tmp_path, content):
    path = write(tmp_path, "p.jsonl", content)
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(path)
    assert "has no prompts" in one_line_error(excinfo)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ('["a list"]', "expected a JSON object, got array"),
        ('{"text": "wrong field"}', 'no "prompt" field'),
        ('{"prompt": 42}', '"prompt" must be a string, got number'),
        ('{"prompt": null}', '"prompt" must be a string, got null'),
        ('{"prompt": "   "}', "prompt is empty"),
        ('{"turns": []}', '"turns" must be a non-empty list of strings'),
        ('{"turns": ["a", 3]}', '"turns" must be a non-empty list of strings'),
        ('{"turns": "a"}', '"turns" must be a non-empty list of strings'),
        ('{"turns": ["a", ""]}', "turn 2: prompt is empty"),
        ('{"prompt": "a", "turns": ["a"]}', "give only one"),
    ],
)
def test_bad_jsonl_line_reports_its_1_based_line_number(tmp_path, bad_line, expected):
    path = write(tmp_path, "p.jsonl", '{"prompt": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(InputError) as excinfo:
        read_prompt_file(path)
    message = one_line_error(excinfo)
    assert "line 3" in message and expected in message


# validate_prompt_text and the dataclass


def test_validate_prompt_text():
    assert validate_prompt_text("hi") == "hi"
    for bad in ["", " ", "\n\t "]:
        with pytest.raises(InputError, match="prompt is empty"):
            validate_prompt_text(bad)
    with pytest.raises(InputError, match="must be text"):
        validate_prompt_text(None)
    with pytest.raises(InputError, match="^here: prompt is empty"):
        validate_prompt_text("", "here")


def test_prompt_is_frozen_and_validated():
    prompt = Prompt(text="a", turns=("a", "b"))
    with pytest.raises(AttributeError):
        prompt.text = "b"  # type: ignore[misc]
    with pytest.raises(InputError):
        Prompt(text=" ")
    with pytest.raises(ValueError):
        Prompt(text="a", turns=("b",))
    with pytest.raises(ValueError):
        Prompt(text="a", source_line=0)

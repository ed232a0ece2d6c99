"""Parsing the three record shapes, JSON and JSONL, mixtures — and every problem located precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvltune.data.files import read_items
from qvltune.data.formats import parse_record
from qvltune.data.mixture import parse_mixture, sample_indices
from qvltune.data.record import Media, RawItem


def parse(value, file="d.jsonl"):
    return parse_record(RawItem(0, 1, value), file)


def codes(problems):
    return sorted((p.code, p.field) for p in problems)


def test_qwen_shape_with_images_system_and_multiturn():
    rec, problems = parse(
        {
            "image": ["a.jpg", "b.jpg"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\n<image>\nCompare."},
                {"from": "gpt", "value": "Same."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        }
    )
    assert problems == []
    assert rec.shape == "qwen"
    assert [m.role for m in rec.messages] == ["system", "user", "assistant", "user", "assistant"]
    user = rec.messages[1].parts
    assert user == [Media("image", "a.jpg", "image[0]"), "\n", Media("image", "b.jpg", "image[1]"), "\nCompare."]
    assert rec.chat()[1]["content"] == [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"}, {"type": "text", "text": "\nCompare."}]


def test_sharegpt_shape_and_video():
    rec, problems = parse(
        {
            "messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "A ball falls."}],
            "videos": [["f1.jpg", "f2.jpg"]],
        }
    )
    assert problems == []
    assert rec.shape == "sharegpt"
    assert rec.videos == [Media("video", ("f1.jpg", "f2.jpg"), "videos[0]")]


def test_hf_chat_shape_and_text_only():
    rec, problems = parse(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ]
        }
    )
    assert problems == [] and rec.shape == "hf-chat" and rec.images[0].source == "x.png"
    rec, problems = parse({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert problems == [] and rec.media == []


@pytest.mark.parametrize(
    "value, expected",
    [
        ([1, 2], [("not-object", "")]),
        ({"text": "x"}, [("unknown-shape", "")]),
        ({"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}, [("bad-role", "conversations[0].from"), ("turn-order", "conversations[0]")]),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, [("turn-order", "conversations[0]"), ("turn-order", "conversations[1]")]),
        ({"conversations": [{"from": "human", "value": "q"}]}, [("no-answer", "conversations")]),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}, [("empty-answer", "conversations[1]")]),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, [("bad-value", "conversations[0].value"), ("turn-order", "conversations[0]")]),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, [("placeholder-count", "image")]),
        ({"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}, [("placeholder-count", "image")]),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}]}, [("placeholder-count", "image"), ("placeholder-in-answer", "conversations[1].value")]),
        # Qwen3-VL's template renders only a system turn's text: its image would shift every later one.
        ({"image": ["s.png", "q.png"], "conversations": [{"from": "system", "value": "<image>Ref"}, {"from": "human", "value": "<image>Same?"}, {"from": "gpt", "value": "Yes"}]}, [("media-in-system", "conversations[0].value")]),
        ({"messages": [{"role": "system", "content": [{"type": "image", "image": "s.png"}, {"type": "text", "text": "Ref"}]}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, [("media-in-system", "messages[0].content[0]")]),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "a"}]}, [("bad-value", "messages[0].content[0].type"), ("empty-turn", "messages[0]")]),
        ({"messages": [{"role": "user", "content": [{"type": "image", "image": 5}]}, {"role": "assistant", "content": "a"}]}, [("bad-media", "messages[0].content[0].image"), ("empty-turn", "messages[0]")]),
    ],
)
def test_problems_are_located(value, expected):
    rec, problems = parse(value)
    assert rec is None
    assert codes(problems) == sorted(expected)
    for p in problems:
        assert p.file == "d.jsonl" and p.line == 1 and p.index == 0 and p.message


def test_system_turn_out_of_place_and_ends_with_user():
    rec, problems = parse(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "more?"}]}
    )
    assert rec is None
    assert ("turn-order", "conversations[1]") in codes(problems)
    assert ("turn-order", "conversations[3]") in codes(problems)


def test_jsonl_lines_and_malformed_lines(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": \n[1]\n')
    items = list(read_items(path))
    assert [(i.index, i.line) for i in items] == [(0, 1), (1, 3), (2, 4)]
    assert items[1].problem.code == "malformed-json" and items[1].problem.line == 3
    assert items[2].value == [1]


def test_json_list_gives_line_numbers(tmp_path: Path):
    path = tmp_path / "d.json"
    records = [{"i": 0}, {"i": 1, "x": [1, 2]}, {"i": 2}]
    path.write_text(json.dumps(records, indent=2))
    items = list(read_items(path))
    assert [i.value for i in items] == records
    lines = path.read_text().splitlines()
    for item in items:
        assert lines[item.line - 1].strip() == "{"
    assert items[2].line > items[1].line > items[0].line


def test_json_list_syntax_error_is_located(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"a": 1},\n{"b": }\n]')
    items = list(read_items(path))
    assert items[0].value == {"a": 1}
    assert items[1].problem.code == "malformed-json" and items[1].problem.line == 3


def test_empty_and_non_utf8_files(tmp_path: Path):
    (tmp_path / "e.jsonl").write_text("  \n")
    assert next(read_items(tmp_path / "e.jsonl")).problem.code == "empty-file"
    (tmp_path / "b.jsonl").write_bytes(b'{"a": "\xff"}\n')
    assert next(read_items(tmp_path / "b.jsonl")).problem.code == "encoding"


def test_mixture_parsing_and_seeded_sampling():
    specs = parse_mixture("a.jsonl%50, b.json")
    assert [(str(s.path), s.percent) for s in specs] == [("a.jsonl", 50.0), ("b.json", 100.0)]
    with pytest.raises(ValueError, match="percentage"):
        parse_mixture("a.jsonl%half")
    with pytest.raises(ValueError):
        parse_mixture("a.jsonl%0")
    half = sample_indices(100, 50, seed=3)
    assert len(half) == 50 and half == sample_indices(100, 50, seed=3) and half != sample_indices(100, 50, seed=4)
    assert len(set(half)) == 50
    more = sample_indices(10, 250, seed=0)
    assert len(more) == 25 and all(more.count(i) >= 2 for i in range(10))


def test_parts_of_a_jsonl_file_number_items_as_one_pass(tmp_path):
    """check-data's workers read byte ranges of a JSONL file on their own: together the ranges give
    exactly the items of one pass (indices, lines, values, problems, byte offsets), whatever the cut."""
    import codecs

    from qvltune.data.files import count_part, jsonl_parts, read_items, read_part

    path = tmp_path / "h.jsonl"
    path.write_bytes(
        codecs.BOM_UTF8 + b"\n   \n" + b'{"a": 1}\r\n' + b"{bad\n" + b"\n" + b'{"b": "\xc3\xa9"}\n' + b'{"c": "\xff"}\n'
        + b'{"d": "\x00"}\n' + b" \t \n" + b"[1,2]\n" + b'{"e": 5}'  # the last line has no line break
    )

    def items(source):
        return [(i.index, i.line, i.value, i.problem and (i.problem.line, i.problem.index, i.problem.code), i.offset) for i in source]

    one = items(read_items(path))
    assert len(one) == 7 and one[-1][:3] == (6, 11, {"e": 5})
    data = path.read_bytes()
    assert all(json.loads(data[offset:].split(b"\n")[0]) == value for _, _, value, problem, offset in one if problem is None)
    for parts in (1, 2, 3, 5, 50):
        ranges = jsonl_parts(path, parts)
        line, index, got = 1, 0, []
        for a, b in ranges:
            got += items(read_part(path, a, b, line, index))
            breaks, records = count_part(path, a, b)
            line, index = line + breaks, index + records
        assert got == one, parts
    (tmp_path / "list.json").write_text('[{"a": 1}]')
    assert jsonl_parts(tmp_path / "list.json", 4) is None  # a JSON list is read in one pass

"""Grounding data: coordinates found in answers, checked against Qwen3-VL's 0-1000 convention,
converted from absolute pixels, and scored by IoU, through the real CLI and real files."""

from __future__ import annotations

import json

import pytest

from conftest import write_image, write_jsonl
from qvltune.cli import main
from qvltune.data.boxes import CoordError, convert_text, find_coordinates, first_box, iou, reference_size


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def box_record(answer: str, image: str = "a.png", question: str = "<image>\nWhere is the cat?"):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"bbox_2d": [10, 20, 300, 400], "label": "cat"}', [("bbox_2d", (10, 20, 300, 400), "cat")]),
        ('[{"bbox_2d": [1, 2, 3, 4]}, {"point_2d": [5, 6], "label": "eye"}]', [("bbox_2d", (1, 2, 3, 4), None), ("point_2d", (5, 6), "eye")]),
        ('The cat is here: ```json\n[{"bbox_2d": [1.5, 2, 3, 4], "label": "cat"}]\n``` and {not json}', [("bbox_2d", (1.5, 2, 3, 4), "cat")]),
        ('{"objects": [{"bbox_2d": [1, 2, 3, 4]}]}', [("bbox_2d", (1, 2, 3, 4), None)]),
        ("no coordinates [1, 2, 3, 4]", []),
    ],
)
def test_finds_boxes_and_points_in_json_lists_and_text(text, expected):
    assert [(c.kind, c.values, c.label) for c in find_coordinates(text)] == expected


def test_malformed_coordinates_are_named():
    with pytest.raises(CoordError, match="4 numbers"):
        find_coordinates('{"bbox_2d": [1, 2, 3]}')
    assert first_box('{"bbox_2d": [1, 2, "x", 4]}') is None


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # an inverted prediction scores nothing


def test_check_data_reports_range_inversion_and_absolute_datasets(tmp_path, capsys):
    write_image(tmp_path / "a.png", (640, 480))
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [
            box_record('{"bbox_2d": [100, 100, 400, 300], "label": "cat"}'),  # 1 fine
            box_record('[{"bbox_2d": [100, 100, 1280, 300]}]'),  # 2 above 1000
            box_record('{"bbox_2d": [400, 100, 100, 300]}'),  # 3 inverted
            box_record('{"point_2d": [-5, 20]}'),  # 4 negative
            box_record('{"bbox_2d": [1, 2, 3]}'),  # 5 malformed
        ],
    )
    code, out, _ = run_cli(["check-data", str(data), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1
    by_line = {(p["line"], p["code"]) for p in doc["problems"]}
    assert {(2, "boxes-range"), (3, "boxes-inverted"), (4, "boxes-range"), (5, "bad-coordinates")} <= by_line
    assert not any(p["line"] == 1 for p in doc["problems"])
    assert doc["valid_records"] == 1  # a record Qwen3-VL would misread is not used
    above = next(p for p in doc["problems"] if p["line"] == 2)
    assert "image 640x480" in above["message"] and "convert-boxes" in above["fix"]
    assert any(p["code"] == "boxes-absolute" and p["line"] is None for p in doc["problems"])


def test_dataset_whose_boxes_match_pixel_sizes_looks_absolute(tmp_path, capsys):
    # Pixel boxes on small images never exceed 1000, but always fit inside the image's pixel size.
    write_image(tmp_path / "a.png", (320, 240))
    pixel = [box_record(json.dumps({"bbox_2d": [10 * i, 10, 200 + 10 * i, 230]})) for i in range(6)]
    code, out, _ = run_cli(["check-data", str(write_jsonl(tmp_path / "pixels.jsonl", pixel)), "--json"], capsys)
    doc = json.loads(out)
    warned = [p for p in doc["problems"] if p["code"] == "boxes-absolute"]
    assert len(warned) == 1 and "320x240" in warned[0]["message"] and doc["coordinates"]["count"] == 6
    # The same boxes written relative to the image overshoot its pixel size: no verdict.
    relative = [box_record(json.dumps({"bbox_2d": [100 * i, 40, 600 + 50 * i, 950]})) for i in range(6)]
    code, out, _ = run_cli(["check-data", str(write_jsonl(tmp_path / "rel.jsonl", relative))], capsys)
    assert code == 0 and "looks like absolute" not in out and "6 in 6 records" in out
    # Relative boxes that all happen to sit in the top-left corner fit the pixel size too, but never
    # reach the image's far edge in pixels: no verdict either.
    corner = [box_record(json.dumps({"bbox_2d": [10 * i, 10, 100 + 10 * i, 120]})) for i in range(6)]
    code, out, _ = run_cli(["check-data", str(write_jsonl(tmp_path / "corner.jsonl", corner))], capsys)
    assert code == 0 and "looks like absolute" not in out


def test_convert_boxes_from_pixels_writes_a_new_file(tmp_path, capsys):
    write_image(tmp_path / "imgs" / "a.png", (640, 480))
    records = [
        box_record('Here: [{"bbox_2d": [64, 48, 320, 480], "label": "cat"}, {"point_2d": [640, 0]}] done', image="imgs/a.png"),
        box_record("no box here", image="imgs/a.png"),
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"}, {"type": "text", "text": 'Is {"bbox_2d": [0, 0, 64, 48]} a cat?'}]}, {"role": "assistant", "content": "yes"}]},
    ]
    src = write_jsonl(tmp_path / "train.jsonl", records)
    before = src.read_bytes()
    out = tmp_path / "fixed.jsonl"
    code, stdout, err = run_cli(["convert-boxes", str(src), "--out", str(out)], capsys)
    assert code == 0, stdout + err
    assert src.read_bytes() == before  # the input is never touched
    fixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert fixed[0]["conversations"][1]["value"] == 'Here: [{"bbox_2d": [100, 100, 500, 1000], "label": "cat"}, {"point_2d": [1000, 0]}] done'
    assert fixed[1] == records[1]
    assert fixed[2]["messages"][0]["content"][1]["text"] == 'Is {"bbox_2d": [0, 0, 100, 100]} a cat?'
    assert "converted 3 box(es)/point(s) in 2 of 3 records" in stdout
    # the converted file passes check-data; refusing to overwrite without --force, or the input itself
    assert run_cli(["check-data", str(out)], capsys)[0] == 0
    code, _, err = run_cli(["convert-boxes", str(src), "--out", str(out)], capsys)
    assert code == 1 and "already exists" in err
    code, _, err = run_cli(["convert-boxes", str(src), "--out", str(src), "--force"], capsys)
    assert code == 1 and "is the input file" in err and src.read_bytes() == before


def test_convert_boxes_reads_gzip_and_keeps_a_bom_json_list_a_list(tmp_path, capsys):
    """It converted everything, then failed writing ("unexpected UnicodeDecodeError") on a .jsonl.gz,
    and wrote a JSON list that began with a byte-order mark back as JSONL."""
    import gzip

    write_image(tmp_path / "a.png", (640, 480))
    record = box_record('[{"bbox_2d": [64, 48, 320, 480]}]', image="a.png")
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(record) + "\n")
    code, stdout, err = run_cli(["convert-boxes", str(tmp_path / "train.jsonl.gz"), "--out", str(tmp_path / "fixed.jsonl.gz")], capsys)
    assert code == 0, stdout + err
    with gzip.open(tmp_path / "fixed.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["conversations"][1]["value"] == '[{"bbox_2d": [100, 100, 500, 1000]}]'
    (tmp_path / "list.json").write_text("\ufeff" + json.dumps([record]), encoding="utf-8")
    code, stdout, err = run_cli(["convert-boxes", str(tmp_path / "list.json"), "--out", str(tmp_path / "fixed.json")], capsys)
    assert code == 0, stdout + err
    assert isinstance(json.loads((tmp_path / "fixed.json").read_text()), list)


def test_convert_from_qwen25_resized_pixels_and_refusals(tmp_path, capsys):
    write_image(tmp_path / "a.png", (1000, 700))
    w, h = reference_size(1000, 700, "qwen25")
    assert (w % 28, h % 28) == (0, 0) and (w, h) != (1000, 700)
    assert convert_text(json.dumps({"bbox_2d": [0, 0, w, h // 2]}), (w, h))[0] == '{"bbox_2d": [0, 0, 1000, 500]}'
    src = write_jsonl(tmp_path / "q25.jsonl", [box_record(json.dumps({"bbox_2d": [0, 0, w, h]}))])
    code, out, err = run_cli(["convert-boxes", str(src), "--out", str(tmp_path / "o.jsonl"), "--from", "qwen25"], capsys)
    assert code == 0 and json.loads((tmp_path / "o.jsonl").read_text())["conversations"][1]["value"] == '{"bbox_2d": [0, 0, 1000, 1000]}'
    # a coordinate beyond the image, and a record with two images: nothing is written, each is named
    write_image(tmp_path / "b.png", (100, 100))
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [box_record('{"bbox_2d": [0, 0, 1500, 10]}'), box_record('{"bbox_2d": [0, 0, 5, 5]}', image=["a.png", "b.png"], question="<image><image>where?")],
    )
    code, out, err = run_cli(["convert-boxes", str(bad), "--out", str(tmp_path / "never.jsonl")], capsys)
    assert code == 1 and not (tmp_path / "never.jsonl").exists()
    assert "bad.jsonl:1" in out and "outside the image (1000x700 px)" in out
    assert "bad.jsonl:2" in out and "2 images" in out
    code, _, _ = run_cli(["convert-boxes", str(bad), "--out", str(tmp_path / "x.jsonl"), "--from", "meters"], capsys)
    assert code == 2


def test_eval_scores_box_answers_by_iou(tmp_path, tiny_model_dir, capsys):
    write_image(tmp_path / "a.png", (64, 64))
    recs = [box_record('{"bbox_2d": [0, 0, 500, 500]}') | {"question_type": "box"}, box_record("red", question="<image>\nColour?")]
    data = write_jsonl(tmp_path / "e.jsonl", recs)
    code, out, err = run_cli(["eval", "builtin:tiny", "--data", str(data), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    # the box answer is scored by IoU, not by exact match; the colour answer by exact match
    assert doc["short_answers"] == 1 and doc["boxes"]["n"] == 1 and doc["by_type"]["box"]["n"] == 1
    got = next(e for e in doc["examples"] if "iou" in e)["got"]
    predicted = first_box(got)
    expected = iou((0, 0, 500, 500), predicted) if predicted else 0.0
    assert doc["boxes"]["mean_iou"] == pytest.approx(expected)
    assert doc["boxes"]["accuracy_iou50"] == float(expected >= 0.5)
    code, out, _ = run_cli(["eval", "builtin:tiny", "--data", str(data)], capsys)
    assert "boxes: mean IoU" in out and "IoU >= 0.5" in out

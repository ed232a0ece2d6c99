"""``qvltune check-data`` on real files with every kind of problem, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_image, write_jsonl
from qvltune.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def qa(image, question="<image>\nWhat colour?", answer="red", key="image"):
    rec = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec[key] = image
    return rec


@pytest.fixture
def broken_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image(root / "ok.png", (120, 80))
    write_image(root / "ok2.jpg", (60, 90), fmt="JPEG")
    (root / "dir.png").mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image at all")
    from PIL import Image

    Image.effect_noise((256, 256), 64).convert("RGB").save(root / "noise.jpg", quality=95)
    data = (root / "noise.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])  # header intact, pixels cut
    write_image(root / "thin.png", (2000, 5))
    write_image(tmp_path / "outside.png")
    lines = [
        qa("ok.png"),  # 1 fine
        "{not json",  # 2
        json.dumps([1, 2]),  # 3 not an object
        qa("missing.png"),  # 4
        qa("dir.png"),  # 5
        qa("empty.png"),  # 6
        qa("text.png"),  # 7
        qa("thin.png"),  # 8 aspect ratio
        qa("../outside.png"),  # 9 escapes the root
        qa("ok.png", question="What colour?"),  # 10 placeholder count
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>q"}], "image": "ok.png"},  # 11 order
        qa("ok.png"),  # 12 duplicate of 1 (warning)
        qa("truncated.jpg"),  # 13 only caught by --deep
        qa(None, question="Long " * 400, answer="x"),  # 14 too long
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # 15 fine, text only
    ]
    return write_jsonl(root / "train.jsonl", lines)


def test_reports_every_problem_with_line_and_field(broken_dataset, capsys):
    code, out, err = run_cli(["check-data", str(broken_dataset), "--json", "--max-seq-length", "256"], capsys)
    assert code == 1
    doc = json.loads(out)  # --json prints only JSON
    by_line = {(p["line"], p["code"]) for p in doc["problems"]}
    assert by_line >= {
        (2, "malformed-json"),
        (3, "not-object"),
        (4, "missing-media"),
        (5, "media-is-dir"),
        (6, "empty-media"),
        (7, "not-image"),
        (8, "aspect-ratio"),
        (9, "outside-root"),
        (10, "placeholder-count"),
        (11, "turn-order"),
        (12, "duplicate"),
        (14, "too-long"),
    }
    assert not any(p["line"] in (1, 13, 15) for p in doc["problems"])
    dup = next(p for p in doc["problems"] if p["code"] == "duplicate")
    assert dup["severity"] == "warning" and "train.jsonl:1" in dup["message"]
    media = next(p for p in doc["problems"] if p["code"] == "missing-media")
    assert media["field"] == "image[0]" and media["fix"]
    assert doc["records"] == 15 and doc["valid_records"] == 4  # lines 1, 12, 13, 15
    assert doc["tokens"]["too_long"] == 1  # line 14: counted in the length summary, not valid
    assert doc["image_sizes"]["count"] == 3  # lines 1, 12, 13


def test_deep_catches_truncated_images(broken_dataset, capsys):
    code, out, _ = run_cli(["check-data", str(broken_dataset), "--json", "--deep"], capsys)
    assert (13, "corrupt-image") in {(p["line"], p["code"]) for p in json.loads(out)["problems"]}


def test_clean_dataset_summary_and_exit_codes(demo_data, capsys, tmp_path):
    train, _ = demo_data
    code, out, err = run_cli(["check-data", str(train), "--model", "builtin:tiny"], capsys)
    assert code == 0, out + err
    assert "OK: 64 records ready" in out and "suggested max_seq_length" in out and "p99" in out
    assert "exact (builtin:tiny)" in out
    # warnings fail only with --strict
    dup = write_jsonl(tmp_path / "dup.jsonl", [qa(None, "q", "a"), qa(None, "q", "a")])
    assert run_cli(["check-data", str(dup)], capsys)[0] == 0
    assert run_cli(["check-data", str(dup), "--strict"], capsys)[0] == 1


def test_exact_counts_match_training_lengths(demo_data, capsys, tiny_processor):
    from qvltune.data.files import read_items
    from qvltune.data.formats import parse_record
    from qvltune.data.tokenize import Encoder

    train, _ = demo_data
    code, out, _ = run_cli(["check-data", str(train), "--model", "builtin:tiny", "--json"], capsys)
    doc = json.loads(out)
    enc = Encoder(tiny_processor)
    lengths = [len(enc.encode(parse_record(item, str(train))[0])) for item in read_items(train)]
    assert doc["tokens"]["max"] == max(lengths) and doc["tokens"]["per_epoch"] == sum(lengths)


def test_mixture_and_usage_errors(demo_data, capsys, tmp_path):
    train, evals = demo_data
    code, out, _ = run_cli(["check-data", f"{train}%50,{evals}", "--json"], capsys)
    assert code == 0 and json.loads(out)["files"] == [str(train), str(evals)]
    code, _, err = run_cli(["check-data", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 1
    code, _, err = run_cli(["check-data", str(train), "--min-pixels", "5000", "--min-image-tokens", "4"], capsys)
    assert code == 1 and "Error:" in err and "Traceback" not in err
    code, _, err = run_cli(["check-data"], capsys)
    assert code == 2


def test_video_frames_checked(tmp_path, capsys):
    for i in range(3):
        write_image(tmp_path / "clip" / f"{i}.png", (64, 64))
    write_image(tmp_path / "odd" / "0.png", (64, 64))
    write_image(tmp_path / "odd" / "1.png", (32, 64))
    path = write_jsonl(
        tmp_path / "v.jsonl",
        [qa("clip", "<video>What?", key="video"), qa("odd", "<video>What?", key="video"), qa("nothing", "<video>What?", key="video")],
    )
    code, out, _ = run_cli(["check-data", str(path), "--json"], capsys)
    doc = json.loads(out)
    assert {(p["line"], p["code"]) for p in doc["problems"]} == {(2, "frame-sizes"), (3, "no-video-decoder" if not _has_av() else "missing-media")} or (3, "missing-media") in {(p["line"], p["code"]) for p in doc["problems"]}
    assert doc["videos"] == 1


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_workers_give_the_same_report(broken_dataset, tmp_path, monkeypatch):
    """Records checked in several processes, in chunks, merge into exactly the one-process report
    (problems in order, duplicates across chunks, box verdicts, token statistics)."""
    import qvltune.data.check as check
    import qvltune.data.check_parts as check_parts

    write_image(tmp_path / "a.png", (640, 480))
    boxes = write_jsonl(tmp_path / "boxes.jsonl", [qa("a.png", answer=f'{{"bbox_2d": [10, 10, {900 + i}, 300]}}') for i in range(7)] + [qa("a.png", answer='{"bbox_2d": [10, 10, 1900, 300]}')])
    monkeypatch.setattr(check_parts, "CHUNK", 3)  # several chunks per worker, duplicates across chunks
    monkeypatch.setattr(check_parts, "PART_BYTES", 300)  # JSONL files: several byte ranges, each read by a worker
    spec = f"{broken_dataset},{boxes}"
    one = check.check_dataset(spec).to_json()
    two = check.check_dataset(spec, workers=2).to_json()
    assert one == two
    assert one["records"] == 23 and any(p["code"] == "duplicate" for p in one["problems"]) and one["coordinates"]["count"] == 8

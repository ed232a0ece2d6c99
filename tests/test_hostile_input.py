"""Hostile and odd input on real files: one bad record never stops check-data or training, no path
leaves the image root, odd but valid files are read the same way everywhere."""

from __future__ import annotations

import codecs
import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image, write_jsonl
from hostile_files import write_bomb, write_lying_png, write_zero_pixel_png
from qvltune.cli import main
from qvltune.config import parse_config
from qvltune.data import files
from qvltune.data.dataset import Entry, SFTDataset, prepare_data
from qvltune.data.files import read_items
from qvltune.data.media import MediaError, load_image, resolve
from qvltune.data.tokenize import Encoder
from qvltune.errors import UserError


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def qa(image=None, key="image", placeholder="<image>", answer="red"):
    rec = {"conversations": [{"from": "human", "value": f"{placeholder}\nWhat colour?" if image is not None else "What colour?"}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec[key] = image
    return rec


def check(path: Path, capsys, *args: str) -> tuple[int, dict]:
    code, out, err = run_cli(["check-data", str(path), "--json", *args], capsys)
    assert "unexpected" not in err and "Traceback" not in err, err
    return code, json.loads(out)


def problems(doc) -> set[tuple[int | None, str]]:
    return {(p["line"], p["code"]) for p in doc["problems"]}


# ---------------------------------------------------------------------------------------------
# Images


def test_decompression_bomb_is_one_record_error_and_the_limit_can_be_raised(tmp_path, capsys):
    root = tmp_path / "data"
    write_bomb(root / "bomb.png")  # 20000 x 20000, ~50 KB
    write_image(root / "ok.png")
    data = write_jsonl(root / "train.jsonl", [qa("ok.png"), qa("bomb.png"), qa("ok.png", answer="blue")])
    code, doc = check(data, capsys)
    assert code == 1
    bomb = next(p for p in doc["problems"] if p["code"] == "image-too-large")
    assert bomb["line"] == 2 and bomb["field"] == "image[0]" and bomb["path"].endswith("bomb.png")
    assert "400,000,000 pixels" in bomb["message"] and "178,956,970" in bomb["message"] and "--image-pixel-limit" in bomb["fix"]
    assert doc["records"] == 3 and doc["valid_records"] == 2 and doc["failures"] == {"image-too-large": 1}
    code, doc = check(data, capsys, "--image-pixel-limit", str(400_000_000))
    assert code == 0 and doc["valid_records"] == 3 and doc["image_sizes"]["width"]["max"] == 20000


def test_zero_one_pixel_and_lying_headers(tmp_path, capsys):
    root = tmp_path / "data"
    write_zero_pixel_png(root / "zero.png")
    write_image(root / "one.png", (1, 1))
    write_lying_png(root / "lie.png", claimed=(400, 400), real=(10, 10))
    data = write_jsonl(root / "train.jsonl", [qa("zero.png"), qa("one.png"), qa("lie.png")])
    code, doc = check(data, capsys, "--deep")
    assert code == 1
    found = problems(doc)
    assert (1, "not-image") in found and (2, "tiny-image") in found and (3, "corrupt-image") in found
    assert doc["valid_records"] == 1  # the one-pixel image is usable (scaled up), with a warning
    # Without --deep the lying header passes the check; decoding it (training, inference) is refused by name.
    with pytest.raises(MediaError, match="corrupt image") as e:
        load_image(root / "lie.png")
    assert e.value.path.endswith("lie.png")


def test_16_bit_palette_and_animated_images_are_read_one_way(tmp_path, capsys, tiny_processor):
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(np.full((40, 60), 32768, dtype=np.uint16)).save(root / "deep.png")  # 16-bit grey, half intensity
    assert Image.open(root / "deep.png").mode.startswith("I")
    pal = Image.new("P", (60, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 30, 40))
    pal.save(root / "pal.png", transparency=0)  # left half red, right half transparent
    frames = [Image.new("RGB", (48, 48), c) for c in ((0, 0, 255), (0, 255, 0), (255, 0, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    grey = load_image(root / "deep.png").getpixel((5, 5))
    assert grey[0] == grey[1] == grey[2] and 120 <= grey[0] <= 136  # scaled to 8 bits, not clipped to white
    assert load_image(root / "pal.png").getpixel((10, 10)) == (255, 0, 0)
    assert load_image(root / "pal.png").getpixel((50, 10)) == (255, 255, 255)  # transparency on white
    for name in ("anim.gif", "anim.webp"):
        assert load_image(root / name).getpixel((10, 10))[2] > 200  # the first (blue) frame
    data = write_jsonl(root / "train.jsonl", [qa("deep.png"), qa("pal.png"), qa("anim.gif"), qa("anim.webp")])
    code, doc = check(data, capsys, "--deep")
    assert code == 0 and doc["valid_records"] == 4
    animated = [p for p in doc["problems"] if p["code"] == "animated-image"]
    assert [(p["line"], p["severity"]) for p in animated] == [(3, "warning"), (4, "warning")] and "3 frames" in animated[0]["message"]


def test_exif_orientation_is_applied_alike_in_check_count_training_and_inference(tmp_path, capsys, tiny_processor):
    root = tmp_path / "data"
    root.mkdir()
    im = Image.new("RGB", (96, 32), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the model sees 32 x 96
    im.save(root / "rot.jpg", exif=exif)
    data = write_jsonl(root / "train.jsonl", [qa("rot.jpg")])
    code, doc = check(data, capsys, "--model", "builtin:tiny")
    assert code == 0
    assert doc["image_sizes"]["width"]["max"] == 32 and doc["image_sizes"]["height"]["max"] == 96
    from qvltune.data.formats import parse_record

    record = parse_record(next(read_items(data)), str(data))[0]
    enc = Encoder(tiny_processor)
    assert load_image(root / "rot.jpg").size == (32, 96)
    images, _, _ = enc.load_media(record)  # what inference (qvltune predict/eval) feeds the model
    assert images[0].size == (32, 96)
    encoded = enc.encode(record)  # what training feeds the model
    assert doc["tokens"]["max"] == len(encoded)
    t, h, w = encoded.image_grid_thw[0].tolist()
    assert h > w  # portrait, as displayed


# ---------------------------------------------------------------------------------------------
# Videos


def _write_video(path: Path, frames: int) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # writes the header even when no frame follows
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_videos_unreadable_empty_mixed_and_too_short(tmp_path, capsys):
    pytest.importorskip("av")
    root = tmp_path / "data"
    root.mkdir()
    (root / "text.mp4").write_text("not a video")
    _write_video(root / "empty.mp4", 0)
    _write_video(root / "one.mp4", 1)
    _write_video(root / "fine.mp4", 6)
    write_image(root / "single" / "0.png", (64, 64))
    write_image(root / "a.png", (64, 64))
    write_image(root / "b.png", (32, 64))
    vid = lambda src: qa(src, key="video", placeholder="<video>")  # noqa: E731
    data = write_jsonl(root / "train.jsonl", [vid("text.mp4"), vid("empty.mp4"), vid("one.mp4"), vid("single"), vid([["a.png", "b.png"]]), vid("fine.mp4")])
    code, doc = check(data, capsys)
    assert code == 1
    assert problems(doc) == {(1, "corrupt-video"), (2, "corrupt-video"), (3, "too-few-frames"), (4, "too-few-frames"), (5, "frame-sizes")}
    assert doc["records"] == 6 and doc["valid_records"] == 1 and doc["videos"] == 1


# ---------------------------------------------------------------------------------------------
# Files


def test_bom_utf16_nul_and_invalid_utf8(tmp_path, capsys):
    good = json.dumps(qa()) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + good.encode() * 2)
    code, doc = check(tmp_path / "bom.jsonl", capsys)
    assert code == 0 and doc["valid_records"] == 2
    for encoding, label in (("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 (big-endian)")):
        path = tmp_path / f"{encoding}.jsonl"
        path.write_bytes(good.encode(encoding))
        code, out, err = run_cli(["check-data", str(path)], capsys)
        assert code == 1 and label in out and "not UTF-8" in out and "iconv" in out
        assert "Dataset" not in out  # nothing could be read: no table of zeros
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(good.encode() + b'{"conversations": "\x00"}\n' + b'{"conversations": "caf\xe9"}\n' + good.encode().replace(b"red", b"blue"))
    code, doc = check(mixed, capsys)
    assert code == 1 and problems(doc) == {(2, "nul-byte"), (3, "encoding")}
    assert doc["records"] == 4 and doc["valid_records"] == 2
    assert "byte 0xe9 at column" in next(p["message"] for p in doc["problems"] if p["line"] == 3)


def test_a_2gb_line_is_skipped_without_being_loaded(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"conversations": "')
        f.seek(2 * 1024**3)  # a sparse 2 GiB run of NUL bytes: no disk, but every byte is read
        f.write(b'"}\n' + json.dumps(qa()).encode() + b"\n")
    tracemalloc.start()
    try:
        items = list(read_items(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024**2  # bounded by one record (32 MiB) and the skip buffer, not by the 2 GiB line
    assert [(i.line, i.problem.code if i.problem else None) for i in items] == [(1, "line-too-long"), (2, None)]
    assert "2,147,483," in items[0].problem.message and items[1].value == qa()


def test_a_huge_json_list_is_streamed_with_exact_lines(tmp_path, monkeypatch):
    records = [{"i": i, "conversations": [{"from": "human", "value": "x" * (400 + i % 50)}, {"from": "gpt", "value": f"{i}"}], "n": i * 1.5} for i in range(30000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, indent=1))
    tracemalloc.start()
    try:
        count = 0
        for item in read_items(path):
            assert item.value["i"] == count
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert count == 30000 and size > 15 * 1024**2 and peak < size / 3  # never the whole file at once
    # Tiny chunks cut records, strings and numbers at every possible place: values and lines stay exact.
    monkeypatch.setattr(files, "CHUNK", 7)
    small = tmp_path / "small.json"
    small.write_text(json.dumps(records[:40], indent=2) + "\n")
    lines = small.read_text().splitlines()
    items = list(read_items(small))
    assert [i.value for i in items] == records[:40]
    assert all(lines[i.line - 1].strip() == "{" and f'"i": {i.index},' in lines[i.line] for i in items)


def test_gzip_jsonl_read_directly(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    lines = [json.dumps(qa("a.png")), json.dumps(qa("a.png", answer="blue")), "{broken"]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    code, doc = check(tmp_path / "train.jsonl.gz", capsys)
    assert doc["records"] == 3 and doc["valid_records"] == 2 and problems(doc) == {(3, "malformed-json")}
    data = (tmp_path / "train.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) - 12])  # truncated archive
    code, doc = check(tmp_path / "cut.jsonl.gz", capsys)
    assert code == 1 and any(p["code"] == "corrupt-gzip" for p in doc["problems"])


# ---------------------------------------------------------------------------------------------
# Paths


@pytest.fixture
def layout(tmp_path):
    """data/imgs (the image root) with links pointing inside and outside it, and a secret outside."""
    outside = tmp_path / "elsewhere"
    write_image(outside / "secret.png")
    write_image(outside / "frames" / "0.png")
    write_image(outside / "frames" / "1.png")
    root = tmp_path / "data" / "imgs"
    write_image(root / "ok.png")
    write_image(root / "sub" / "in.png")
    write_image(root / "clip" / "0.png")
    (root / "clip" / "1.png").symlink_to(outside / "secret.png")  # a frame that leaves the root
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside / "frames")
    (root / "inner.png").symlink_to(root / "sub" / "in.png")  # a link that stays inside: fine
    return tmp_path, root, outside


def test_paths_resolve_links_and_dots_before_the_root_check(layout, capsys):
    tmp_path, root, outside = layout
    recs = [
        qa("ok.png"),  # 1
        qa("link.png"),  # 2 symlinked file pointing outside
        qa("linkdir/0.png"),  # 3 symlinked folder pointing outside
        qa("inner.png"),  # 4 link inside the root
        qa("sub/../../../elsewhere/secret.png"),  # 5 dots
        qa(str(root / "ok.png")),  # 6 absolute, inside
        qa(str(outside / "secret.png")),  # 7 absolute, outside
        qa("sub\\in.png"),  # 8 Windows separators: normalised
        qa("C:\\data\\in.png"),  # 9 Windows drive
        qa(f"file://{root / 'sub' / 'in.png'}"),  # 10 file URL
        qa("https://example.com/a.png"),  # 11
        qa("clip", key="video", placeholder="<video>"),  # 12 a frame of the folder links outside
        qa("linkdir", key="video", placeholder="<video>"),  # 13 the folder itself links outside
    ]
    data = write_jsonl(tmp_path / "data" / "train.jsonl", recs)
    code, doc = check(data, capsys, "--image-root", str(root))
    assert code == 1
    assert problems(doc) == {(2, "outside-root"), (3, "outside-root"), (5, "outside-root"), (7, "outside-root"), (9, "windows-path"), (11, "remote-media"), (12, "outside-root"), (13, "outside-root")}
    assert "through a symlink" in next(p["message"] for p in doc["problems"] if p["line"] == 2)
    assert "download the files first" in next(p["fix"] for p in doc["problems"] if p["line"] == 11)
    # A symlinked image root is the user's choice: allowed.
    (tmp_path / "rootlink").symlink_to(root)
    assert resolve("ok.png", tmp_path / "rootlink") == root / "ok.png"
    with pytest.raises(MediaError):
        resolve("link.png", tmp_path / "rootlink")
    code, doc = check(data, capsys, "--image-root", str(tmp_path / "rootlink"))
    assert {line for line, _ in problems(doc)} == {2, 3, 5, 7, 9, 11, 12, 13}
    code, doc = check(data, capsys, "--image-root", str(root), "--allow-outside-root")
    assert {line for line, _ in problems(doc)} == {9, 11}


def _cfg(data: Path, tmp_path: Path, **data_keys):
    return parse_config({"name": "hostile", "output_dir": str(tmp_path / "runs"), "model": {"path": "builtin:tiny"}, "data": {"train": str(data), "max_seq_length": 512, **data_keys}})


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_training_data_follows_on_bad_sample_for_hostile_records(layout, tiny_processor, policy):
    tmp_path, root, outside = layout
    write_bomb(root / "bomb.png")
    data = write_jsonl(root / "train.jsonl", [qa("ok.png"), qa("link.png"), qa("bomb.png"), qa("sub/in.png", answer="blue"), "{bad json"])
    cfg = _cfg(data, tmp_path, on_bad_sample=policy)
    if policy == "error":
        with pytest.raises(UserError) as e:
            prepare_data(cfg, tiny_processor)
        assert "3 problem(s)" in e.value.message and "train.jsonl:2" in e.value.message and "outside the image root" in e.value.message
        assert "400,000,000 pixels" in e.value.message and "train.jsonl:5" in e.value.message
        return
    index = prepare_data(cfg, tiny_processor)
    assert [e.index for e in index.train] == [0, 3]
    assert [(s["line"], s["code"]) for s in index.skipped] == [(2, "outside-root"), (3, "image-too-large"), (5, "malformed-json")]
    # A file turned hostile after the check (here: swapped for a bomb) is skipped during training too.
    write_bomb(root / "sub" / "in.png")
    log = tmp_path / "skipped.jsonl"
    ds = SFTDataset(index.train, Encoder(tiny_processor, root=root), [[0], [1]], "skip", log)
    assert len(ds[0]) == 1 and ds[1] == []
    entry = json.loads(log.read_text())
    assert entry["line"] == 4 and entry["during"] == "training" and "400,000,000 pixels" in entry["problem"]


def test_training_error_policy_names_the_record_that_turned_bad(tmp_path, tiny_processor):
    from qvltune.data.dataset import BadSampleError

    write_image(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "train.jsonl", [qa("a.png")])
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = SFTDataset([Entry(str(data), 0, 10, 2)], Encoder(tiny_processor), [[0]], "error")
    with pytest.raises(BadSampleError, match=r"train.jsonl:1 image\[0\]: .*a.png"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# One record never stops the pass; output people can read


def test_a_bug_on_one_record_is_reported_on_it_and_the_pass_goes_on(tmp_path, capsys, monkeypatch):
    """The safety net for bugs of our own: planted here by making token estimation fail on one record."""
    import qvltune.data.check_record as check_mod

    real = check_mod.estimate_tokens

    def buggy(record, *args):
        if record.line == 2:
            raise KeyError("planted")
        return real(record, *args)

    monkeypatch.setattr(check_mod, "estimate_tokens", buggy)
    data = write_jsonl(tmp_path / "t.jsonl", [qa(answer=str(i)) for i in range(3)])
    code, doc = check(data, capsys)
    assert code == 1 and doc["records"] == 3 and doc["valid_records"] == 2
    bug = doc["problems"][0]
    assert (bug["line"], bug["code"]) == (2, "internal-error") and "KeyError" in bug["message"] and "report" in bug["fix"]


def test_repeated_problems_are_grouped_for_people_and_kept_in_json(tmp_path, capsys, monkeypatch):
    for i in range(300):
        write_image(tmp_path / "data" / "imgs" / f"{i}.png", (40, 40), (i % 250, 0, 0))
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [qa(f"{i}.png") for i in range(300)] + [qa("nope.png")])
    code, out, err = run_cli(["check-data", str(data), "--image-root", str(tmp_path / "data" / "wrong")], capsys)
    assert code == 1
    lines = [ln for ln in out.splitlines() if "image not found" in ln]
    assert len(lines) == 1, out
    assert f"image not found: 301 records, e.g. {data}:1, :2, :3 ... (all under {tmp_path / 'data' / 'wrong'}/)" in lines[0]
    assert "301 failed" in out and "missing-media: 301" in out
    code, doc = check(data, capsys, "--image-root", str(tmp_path / "data" / "wrong"))
    assert len([p for p in doc["problems"] if p["code"] == "missing-media"]) == 301
    # Fewer than four of a kind stay one line each, paths shown relative to the working directory.
    write_jsonl(tmp_path / "few.jsonl", [qa("x.png"), qa("y.png")])
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["check-data", "few.jsonl"], capsys)
    assert "few.jsonl:1 (record 0) image[0]: image not found: x.png — fix the path" in out and "few.jsonl:2 (record 1)" in out


def test_missing_dataset_file_is_one_clear_error(tmp_path, capsys):
    code, out, err = run_cli(["check-data", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 1 and out == ""
    assert f"Error: dataset file not found: {tmp_path / 'nope.jsonl'} (not found)" in err and "Hint:" in err
    code, out, err = run_cli(["check-data", f"{tmp_path}"], capsys)
    assert code == 1 and "a directory, not a dataset file" in err


def test_turn_order_grammar(tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "again"}, {"from": "gpt", "value": "a"}]}])
    code, doc = check(data, capsys)
    assert "expected an assistant turn here" in doc["problems"][0]["message"]


def test_skip_never_drops_what_a_file_cut_short_leaves_unread(tmp_path, tiny_processor):
    """on_bad_sample: skip drops bad records. A truncated archive read as one bad record trained on
    whatever came before the cut and said "skipping 1 bad record"."""
    write_image(tmp_path / "a.png")
    lines = [json.dumps(qa("a.png", answer=f"colour {i}")) for i in range(40)]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    data = (tmp_path / "train.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        prepare_data(_cfg(tmp_path / "cut.jsonl.gz", tmp_path, on_bad_sample="skip"), tiny_processor)
    assert "corrupt or truncated" in e.value.message and "not what a file cut short leaves unread" in e.value.message

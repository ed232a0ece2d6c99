"""Video: frame sampling (fps, min/max frames, a token budget) and the timestamps Qwen3-VL's processor
writes between frame groups, counted exactly: check-data's count is what training feeds, and what
the processor itself produces when it samples the video."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_image, write_jsonl
from qvltune.data.formats import parse_record
from qvltune.data.record import RawItem
from qvltune.data.tokenize import Encoder
from qvltune.data.video import VideoSampling, file_indices, list_indices


def record(value, file):
    rec, problems = parse_record(RawItem(0, 1, value), str(file))
    assert not problems, problems
    return rec


def write_video(path: Path, frames: int, fps: int, size=(96, 64)) -> Path:
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            image[..., 0] = (i * 15) % 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_record(source, question="<video>What changes?"):
    return {"video": source, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "It gets redder."}]}


def test_sampling_rules():
    s = VideoSampling(fps=2.0)
    assert file_indices(16, 8.0, s) == [0, 5, 10, 15]  # 2 s at 2 fps
    assert len(file_indices(300, 30.0, VideoSampling(fps=2.0, max_frames=8))) == 8  # 10 s capped at 8
    assert len(file_indices(6, 30.0, VideoSampling(fps=2.0, min_frames=4))) == 4  # 0.2 s raised to 4
    assert list_indices(5, s) == [0, 1, 2, 3, 4] and list_indices(9, VideoSampling(max_frames=3)) == [0, 4, 8]


CASES = [
    # (kind, frames in the source, its fps, sampling)
    ("file", 16, 8, VideoSampling(fps=2.0)),
    ("file", 30, 10, VideoSampling(fps=2.0, max_frames=4)),
    ("file", 9, 3, VideoSampling(fps=1.0, min_frames=4)),
    ("file", 24, 12, VideoSampling(fps=4.0, max_tokens=20)),
    ("folder", 5, None, VideoSampling(fps=2.0)),
    ("list", 7, None, VideoSampling(fps=1.0, max_frames=4)),
    ("list", 6, None, VideoSampling(fps=2.0, max_tokens=12)),
]


@pytest.mark.parametrize("kind, n, rate, sampling", CASES)
def test_count_equals_encoding_equals_the_processors_own_sampling(tmp_path, tiny_model_dir, kind, n, rate, sampling):
    import numpy as np
    from transformers.video_utils import VideoMetadata

    from qvltune.data.media import load_image
    from qvltune.model import load_processor

    processor = load_processor(str(tiny_model_dir))
    if kind == "file":
        write_video(tmp_path / "clip.mp4", n, rate)
        source = "clip.mp4"
    else:
        for i in range(n):
            write_image(tmp_path / "frames" / f"{i:03d}.png", (96, 64), ((i * 30) % 255, 40, 40))
        source = "frames" if kind == "folder" else [f"frames/{i:03d}.png" for i in range(n)]
    rec = record(video_record([source] if isinstance(source, list) else source), tmp_path / "d.jsonl")
    encoder = Encoder(processor, video=sampling)
    (info,) = encoder.probe(rec)
    enc = encoder.encode(rec)
    # what check-data counts (header reads only) is what training feeds
    assert encoder.count(rec, [info]) == (len(enc), enc.trained_tokens)

    # ... and what Qwen3-VL's processor produces when it samples the whole video itself
    if kind == "file":
        import av

        with av.open(str(tmp_path / "clip.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        meta = VideoMetadata(total_num_frames=len(frames), fps=float(rate))
        # The encoder set fps/min_frames/max_frames on the processor (so the saved processor samples
        # as training did); the processor's own sample_frames picks the frames here.
        kwargs = {"do_sample_frames": True}
    else:
        frames = [np.asarray(load_image(tmp_path / "frames" / f"{i:03d}.png")) for i in range(n)]
        meta = VideoMetadata(total_num_frames=n, fps=sampling.fps)  # a frame list is at the configured fps
        kwargs = {"do_sample_frames": True}
    text = processor.apply_chat_template(rec.chat(), tokenize=False)
    reference = processor(text=[text], videos=[np.stack(frames)], videos_kwargs={"video_metadata": [meta], "return_metadata": True, **kwargs}, return_tensors="pt")
    assert enc.input_ids == reference["input_ids"][0].tolist()
    assert enc.video_grid_thw.tolist() == reference["video_grid_thw"].tolist()
    if sampling.max_tokens:
        video_tokens = sum(1 for t in enc.input_ids if t == processor.video_token_id)
        assert video_tokens <= sampling.max_tokens
    decoded = processor.tokenizer.decode(enc.input_ids)
    assert "seconds>" in decoded  # the timestamps between frame groups are in the count


def test_too_long_video_names_the_frames_that_fit(tmp_path, capsys):
    from qvltune.cli import main

    for i in range(40):
        write_image(tmp_path / "frames" / f"{i:03d}.png", (128, 128), ((i * 5) % 255, 0, 0))
    data = write_jsonl(tmp_path / "v.jsonl", [video_record("frames")])

    def check(*extra):
        with pytest.raises(SystemExit) as e:
            main(["check-data", str(data), "--model", "builtin:tiny", "--json", *extra])
        return e.value.code, json.loads(capsys.readouterr().out)

    code, full = check()
    assert code == 0
    limit = full["tokens"]["max"] // 2
    code, doc = check("--max-seq-length", str(limit))
    (problem,) = [p for p in doc["problems"] if p["code"] == "too-long"]
    fit = int(problem["fix"].split("at most ")[1].split(" frames")[0])
    assert 2 <= fit < 40
    # the advice is right: with that many frames it fits, with one more pair it does not
    assert check("--max-seq-length", str(limit), "--video-max-frames", str(fit))[0] == 0
    assert check("--max-seq-length", str(limit), "--video-max-frames", str(fit + 2))[0] == 1


def test_numbered_frames_are_taken_in_numeric_order(tmp_path):
    """ffmpeg's %d.jpg writes 1.jpg ... 12.jpg: a plain sort put 10, 11, 12 before 2 and the video
    trained scrambled."""
    from qvltune.data.media import frame_paths

    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(1, 13):
        write_image(folder / f"{i}.png", (32, 32))
    frames = frame_paths("clip", tmp_path, allow_outside=False)
    assert [f.name for f in frames] == [f"{i}.png" for i in range(1, 13)]

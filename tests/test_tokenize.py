"""Tokenization through the tiny model's real processor: labels token by token, exact image tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_image
from qvltune.data.formats import parse_record
from qvltune.data.record import RawItem
from qvltune.data.tokenize import IGNORE_INDEX, Encoder, TemplateError, configure_processor, render_segments


def record(value, file):
    rec, problems = parse_record(RawItem(0, 1, value), str(file))
    assert not problems, problems
    return rec


def trained_spans(enc, tokenizer):
    """The decoded runs of labelled tokens, in order."""
    spans, run = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def test_labels_cover_exactly_every_assistant_turn(tmp_path: Path, tiny_processor):
    write_image(tmp_path / "a.png", (100, 70))
    rec = record(
        {
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "You answer in one word."},
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And the background?"},
                {"from": "gpt", "value": "It is blue, with a green border."},
            ],
        },
        tmp_path / "d.jsonl",
    )
    enc = Encoder(tiny_processor).encode(rec)
    tok = tiny_processor.tokenizer
    assert trained_spans(enc, tok) == ["red<|im_end|>", "It is blue, with a green border.<|im_end|>"]
    # Everything else — system, user turns, role headers, the newline after <|im_end|> — is unlabelled.
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    first = enc.labels.index(next(x for x in enc.labels if x != IGNORE_INDEX))
    assert tok.decode(enc.input_ids[first - 3 : first]) == "<|im_start|>assistant\n"
    assert enc.labels[-1] == IGNORE_INDEX and tok.decode(enc.input_ids[-1:]) == "\n"
    assert len(enc.input_ids) == len(enc.labels) == len(enc.mm_token_type_ids)


def test_matches_the_processor_on_the_whole_conversation(tmp_path: Path, tiny_processor):
    write_image(tmp_path / "a.png", (150, 90))
    write_image(tmp_path / "b.png", (64, 200))
    rec = record(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Left one?"}, {"type": "image", "image": "b.png"}]},
                {"role": "assistant", "content": "The left image is wider."},
            ]
        },
        tmp_path / "d.jsonl",
    )
    enc = Encoder(tiny_processor).encode(rec)
    from PIL import Image

    text = tiny_processor.apply_chat_template(rec.chat(), tokenize=False)
    ref = tiny_processor(text=[text], images=[Image.open(tmp_path / "a.png").convert("RGB"), Image.open(tmp_path / "b.png").convert("RGB")], return_tensors="pt")
    assert enc.input_ids == ref["input_ids"][0].tolist()
    assert enc.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    assert enc.pixel_values.shape == ref["pixel_values"].shape
    assert (enc.image_grid_thw == ref["image_grid_thw"]).all()


@pytest.mark.parametrize("size", [(32, 32), (192, 128), (640, 480), (1000, 90)])
def test_image_tokens_follow_the_pixel_budget(tmp_path: Path, tiny_processor, size):
    """One token per 32x32 pixels after smart resize, clamped to [min_pixels, max_pixels]."""
    write_image(tmp_path / "a.png", size)
    rec = record({"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, tmp_path / "d.jsonl")
    enc_obj = Encoder(tiny_processor)
    enc = enc_obj.encode(rec)
    n_image = sum(1 for t in enc.mm_token_type_ids if t == 1)
    t, h, w = enc.image_grid_thw[0].tolist()
    assert n_image == h * w // 4
    pixels = h * 16 * w * 16
    lo, hi = tiny_processor.image_processor.size["shortest_edge"], tiny_processor.image_processor.size["longest_edge"]
    assert lo <= pixels <= hi
    # counting from the header gives exactly the encoded length
    assert enc_obj.count(rec, enc_obj.probe(rec)) == (len(enc), enc.trained_tokens)


def test_fixed_and_variable_resolution(tmp_path: Path, tiny_model_dir):
    from qvltune.model import load_processor

    write_image(tmp_path / "small.png", (64, 64))
    write_image(tmp_path / "big.png", (512, 512))
    fixed = load_processor(str(tiny_model_dir), 16 * 1024, 16 * 1024)
    variable = load_processor(str(tiny_model_dir), 4 * 1024, 64 * 1024)
    for name, expect_fixed, expect_var in (("small.png", 16, 4), ("big.png", 16, 64)):
        rec = record({"image": name, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, tmp_path / "d.jsonl")
        for proc, expect in ((fixed, expect_fixed), (variable, expect_var)):
            enc = Encoder(proc).encode(rec)
            assert sum(1 for t in enc.mm_token_type_ids if t == 1) == expect


def test_text_only_and_video_frames(tmp_path: Path, tiny_processor):
    rec = record({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}, tmp_path / "d.jsonl")
    enc = Encoder(tiny_processor).encode(rec)
    assert enc.pixel_values is None and set(enc.mm_token_type_ids) == {0}
    assert trained_spans(enc, tiny_processor.tokenizer) == ["hi<|im_end|>"]

    for i in range(4):
        write_image(tmp_path / "clip" / f"{i:03d}.png", (96, 64), (i * 60, 0, 0))
    rec = record({"video": "clip", "conversations": [{"from": "human", "value": "<video>What changes?"}, {"from": "gpt", "value": "The red."}]}, tmp_path / "d.jsonl")
    encoder = Encoder(tiny_processor)
    enc = encoder.encode(rec)
    assert enc.pixel_values_videos is not None and enc.video_grid_thw.tolist() == [[2, 4, 6]]
    assert sum(1 for t in enc.mm_token_type_ids if t == 2) == 2 * 4 * 6 // 4
    assert encoder.count(rec, encoder.probe(rec)) == (len(enc), enc.trained_tokens)
    assert trained_spans(enc, tiny_processor.tokenizer) == ["The red.<|im_end|>"]


def test_configure_processor_sets_budget(tiny_model_dir):
    from transformers import AutoProcessor

    proc = configure_processor(AutoProcessor.from_pretrained(tiny_model_dir), 2048, 8192)
    assert proc.image_processor.size["shortest_edge"] == 2048 and proc.image_processor.size["longest_edge"] == 8192


def test_template_that_is_not_prefix_stable_is_refused(tiny_model_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    # A template that renders the number of messages first changes earlier text as turns are added.
    proc.chat_template = "{{ messages|length }}{% for m in messages %}{{ m.role }}:{{ m.content[0].text }};{% endfor %}"
    with pytest.raises(TemplateError):
        render_segments(proc, [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}])


def _write_video(path: Path, frames: int = 16, fps: int = 8, size=(96, 64)) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            image[..., 0] = i * 15
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_file_is_sampled_at_2_fps_and_counted_exactly(tmp_path: Path, tiny_processor):
    pytest.importorskip("av")
    _write_video(tmp_path / "clip.mp4")  # 16 frames at 8 fps = 2 s -> 4 frames at 2 fps
    rec = record({"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>What changes?"}, {"from": "gpt", "value": "It gets redder."}]}, tmp_path / "d.jsonl")
    encoder = Encoder(tiny_processor)
    (info,) = encoder.probe(rec)
    assert info.frames == 4 and (info.width, info.height) == (96, 64)
    enc = encoder.encode(rec)
    assert enc.video_grid_thw.tolist() == [[2, 4, 6]]  # 4 frames -> 2 temporal patches of 4x6
    assert encoder.count(rec, [info]) == (len(enc), enc.trained_tokens)
    assert trained_spans(enc, tiny_processor.tokenizer) == ["It gets redder.<|im_end|>"]

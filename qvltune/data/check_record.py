"""One record of ``check-data`` checked on its own: media, grounding boxes, token counts and the
length limit, into an ``_Outcome`` (in this process or a worker; ``check_parts`` folds outcomes in
file order, ``check.check_dataset`` merges them into the report).

Also run by preference data (``qvltune.preference.data``) on each answer's record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qvltune.data.boxes import BoxStats, check_record as check_boxes
from qvltune.data.formats import parse_record
from qvltune.data.index_cache import media_files, stamp
from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT, TINY_IMAGE_SIDE, ImageInfo, MediaError, VideoInfo, probe_image, probe_video, resolve
from qvltune.data.record import Problem, Record
from qvltune.data.tokenize import Encoder, TemplateError, estimate_tokens
from qvltune.data.video import VideoSampling, frames_that_fit

# Qwen3-VL's processor refuses images whose long/short side ratio exceeds 200 (smart_resize).
MAX_ASPECT_RATIO = 200


def _record_key(record: Record) -> bytes:
    """Identity of a record for duplicate detection: its turns and media, not its id or extra fields."""
    canon = [[m.role, [p if isinstance(p, str) else [p.kind, p.source] for p in m.parts]] for m in record.messages]
    return hashlib.blake2b(json.dumps(canon, sort_keys=True).encode(), digest_size=16).digest()


@dataclass
class _Source:
    file: str
    root: Path
    encoder: Encoder | None
    min_pixels: int
    max_pixels: int


@dataclass
class _Settings:
    allow_outside_root: bool
    deep: bool
    max_seq_length: int | None
    video: VideoSampling
    pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT
    track_media: bool = False


@dataclass
class _Outcome:
    """What checking one item found; ``counts`` is None when the record is not usable at all."""

    counted: bool = True  # a record (False: a file-level problem)
    problems: list[Problem] = field(default_factory=list)
    where: tuple[str, int | None, int] = ("", None, 0)
    key: bytes = b""
    shape: str = ""
    n_images: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    videos: int = 0
    boxes: BoxStats | None = None
    counts: list[tuple[int, int, int]] | None = None  # (view, tokens, trained tokens)
    too_long: bool = False
    template_error: Problem | None = None
    reasoning_dropped: Problem | None = None
    progress: float = 0.0  # the share of the file read up to this item
    offset: int = -1  # the record's byte offset (plain JSONL)
    media: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)  # (media path, stamp) as checked


INTERNAL_ERROR = "internal-error"


def _check_item(item, source: _Source, s: _Settings) -> _Outcome:
    """One item's outcome; whatever goes wrong on it (a bug of ours included) is this record's error,
    never the end of the pass."""
    try:
        out = _check_one(item, source, s)
    except Exception as e:  # noqa: BLE001 - a bug of ours on one record must not hide the others
        if os.environ.get("QVLTUNE_DEBUG"):
            raise
        out = _Outcome(problems=[
            Problem("error", source.file, item.line, item.index, "", f"qvltune failed on this record ({type(e).__name__}: {e})", "a bug in qvltune: please report it (QVLTUNE_DEBUG=1 shows the traceback); the other records were checked", INTERNAL_ERROR)
        ])
    out.progress = getattr(item, "progress", 0.0)
    out.offset = getattr(item, "offset", -1)
    return out


def _check_one(item, source: _Source, s: _Settings) -> _Outcome:
    out = _Outcome()
    if item.problem is not None:
        out.counted = item.problem.index is not None  # a record that could not be read (not a file-level problem)
        out.problems.append(item.problem)
        return out
    record, problems = parse_record(item, source.file)
    out.problems += problems
    if record is None:
        return out
    out.where = (record.file, record.line, record.index)

    def problem(severity: str, field: str, message: str, fix: str, code: str, path: str = "") -> None:
        out.problems.append(Problem(severity, record.file, record.line, record.index, field, message, fix, code, path))

    # Media: every item, every problem.
    infos: list[ImageInfo | VideoInfo] = []
    sizes: list[tuple[int, int]] = []
    if s.track_media:  # stamped before they are read: a file replaced meanwhile is seen as changed
        out.media = [(p, stamp(p)) for m in record.media for p in media_files(m.source, source.root)]
    for m in record.media:
        try:
            if m.kind == "image":
                path = resolve(m.source, source.root, s.allow_outside_root)
                info = probe_image(path, s.deep, s.pixel_limit)
                ratio = max(info.width, info.height) / min(info.width, info.height)
                if ratio > MAX_ASPECT_RATIO:
                    raise MediaError(f"aspect ratio {ratio:.0f}:1 ({info.width}x{info.height}) exceeds the processor's limit of {MAX_ASPECT_RATIO}:1", "crop or pad the image", "aspect-ratio", path=path)
                if info.frames > 1:
                    problem("warning", m.field, f"animated image ({info.frames} frames): only the first frame is used", "give it as a video (<video> and a folder of frames) if the motion matters", "animated-image", str(path))
                if max(info.width, info.height) < TINY_IMAGE_SIDE:
                    problem("warning", m.field, f"image is only {info.width}x{info.height} pixels (scaled up to the pixel budget): likely a placeholder or tracking pixel", "check the image, or remove the record", "tiny-image", str(path))
                sizes.append((info.width, info.height))
            else:
                info = probe_video(m.source, source.root, s.allow_outside_root, s.video, s.deep, s.pixel_limit)
            infos.append(info)
        except MediaError as e:
            problem("error", m.field, e.message, e.fix, e.code, e.path)
    if len(infos) < len(record.media):
        return out
    # Grounding coordinates (qvltune.data.boxes): a record with a box Qwen3-VL would misread is not used.
    out.boxes = BoxStats()
    box_problems = check_boxes(record, [(i.width, i.height) for i in infos if isinstance(i, ImageInfo)], out.boxes)
    out.problems += box_problems
    if not out.boxes.records:
        out.boxes = None  # nothing to merge (most records): less to send back from a worker
    if any(p.severity == "error" for p in box_problems):
        return out
    # Tokens.
    encoder = source.encoder
    try:
        if encoder is not None:
            # One count per view: a record is several samples under a Thinking template.
            views = encoder.views(record)
            counts = [(view, *encoder.count(rec, infos)) for view, rec in views]
        else:
            views = [(0, record)]
            length = estimate_tokens(record, infos, source.min_pixels, source.max_pixels, s.video.max_tokens)
            counts = [(0, length, sum(int(len(m.text()) / 3.5 + 1) + 1 for m in record.messages if m.role == "assistant"))]
    except TemplateError as e:
        out.template_error = Problem("error", record.file, record.line, record.index, "", f"{e}", "use a model whose chat template renders turn by turn (the Qwen3-VL templates do)", "template")
        return out
    # Sizes and videos are counted for records whose media and tokens could be read (as without workers).
    out.image_sizes = sizes
    out.videos = len(record.videos)
    if encoder is not None and any(m.reasoning for m in record.messages) and any(encoder.drops_reasoning(rec) for _, rec in views):
        out.reasoning_dropped = Problem("warning", record.file, record.line, record.index, "", "the model's chat template does not render this record's reasoning_content, so the reasoning would not be trained (first such record)", "use a Thinking model, or put the reasoning in the answer text", "reasoning-dropped")
    for (view, length, trained), (_, rec) in zip(counts, views):
        if s.max_seq_length and length > s.max_seq_length:
            out.too_long = True
            what = f" (the view up to answer {sum(m.role == 'assistant' for m in record.messages[:view])})" if view > 0 else ""
            fix = "raise max_seq_length, lower max_pixels, or shorten/split the record"
            if record.videos:
                count = (lambda i, r=rec: encoder.count(r, i)[0]) if encoder is not None else (lambda i, r=rec: estimate_tokens(r, i, source.min_pixels, source.max_pixels, s.video.max_tokens))
                fit = frames_that_fit(infos, count, s.max_seq_length)
                fix = (f"its video(s) would fit with at most {fit} frames: set data.video_max_frames: {fit} (check-data --video-max-frames), lower video_fps or video_max_tokens, or raise max_seq_length"
                       if fit else "even 2 frames per video do not fit: raise max_seq_length or lower video_max_tokens")
            out.problems.append(
                Problem("error", record.file, record.line, record.index, "", f"{length} tokens{what} (text + image and video tokens at the budget) exceed max_seq_length {s.max_seq_length}", fix, "too-long")
            )
    out.key = _record_key(record)
    out.shape = record.shape
    out.n_images = len(record.images)
    out.counts = counts
    return out

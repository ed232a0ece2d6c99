"""``check-data``: find every problem of a dataset in one pass, before any GPU time is spent.

``check_dataset`` is pure library code (no printing): it returns a ``Report`` with every problem
(file, line, field, message, fix) and the summary a person needs to configure training (shapes,
images per record, image sizes, token lengths, suggested ``max_seq_length``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.data.boxes import BoxStats, check_record as check_boxes
from qvltune.data.files import count_part, jsonl_parts, read_items, read_part, records_at
from qvltune.data.index_cache import MediaTable, media_files, stamp
from qvltune.data.formats import DatasetSpec, Problem, Record, parse_mixture, parse_record
from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT, TINY_IMAGE_SIDE, ImageInfo, MediaError, VideoInfo, probe_image, probe_video, resolve
from qvltune.data.tokenize import Encoder, TemplateError, estimate_tokens
from qvltune.data.video import VideoSampling, frames_that_fit
from qvltune.errors import UserError

# Qwen3-VL's processor refuses images whose long/short side ratio exceeds 200 (smart_resize).
MAX_ASPECT_RATIO = 200


@dataclass
class Report:
    files: list[str]
    counting: str  # how token counts were made
    records: int = 0
    valid: int = 0
    problems: list[Problem] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    images_per_record: Counter = field(default_factory=Counter)
    videos: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per valid (or only too long) record
    usable: list[tuple[str, int, int, int, int, int, int]] = field(default_factory=list)  # (file, index, tokens, trained tokens, view, byte offset, line)
    sources: list[dict[str, Any]] = field(default_factory=list)  # each source's file, share and settings
    views: int = 0  # samples made from records a Thinking template trains turn by turn (see tokenize.record_views)
    trained_tokens: int = 0
    max_seq_length: int | None = None
    boxes: int = 0  # boxes and points found in the records' text (grounding data)
    box_records: int = 0
    media: MediaTable | None = None  # each record's media files and their stamps (track_media: the index cache)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def failures(self) -> Counter:
        """Failed records per kind of problem (a record with several errors counts under its first)."""
        first: dict[tuple[str, int], str] = {}
        for p in self.errors:
            if p.index is not None:
                first.setdefault((p.file, p.index), p.code or "error")
        return Counter(first.values())

    @property
    def failed(self) -> int:
        return sum(self.failures().values())

    def ok(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)

    def percentile(self, q: float) -> int:
        return percentile(self.lengths, q)

    @property
    def too_long(self) -> int:
        if not self.max_seq_length:
            return 0
        return sum(1 for n in self.lengths if n > self.max_seq_length)

    def suggested_max_seq_length(self) -> int | None:
        return suggest_max_seq_length(self.lengths)

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        """(low, high, count) buckets of token lengths."""
        if not self.lengths:
            return []
        lo, hi = min(self.lengths), max(self.lengths)
        width = max(1, math.ceil((hi - lo + 1) / bins))
        counts = Counter((n - lo) // width for n in self.lengths)
        return [(lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range(bins) if lo + b * width <= hi]

    def to_json(self) -> dict[str, Any]:
        sizes = self.image_sizes
        return {
            "ok": not self.errors,
            "files": self.files,
            "sources": self.sources,
            "records": self.records,
            "valid_records": self.valid,
            "failed_records": self.failed,
            "failures": dict(self.failures().most_common()),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [
                {"severity": p.severity, "file": p.file, "line": p.line, "index": p.index, "field": p.field, "code": p.code, "message": p.message, "path": p.path, "fix": p.fix}
                for p in self.problems
            ],
            "shapes": dict(self.shapes),
            "images_per_record": {str(k): v for k, v in sorted(self.images_per_record.items())},
            "videos": self.videos,
            "samples": len(self.usable),
            "thinking_views": self.views,
            "coordinates": {"count": self.boxes, "records": self.box_records},
            "image_sizes": _size_summary(sizes),
            "tokens": {
                "counting": self.counting,
                "p50": self.percentile(50),
                "p90": self.percentile(90),
                "p99": self.percentile(99),
                "max": max(self.lengths, default=0),
                "per_epoch": sum(self.lengths),
                "trained_per_epoch": self.trained_tokens,
                "histogram": [{"from": a, "to": b, "count": c} for a, b, c in self.histogram()],
                "max_seq_length": self.max_seq_length,
                "too_long": self.too_long,
                "suggested_max_seq_length": self.suggested_max_seq_length(),
            },
        }


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def suggest_max_seq_length(lengths: list[int], multiple: int = 256) -> int | None:
    """The longest record rounded up to ``multiple``, unless a few outliers would double it: then p99."""
    if not lengths:
        return None
    longest, p99 = max(lengths), percentile(lengths, 99)
    target = longest if longest <= 1.5 * p99 else p99
    return max(multiple, math.ceil(target / multiple) * multiple)


def _size_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {}
    pixels = sorted(w * h for w, h in sizes)
    widths = sorted(w for w, _ in sizes)
    heights = sorted(h for _, h in sizes)
    return {
        "count": len(sizes),
        "width": {"min": widths[0], "median": widths[len(widths) // 2], "max": widths[-1]},
        "height": {"min": heights[0], "median": heights[len(heights) // 2], "max": heights[-1]},
        "megapixels": {"min": round(pixels[0] / 1e6, 3), "median": round(pixels[len(pixels) // 2] / 1e6, 3), "max": round(pixels[-1] / 1e6, 3)},
    }


def _record_key(record: Record) -> bytes:
    """Identity of a record for duplicate detection: its turns and media, not its id or extra fields."""
    canon = [[m.role, [p if isinstance(p, str) else [p.kind, p.source] for p in m.parts]] for m in record.messages]
    return hashlib.blake2b(json.dumps(canon, sort_keys=True).encode(), digest_size=16).digest()


def source_budget(spec: DatasetSpec, processor: Any, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """A source's (min, max) pixels: its own, else the processor's (exact counts), else the given ones."""
    if processor is not None:
        size = processor.image_processor.size
        min_pixels, max_pixels = size.get("shortest_edge", min_pixels), size.get("longest_edge", max_pixels)
    lo = spec.min_pixels if spec.min_pixels is not None else min_pixels
    hi = spec.max_pixels if spec.max_pixels is not None else max_pixels
    # The source's own bound wins over the inherited one it crosses (max_image_tokens=4 under the
    # default minimum of 49 tokens means 4 tokens per image).
    if lo > hi:
        lo, hi = (hi, hi) if spec.max_pixels is not None else (lo, lo)
    return lo, hi


def encoder_for_source(encoder: Encoder, spec: DatasetSpec) -> Encoder:
    """The encoder of one source: the shared one, or a copy with the source's image root and budget
    (a processor copy, so that each source's images are resized as configured for it)."""
    if spec.image_root is None and spec.min_pixels is None and spec.max_pixels is None:
        return encoder
    import copy

    from qvltune.data.tokenize import configure_processor

    processor = encoder.processor
    if spec.min_pixels is not None or spec.max_pixels is not None:
        lo, hi = source_budget(spec, processor, 0, 0)
        processor = configure_processor(copy.deepcopy(processor), lo, hi)
    return Encoder(processor, root=spec.image_root or encoder.root, allow_outside_root=encoder.allow_outside_root, video=encoder.video, thinking_turns=encoder.thinking_turns, image_pixel_limit=encoder.image_pixel_limit)


# ----------------------------------------------------------------------------------------------
# One record, checked on its own (in this process or a worker), then merged in file order.


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


@dataclass
class _Part:
    """What a run of consecutive items adds to the report, folded in file order where they were
    checked (a worker sends one of these per task, not an object per record: the parent's share of
    the work stays small). Duplicates are found by the parent, over every part, from ``keys``."""

    records: int = 0
    valid: int = 0
    videos: int = 0
    views: int = 0
    trained_tokens: int = 0
    problems: list[Problem] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    images_per_record: Counter = field(default_factory=Counter)
    usable: list[tuple] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    keys: list[tuple[bytes, tuple]] = field(default_factory=list)  # (record key, where) of each counted record
    media: list[tuple] = field(default_factory=list)  # MediaTable.add's arguments, per record
    boxes: BoxStats = field(default_factory=BoxStats)
    template_error: Problem | None = None  # the first in this part
    reasoning_dropped: Problem | None = None  # the first in this part
    progress: float = 0.0


def _fold(outcomes) -> _Part:
    part = _Part()
    for out in outcomes:
        part.progress = out.progress
        part.records += out.counted
        part.problems += out.problems
        part.image_sizes += out.image_sizes
        part.videos += out.videos
        if out.media:  # records with media problems too: a fixed file is noticed
            part.media.append((out.where[0], out.where[2], out.offset, out.where[1], out.media))
        if out.boxes is not None:
            part.boxes.merge(out.boxes)
        if out.template_error is not None:
            part.template_error = part.template_error or out.template_error
            continue
        if out.counts is None:
            continue
        if out.reasoning_dropped is not None:
            part.reasoning_dropped = part.reasoning_dropped or out.reasoning_dropped
        counts = out.counts
        if any(v != 0 for v, _, _ in counts):
            part.views += len(counts)
        file, line, index = out.where
        part.keys.append((out.key, out.where))
        part.valid += not out.too_long
        if not out.too_long:
            part.usable += [(file, index, length, trained, view, out.offset, line if line is not None else -1) for view, length, trained in counts]
        part.shapes[out.shape] += 1
        part.images_per_record[out.n_images] += 1
        part.lengths += [length for _, length, _ in counts]
        part.trained_tokens += sum(trained for _, _, trained in counts)
    return part


# Worker processes inherit the source and settings by fork (the processor is not re-loaded per chunk).
_WORKER_STATE: tuple[_Source, _Settings] | None = None
CHUNK = 2000  # records per part (a gzip'd file or a JSON list: read by the parent, checked by a worker)
PART_BYTES = 2 << 20  # bytes of a plain JSONL file per task: a worker reads and parses them itself


def _check_chunk(items: list) -> _Part:
    source, settings = _WORKER_STATE
    return _fold(_check_item(item, source, settings) for item in items)


def _check_part(task: tuple[Path, int, int, int, int]) -> _Part:
    source, settings = _WORKER_STATE
    return _fold(_check_item(item, source, settings) for item in read_part(*task))


def _count_part(task: tuple[Path, int, int]) -> tuple[int, int]:
    return count_part(*task)


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parts(path: Path, source: _Source, settings: _Settings, workers: int):
    """The file's items checked and folded into parts, in file order; ``workers`` > 1 spreads the
    work over forked processes.

    A plain JSONL file is split into byte ranges that the workers read, decode and check themselves
    (reading and decoding a million lines in the parent would make it the bottleneck); first each
    range's lines and records are counted, so every item is numbered as one pass numbers it. Other
    files (gzip, JSON lists) are read by the parent and handed out in chunks."""
    if workers <= 1:
        for chunk in _chunks(read_items(path), CHUNK):
            yield _fold(_check_item(item, source, settings) for item in chunk)
        return
    import multiprocessing

    global _WORKER_STATE
    _WORKER_STATE = (source, settings)
    size = path.stat().st_size
    ranges = jsonl_parts(path, max(4 * workers, size // PART_BYTES))
    try:
        # fork: the workers share the parent's imports and processor (spawn would re-import torch and
        # transformers in each, seconds apiece); they run no threads of their own.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            if ranges is None:
                yield from pool.imap(_check_chunk, _chunks(read_items(path), CHUNK), chunksize=1)
                return
            counts = pool.map(_count_part, [(path, a, b) for a, b in ranges], chunksize=1)
            tasks, line, index = [], 1, 0
            for (a, b), (breaks, records) in zip(ranges, counts):
                tasks.append((path, a, b, line, index))
                line, index = line + breaks, index + records
            yield from pool.imap(_check_part, tasks, chunksize=1)
    finally:
        _WORKER_STATE = None


@dataclass(frozen=True)
class CheckOptions:
    """How records are checked and counted: the settings ``check_dataset`` and ``check_pairs`` share
    (check-data's flags, or a run's ``data`` section through ``for_run``).

    With a ``processor`` token counts are exact (the model's chat template and pixel budget);
    without one, image tokens use the Qwen3-VL geometry and text tokens are estimated."""

    image_root: Path | None = None
    processor: Any = None
    model_name: str | None = None
    min_pixels: int = 64 * 32 * 32
    max_pixels: int = 1024 * 32 * 32
    max_seq_length: int | None = None
    deep: bool = False
    allow_outside_root: bool = False
    video: VideoSampling = field(default_factory=VideoSampling)
    thinking_turns: str = "each"
    image_pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT

    @classmethod
    def for_run(cls, d: Any, processor: Any) -> CheckOptions:
        """A run's ``data`` section (``qvltune.config.DataConfig``), counted exactly with its processor."""
        return cls(
            image_root=Path(d.image_root) if d.image_root else None, processor=processor, max_seq_length=d.max_seq_length,
            allow_outside_root=d.allow_media_outside_root, video=d.video_sampling(), thinking_turns=d.thinking_turns, image_pixel_limit=d.image_pixel_limit,
        )

    def counting(self) -> str:
        """How token counts are made, as the report says it."""
        if self.processor is not None:
            return f"exact ({self.model_name or 'model processor'})"
        return "estimated: Qwen3-VL geometry (patch 16, merge 2) for images, ~3.5 characters per text token; pass --model for exact counts"

    def encoder(self) -> Encoder | None:
        """The run-wide encoder (exact counts), or None when counts are estimated."""
        if self.processor is None:
            return None
        return Encoder(self.processor, root=self.image_root, allow_outside_root=self.allow_outside_root, video=self.video, thinking_turns=self.thinking_turns, image_pixel_limit=self.image_pixel_limit)

    def settings(self, track_media: bool = False) -> _Settings:
        return _Settings(self.allow_outside_root, self.deep, self.max_seq_length, self.video, self.image_pixel_limit, track_media)

    def source(self, spec: DatasetSpec, base_encoder: Encoder | None, report: Report) -> _Source:
        """One source of a mixture with its own settings (image root, pixel budget) over the run's,
        listed in the report's sources."""
        lo, hi = source_budget(spec, self.processor, self.min_pixels, self.max_pixels)
        root = spec.image_root or (self.image_root if self.image_root is not None else spec.path.parent)
        report.sources.append({"file": str(spec.path), "percent": spec.percent, "image_root": str(root), "min_pixels": lo, "max_pixels": hi})
        return _Source(str(spec.path), root, encoder_for_source(base_encoder, spec) if base_encoder is not None else None, lo, hi)


def dataset_specs(data: str | list[str]) -> list[DatasetSpec]:
    """The sources of a dataset or mixture; every file must exist (else there is nothing to check)."""
    specs = parse_mixture(data)
    missing = [f"{s.path} ({'a directory, not a dataset file' if s.path.is_dir() else 'not found'})" for s in specs if not s.path.is_file()]
    if missing:
        raise UserError(f"dataset file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}", "check the path (a .jsonl, .json or .jsonl.gz file)")
    return specs


def check_dataset(
    data: str | list[str],
    options: CheckOptions = CheckOptions(),
    *,
    workers: int = 1,
    progress: Callable[[int, float], None] | None = None,
    track_media: bool = False,
    only: dict[str, list[tuple[int, int, int]]] | None = None,
) -> Report:
    """Check one dataset or a mixture (``a.jsonl%50,b.jsonl``) as ``options`` say.

    ``workers`` > 1 checks records in that many processes (the merge keeps the file's order, so the
    report is the same as with one).

    One record never stops the pass: whatever goes wrong while reading, checking, decoding or
    tokenizing it becomes an error on that record and the next one is checked. Missing dataset
    files are a ``UserError`` (there is nothing to check).

    ``track_media`` records each record's media files with their size and mtime (``report.media``,
    for the index cache); ``only`` (file -> (index, line, byte offset) of records) checks just those
    records of each file, reading them by offset where there is one (the index cache's recount of
    records whose media changed): duplicates and box verdicts are then among those records only.
    """
    specs = dataset_specs(data)
    report = Report([str(s.path) for s in specs], options.counting(), max_seq_length=options.max_seq_length)
    base_encoder = options.encoder()
    seen: dict[bytes, tuple] = {}  # record key -> (file, line, index) of its first copy (compact: a million records)
    template_broken = False
    reasoning_warned = False
    settings = options.settings(track_media)
    if track_media:
        report.media = MediaTable()
    for n, spec in enumerate(specs):
        source = options.source(spec, base_encoder, report)
        box_stats = BoxStats()
        parts = _parts(spec.path, source, settings, workers) if only is None else iter([_fold(_check_item(item, source, settings) for item in records_at(spec.path, only.get(str(spec.path), [])))])
        for part in parts:
            if progress:
                progress(report.records, (n + part.progress) / len(specs))
            report.records += part.records
            report.valid += part.valid
            report.problems += part.problems
            report.image_sizes += part.image_sizes
            report.videos += part.videos
            report.views += part.views
            report.shapes.update(part.shapes)
            report.images_per_record.update(part.images_per_record)
            report.usable += part.usable
            report.lengths += part.lengths
            report.trained_tokens += part.trained_tokens
            if report.media is not None:
                for row in part.media:
                    report.media.add(*row)
            box_stats.merge(part.boxes)
            if part.template_error is not None:
                if not template_broken:
                    report.problems.append(part.template_error)
                template_broken = True
            if part.reasoning_dropped is not None and not reasoning_warned:
                reasoning_warned = True
                report.problems.append(part.reasoning_dropped)
            # Duplicates across the whole dataset, in file order: the first copy is the one named.
            for key, where in part.keys:
                if key in seen:
                    first_file, first_line, first_index = seen[key]
                    first = f"{first_file}:{first_line}" if first_line is not None else f"{first_file}[{first_index}]"
                    file, line, index = where
                    report.problems.append(Problem("warning", file, line, index, "", f"duplicate of {first}", "remove one copy unless the repetition is intended", "duplicate"))
                else:
                    seen[key] = where
        report.problems += box_stats.problems(str(spec.path))
        report.boxes += box_stats.boxes
        report.box_records += box_stats.records
    report.problems.sort(key=lambda p: (p.file, p.index if p.index is not None else -1, p.severity != "error"))
    return report

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

from qvltune.data.files import read_items
from qvltune.data.formats import Problem, Record, parse_mixture, parse_record
from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT, TINY_IMAGE_SIDE, ImageInfo, MediaError, VideoInfo, probe_image, probe_video, resolve
from qvltune.data.tokenize import Encoder, TemplateError, estimate_tokens
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
    usable: list[tuple[str, int, int, int]] = field(default_factory=list)  # (file, index, tokens, trained tokens)
    trained_tokens: int = 0
    max_seq_length: int | None = None

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


def _record_key(record: Record) -> str:
    """Identity of a record for duplicate detection: its turns and media, not its id or extra fields."""
    canon = [[m.role, [p if isinstance(p, str) else [p.kind, p.source] for p in m.parts]] for m in record.messages]
    return hashlib.blake2b(json.dumps(canon, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_dataset(
    data: str | list[str],
    *,
    image_root: Path | None = None,
    processor: Any = None,
    model_name: str | None = None,
    min_pixels: int = 64 * 32 * 32,
    max_pixels: int = 1024 * 32 * 32,
    max_seq_length: int | None = None,
    deep: bool = False,
    allow_outside_root: bool = False,
    video_fps: float = 2.0,
    image_pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT,
    progress: Callable[[int, float], None] | None = None,
) -> Report:
    """Check one dataset or a mixture (``a.jsonl%50,b.jsonl``).

    With a ``processor`` token counts are exact (the model's chat template and pixel budget);
    without one, image tokens use the Qwen3-VL geometry and text tokens are estimated.

    One record never stops the pass: whatever goes wrong while reading, checking, decoding or
    tokenizing it becomes an error on that record and the next one is checked. Missing dataset
    files are a ``UserError`` (there is nothing to check).
    """
    specs = parse_mixture(data)
    missing = [f"{s.path} ({'a directory, not a dataset file' if s.path.is_dir() else 'not found'})" for s in specs if not s.path.is_file()]
    if missing:
        raise UserError(f"dataset file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}", "check the path (a .jsonl, .json or .jsonl.gz file)")
    counting = f"exact ({model_name or 'model processor'})" if processor is not None else (
        "estimated: Qwen3-VL geometry (patch 16, merge 2) for images, ~3.5 characters per text token; pass --model for exact counts"
    )
    report = Report([str(s.path) for s in specs], counting, max_seq_length=max_seq_length)
    ctx = _Context(
        report,
        encoder=Encoder(processor, root=image_root, allow_outside_root=allow_outside_root, video_fps=video_fps, image_pixel_limit=image_pixel_limit) if processor is not None else None,
        allow_outside_root=allow_outside_root,
        deep=deep,
        video_fps=video_fps,
        pixel_limit=image_pixel_limit,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_seq_length=max_seq_length,
    )
    for n, spec in enumerate(specs):
        root = image_root if image_root is not None else spec.path.parent
        for item in read_items(spec.path):
            if progress and (report.records % 500 == 0):
                progress(report.records, (n + item.progress) / len(specs))
            if item.problem is not None:
                if item.problem.index is not None:  # a record that could not be read (not a file-level problem)
                    report.records += 1
                report.problems.append(item.problem)
                continue
            report.records += 1
            try:
                _check_record(ctx, item, str(spec.path), root)
            except Exception as e:  # noqa: BLE001 - a bug of ours on one record must not hide the others
                if os.environ.get("QVLTUNE_DEBUG"):
                    raise
                report.problems.append(
                    Problem("error", str(spec.path), item.line, item.index, "", f"qvltune failed on this record ({type(e).__name__}: {e})", "a bug in qvltune: please report it (QVLTUNE_DEBUG=1 shows the traceback); the other records were checked", INTERNAL_ERROR)
                )
    report.problems.sort(key=lambda p: (p.file, p.index if p.index is not None else -1, p.severity != "error"))
    return report


INTERNAL_ERROR = "internal-error"


@dataclass
class _Context:
    report: Report
    encoder: Encoder | None
    allow_outside_root: bool
    deep: bool
    video_fps: float
    pixel_limit: int
    min_pixels: int
    max_pixels: int
    max_seq_length: int | None
    seen: dict[str, str] = field(default_factory=dict)


def _check_record(ctx: _Context, item, file: str, root: Path) -> None:
    """Check one readable record: its shape, every media item, its tokens; append its problems."""
    report = ctx.report
    record, problems = parse_record(item, file)
    report.problems += problems
    if record is None:
        return

    def problem(severity: str, field: str, message: str, fix: str, code: str, path: str = "") -> None:
        report.problems.append(Problem(severity, record.file, record.line, record.index, field, message, fix, code, path))

    # Media: every item, every problem.
    infos: list[ImageInfo | VideoInfo] = []
    sizes: list[tuple[int, int]] = []
    for m in record.media:
        try:
            if m.kind == "image":
                path = resolve(m.source, root, ctx.allow_outside_root)
                info = probe_image(path, ctx.deep, ctx.pixel_limit)
                ratio = max(info.width, info.height) / min(info.width, info.height)
                if ratio > MAX_ASPECT_RATIO:
                    raise MediaError(f"aspect ratio {ratio:.0f}:1 ({info.width}x{info.height}) exceeds the processor's limit of {MAX_ASPECT_RATIO}:1", "crop or pad the image", "aspect-ratio", path=path)
                if info.frames > 1:
                    problem("warning", m.field, f"animated image ({info.frames} frames): only the first frame is used", "give it as a video (<video> and a folder of frames) if the motion matters", "animated-image", str(path))
                if max(info.width, info.height) < TINY_IMAGE_SIDE:
                    problem("warning", m.field, f"image is only {info.width}x{info.height} pixels (scaled up to the pixel budget): likely a placeholder or tracking pixel", "check the image, or remove the record", "tiny-image", str(path))
                sizes.append((info.width, info.height))
            else:
                info = probe_video(m.source, root, ctx.allow_outside_root, ctx.video_fps, ctx.deep, ctx.pixel_limit)
            infos.append(info)
        except MediaError as e:
            problem("error", m.field, e.message, e.fix, e.code, e.path)
    if len(infos) < len(record.media):
        return
    # Tokens.
    try:
        if ctx.encoder is not None:
            length, trained = ctx.encoder.count(record, infos)
        else:
            length = estimate_tokens(record, infos, ctx.min_pixels, ctx.max_pixels)
            trained = sum(int(len(m.text()) / 3.5 + 1) + 1 for m in record.messages if m.role == "assistant")
    except TemplateError as e:
        problem("error", "", f"{e}", "use a model whose chat template renders turn by turn (the Qwen3-VL templates do)", "template")
        return
    report.image_sizes += sizes
    report.videos += len(record.videos)
    too_long = bool(ctx.max_seq_length and length > ctx.max_seq_length)
    if too_long:
        problem("error", "", f"{length} tokens (text + image tokens at the pixel budget) exceed max_seq_length {ctx.max_seq_length}", "raise max_seq_length, lower max_pixels, or shorten/split the record", "too-long")
    key = _record_key(record)
    if key in ctx.seen:
        problem("warning", "", f"duplicate of {ctx.seen[key]}", "remove one copy unless the repetition is intended", "duplicate")
    else:
        ctx.seen[key] = record.where()
    report.valid += not too_long
    if not too_long:
        report.usable.append((record.file, record.index, length, trained))
    report.shapes[record.shape] += 1
    report.images_per_record[len(record.images)] += 1
    report.lengths.append(length)
    report.trained_tokens += trained

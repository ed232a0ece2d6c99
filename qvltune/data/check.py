"""``check-data``: find every problem of a dataset in one pass, before any GPU time is spent.

``check_dataset`` is pure library code (no printing): it returns a ``Report`` with every problem
(file, line, field, message, fix) and the summary a person needs to configure training (shapes,
images per record, image sizes, token lengths, suggested ``max_seq_length``). One record's checks
live in ``check_record``; folding them in file order, over worker processes, in ``check_parts``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.data.boxes import BoxStats
from qvltune.data.check_parts import _fold, _parts
from qvltune.data.check_record import _check_item, _Settings, _Source
from qvltune.data.files import records_at
from qvltune.data.index_cache import MediaTable
from qvltune.data.media import DEFAULT_IMAGE_PIXEL_LIMIT
from qvltune.data.mixture import DatasetSpec, parse_mixture
from qvltune.data.record import Problem
from qvltune.data.tokenize import Encoder
from qvltune.data.video import VideoSampling
from qvltune.errors import UserError


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
        """A run's ``data`` section (``qvltune.config_sections.DataConfig``), counted exactly with its processor."""
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

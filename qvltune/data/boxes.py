"""Grounding coordinates in answers: find them, check their convention, convert them, score them.

Qwen3-VL writes boxes and points relative to the image, scaled to 0-1000, as JSON in the answer:
``{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}`` or ``{"point_2d": [x, y]}``, alone, in a list, or
inside text (often a fenced ```json block). Qwen2.5-VL used absolute pixels of the image as its
processor resized it, and many datasets carry pixels of the original image: trained as they are,
the model learns coordinates it will be read wrongly on. This module finds every coordinate in a
record's text (``find_coordinates``), reports the ones that cannot be 0-1000 coordinates
(``check_record``, ``BoxStats``), rewrites absolute pixels into 0-1000 (``convert_dataset``, behind
``qvltune convert-boxes``), and scores predicted boxes by IoU (``iou``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from qvltune.data.formats import SHAPE_QWEN
from qvltune.data.record import Problem, Record

SCALE = 1000  # Qwen3-VL's relative coordinate range: 0..1000 on each axis
KEYS = {"bbox_2d": 4, "point_2d": 2}
_KEY_RE = re.compile(r'"(bbox_2d|point_2d)"')

# Qwen2.5-VL's processor defaults (preprocessor_config.json of the released models): images are
# resized to multiples of 28 pixels within 3,136..12,845,056 pixels, and its boxes are pixels of that
# resized image.
QWEN25_FACTOR = 28
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 28 * 28 * 16384

# A dataset "looks absolute" when at least this many boxes sit on images smaller than 1000 px and
# every one of them fits inside its image's pixel size (relative 0-1000 coordinates would overshoot a
# 640x480 image for any object in its right or lower part) while some reach its far edge.
ABSOLUTE_MIN_BOXES = 5
ABSOLUTE_EDGE_FRACTION = 0.8

def fix_convert(file: str) -> str:
    return f"convert them: qvltune convert-boxes {file} --out FIXED.jsonl (--from pixels, or --from qwen25 for Qwen2.5-VL's resized-image pixels)"


@dataclass(frozen=True)
class Coord:
    """One box (x1, y1, x2, y2) or point (x, y) found in a text."""

    kind: Literal["bbox_2d", "point_2d"]
    values: tuple[float, ...]
    label: str | None = None

    @property
    def xs(self) -> tuple[float, ...]:
        return self.values[0::2]

    @property
    def ys(self) -> tuple[float, ...]:
        return self.values[1::2]


class CoordError(ValueError):
    """A coordinate key whose value is not the right number of numbers."""


def json_spans(text: str) -> Iterator[tuple[int, int, Any]]:
    """(start, end, value) of every JSON object or list in ``text`` that holds a coordinate key.

    ``json.JSONDecoder.raw_decode`` is tried at each ``{`` / ``[`` (answers are short); a span that
    decodes is skipped whole, so nested objects are returned once, as part of their outermost value."""
    if not _KEY_RE.search(text):
        return
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if _KEY_RE.search(text, start, end):
            yield start, end, value
        pos = end


def _walk(value: Any) -> Iterator[Coord]:
    if isinstance(value, list):
        for v in value:
            yield from _walk(v)
    elif isinstance(value, dict):
        for key, n in KEYS.items():
            if key in value:
                raw = value[key]
                if not (isinstance(raw, list) and len(raw) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw)):
                    raise CoordError(f'"{key}" must be a list of {n} numbers (got {json.dumps(raw)[:60]})')
                label = value.get("label")
                yield Coord(key, tuple(raw), label if isinstance(label, str) else None)
        for k, v in value.items():
            if k not in KEYS and isinstance(v, (list, dict)):
                yield from _walk(v)


def find_coordinates(text: str) -> list[Coord]:
    """Every box and point written as JSON in ``text`` (raises ``CoordError`` on a malformed one)."""
    return [c for _, _, value in json_spans(text) for c in _walk(value)]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for empty or inverted boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def first_box(text: str) -> tuple[float, ...] | None:
    """The first well-formed box of a (generated) text, or None: what an answer is scored by."""
    try:
        boxes = [c.values for c in find_coordinates(text) if c.kind == "bbox_2d"]
    except CoordError:
        return None
    return boxes[0] if boxes else None


# ----------------------------------------------------------------------------------------------
# Checking a dataset


def turns_key(record: Record) -> str:
    return "conversations" if record.shape == SHAPE_QWEN else "messages"


@dataclass
class BoxStats:
    """What the whole dataset's coordinates say about their convention (one verdict, not one per record)."""

    boxes: int = 0
    records: int = 0
    above_scale: int = 0  # coordinates above 1000: cannot be relative
    first_above: str = ""  # where the first of them is
    small_image_boxes: int = 0  # coordinates on images smaller than 1000 px on an axis
    fitting_pixels: int = 0  # ... of which fit inside the image's pixel size
    reach_edge: float = 0.0  # the largest coordinate / image size among the fitting ones
    example: str = ""

    def merge(self, other: BoxStats) -> None:
        """Add another part of the same dataset (checked in another process), in file order."""
        self.boxes += other.boxes
        self.records += other.records
        self.above_scale += other.above_scale
        self.first_above = self.first_above or other.first_above
        self.small_image_boxes += other.small_image_boxes
        self.fitting_pixels += other.fitting_pixels
        if other.reach_edge > self.reach_edge:
            self.reach_edge, self.example = other.reach_edge, other.example

    def problems(self, file: str) -> list[Problem]:
        """The dataset-level verdict: looks absolute (values above 1000, or values matching pixel sizes)."""
        out = []
        if self.above_scale:
            out.append(Problem("warning", file, None, None, "", f"{self.above_scale} of {self.boxes} coordinate set(s) have values above {SCALE} (first: {self.first_above}): the dataset looks like absolute pixels, but Qwen3-VL reads boxes as 0-{SCALE} relative to the image", fix_convert(file), "boxes-absolute"))
        elif (
            self.small_image_boxes >= ABSOLUTE_MIN_BOXES
            and self.fitting_pixels == self.small_image_boxes
            and self.reach_edge >= ABSOLUTE_EDGE_FRACTION
        ):
            out.append(Problem("warning", file, None, None, "", f"all {self.small_image_boxes} boxes on images smaller than {SCALE} px lie inside the image's pixel size and reach its edge (e.g. {self.example}): the dataset looks like absolute pixels, but Qwen3-VL reads boxes as 0-{SCALE} relative to the image", fix_convert(file), "boxes-absolute"))
        return out


def check_record(record: Record, image_sizes: list[tuple[int, int]], stats: BoxStats | None = None) -> list[Problem]:
    """Problems of every coordinate in a record's text: malformed, outside 0-1000, inverted boxes.

    ``image_sizes`` are the record's images (width, height); with exactly one image, coordinates are
    also compared with its pixel size for ``stats``' dataset-level verdict."""
    problems: list[Problem] = []
    key = turns_key(record)
    found_any = False

    def problem(severity: str, where: str, message: str, fix: str, code: str) -> None:
        problems.append(Problem(severity, record.file, record.line, record.index, where, message, fix, code))

    for t, msg in enumerate(record.messages):
        text = msg.text()
        if '"bbox_2d"' not in text and '"point_2d"' not in text:
            continue
        where = f"{key}[{t}]"
        try:
            coords = find_coordinates(text)
        except CoordError as e:
            problem("error", where, str(e), 'write boxes as {"bbox_2d": [x1, y1, x2, y2]} and points as {"point_2d": [x, y]}', "bad-coordinates")
            continue
        if not coords:
            problem("warning", where, "mentions bbox_2d/point_2d but holds no JSON that parses", "write the coordinates as valid JSON, e.g. {\"bbox_2d\": [10, 20, 300, 400]}", "bad-coordinates")
            continue
        found_any = True
        for c in coords:
            shown = json.dumps(list(c.values))
            if stats is not None:
                stats.boxes += 1
            if min(c.values) < 0:
                problem("error", where, f"{c.kind} {shown} has a negative coordinate", "coordinates are 0-1000 relative to the image: clamp or fix them", "boxes-range")
            if max(c.values) > SCALE:
                size = f" (image {image_sizes[0][0]}x{image_sizes[0][1]})" if len(image_sizes) == 1 else ""
                problem("error", where, f"{c.kind} {shown} has a value above {SCALE}: Qwen3-VL coordinates are 0-{SCALE} relative to the image; this looks like absolute pixels{size}", fix_convert(record.file), "boxes-range")
                if stats is not None:
                    stats.above_scale += 1
                    stats.first_above = stats.first_above or f"{record.where()} {where}"
            if c.kind == "bbox_2d":
                x1, y1, x2, y2 = c.values
                if x2 < x1 or y2 < y1:
                    axis = "x2 < x1" if x2 < x1 else "y2 < y1"
                    problem("error", where, f"inverted box {shown} ({axis})", "write boxes as [x1, y1, x2, y2]: top-left corner, then bottom-right", "boxes-inverted")
            if stats is not None and len(image_sizes) == 1:
                w, h = image_sizes[0]
                if w < SCALE or h < SCALE:
                    stats.small_image_boxes += 1
                    if max(c.xs) <= w and max(c.ys) <= h:
                        stats.fitting_pixels += 1
                        edge = max(max(c.xs) / w, max(c.ys) / h)
                        if edge > stats.reach_edge:
                            stats.reach_edge = edge
                            stats.example = f"{record.where()}: {shown} on a {w}x{h} image"
    if stats is not None and found_any:
        stats.records += 1
    return problems


# ----------------------------------------------------------------------------------------------
# Converting absolute pixels to 0-1000


Source = Literal["pixels", "qwen25"]


def reference_size(width: int, height: int, source: Source, min_pixels: int = QWEN25_MIN_PIXELS, max_pixels: int = QWEN25_MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) that absolute coordinates were written in: the original image, or the
    size Qwen2.5-VL's processor resized it to (``smart_resize``, factor 28)."""
    if source == "pixels":
        return width, height
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=QWEN25_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def to_relative(value: Any, size: tuple[int, int]) -> Any:
    """A JSON value with every box and point rescaled from pixels of ``size`` to 0-1000 (rounded)."""
    if isinstance(value, list):
        return [to_relative(v, size) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in KEYS and isinstance(v, list):
                out[k] = [min(SCALE, max(0, round(x / size[i % 2] * SCALE))) for i, x in enumerate(v)]
            elif isinstance(v, (list, dict)):
                out[k] = to_relative(v, size)
            else:
                out[k] = v
        return out
    return value


def convert_text(text: str, size: tuple[int, int]) -> tuple[str, int]:
    """``text`` with each JSON value holding coordinates rewritten to 0-1000; (new text, coordinates)."""
    out, last, count = [], 0, 0
    for start, end, value in json_spans(text):
        count += len(list(_walk(value)))
        out.append(text[last:start])
        out.append(json.dumps(to_relative(value, size), ensure_ascii=False))
        last = end
    out.append(text[last:])
    return "".join(out), count


def text_slots(raw: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(container, key) of every turn text of a raw record, in any of the three shapes."""
    for turns_field in ("conversations", "messages"):
        turns = raw.get(turns_field)
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            for k in ("value", "content"):
                v = turn.get(k)
                if isinstance(v, str):
                    yield turn, k
                elif isinstance(v, list):
                    for part in v:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            yield part, "text"


@dataclass
class ConvertReport:
    source: str
    output: str
    records: int = 0
    converted_records: int = 0
    coordinates: int = 0
    problems: list[Problem] = field(default_factory=list)


def convert_dataset(
    input_path: Path,
    output_path: Path,
    *,
    source: Source = "pixels",
    image_root: Path | None = None,
    allow_outside_root: bool = False,
    min_pixels: int = QWEN25_MIN_PIXELS,
    max_pixels: int = QWEN25_MAX_PIXELS,
    force: bool = False,
) -> ConvertReport:
    """Rewrite the absolute-pixel boxes and points of a dataset into Qwen3-VL's 0-1000 convention.

    Writes ``output_path`` (same format as the input: JSONL, or a JSON list) and never touches the
    input. Nothing is written when any record cannot be converted (unreadable, several images, no
    image, or a coordinate outside its image): every such record is reported instead."""
    from qvltune.data.files import read_items
    from qvltune.data.formats import parse_record
    from qvltune.data.media import MediaError, probe_image, resolve
    from qvltune.errors import UserError

    if not input_path.is_file():
        raise UserError(f"dataset not found: {input_path}", "check the path")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise UserError(f"--out {output_path} is the input file", "write the converted dataset to a new file; the input is never modified")
    if output_path.exists() and not force:
        raise UserError(f"{output_path} already exists", "choose another --out, or pass --force to replace it")
    root = image_root if image_root is not None else input_path.parent
    report = ConvertReport(source, str(output_path))
    values: list[Any] = []
    name = str(input_path)
    for item in read_items(input_path):
        if item.problem is not None:
            report.problems.append(item.problem)
            continue
        report.records += 1
        values.append(item.value)
        record, problems = parse_record(item, name)
        if record is None:
            report.problems += [p for p in problems if p.severity == "error"]
            continue
        slots = [(c, k) for c, k in text_slots(item.value) if _KEY_RE.search(c[k])]
        if not slots:
            continue

        def bad(message: str, fix: str, code: str = "boxes-convert", where: str = "") -> None:
            report.problems.append(Problem("error", name, record.line, record.index, where, message, fix, code))

        if len(record.images) != 1:
            bad(f"coordinates in a record with {len(record.images)} images: which image they refer to is ambiguous", "convert this record by hand (or split it into one record per image)")
            continue
        image = record.images[0]
        try:
            info = probe_image(resolve(image.source, root, allow_outside_root))
        except MediaError as e:
            bad(e.message, e.fix, e.code, image.field)
            continue
        size = reference_size(info.width, info.height, source, min_pixels, max_pixels)
        ok = True
        for container, key in slots:
            try:
                coords = [c for _, _, v in json_spans(container[key]) for c in _walk(v)]
            except CoordError as e:
                bad(str(e), 'write boxes as {"bbox_2d": [x1, y1, x2, y2]}', "bad-coordinates")
                ok = False
                continue
            for c in coords:
                if max(c.xs) > size[0] or max(c.ys) > size[1] or min(c.values) < 0:
                    what = "the image" if source == "pixels" else "Qwen2.5-VL's resized image"
                    bad(f"{c.kind} {json.dumps(list(c.values))} lies outside {what} ({size[0]}x{size[1]} px): not absolute pixels of it", "check the coordinates (--from qwen25 if they are Qwen2.5-VL's resized-image pixels)", "boxes-range")
                    ok = False
        if not ok:
            continue
        for container, key in slots:
            container[key], n = convert_text(container[key], size)
            report.coordinates += n
        report.converted_records += 1
    if report.problems:
        return report
    _write_like(input_path, output_path, values)
    return report


def _is_json_list(path: Path) -> bool:
    """Whether a dataset file (plain or gzip'd, with or without a UTF-8 byte-order mark) is a JSON list."""
    import gzip

    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8-sig", errors="replace") as f:
        return f.read(65536).lstrip().startswith("[")


def _write_like(input_path: Path, output_path: Path, values: list[Any]) -> None:
    """Write records in the input's format (JSON list or JSONL), atomically; gzip'd when ``output_path``
    ends in .gz."""
    import gzip

    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    is_list = _is_json_list(input_path)
    with (gzip.open if output_path.suffix == ".gz" else open)(tmp, "wt", encoding="utf-8") as f:
        if is_list:
            json.dump(values, f, ensure_ascii=False, indent=1)
            f.write("\n")
        else:
            for v in values:
                f.write(json.dumps(v, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)

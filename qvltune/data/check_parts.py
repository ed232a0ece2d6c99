"""``check-data``'s records folded into parts in file order, in this process or spread over forked
workers (a plain JSONL file split into byte ranges each worker reads itself; other files handed out
in chunks). ``check.check_dataset`` merges the parts into the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qvltune.data.boxes import BoxStats
from qvltune.data.check_record import _check_item, _Settings, _Source
from qvltune.data.files import count_part, jsonl_parts, read_items, read_part
from qvltune.data.record import Problem


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


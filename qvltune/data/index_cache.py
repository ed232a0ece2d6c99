"""The checked data index, cached beside the data: a second ``qvltune train`` on the same data and
settings skips re-checking and re-counting every record.

The cache file lives in ``.qvltune-index/`` next to the (first) dataset file, named by a key over
what the counts depend on: each dataset file's content (BLAKE2 of its bytes, so an edited file is a
new key, a touched one is not), each source's settings, the processor (chat template, vocabulary,
image and video processor settings), ``max_seq_length``, the video sampling, ``thinking_turns``, the
image root and the qvltune version.

What it holds is what training needs from the check, in columns (no per-record Python objects for a
million records): the usable samples (file, record index, token counts, view, the record's byte
offset and line, so the data loader reads each record alone), the problems, and each record's media
files with their size and mtime. Media are stamped rather than hashed: on reuse every media file is
``os.stat``-ed (microseconds each, never read), and the records whose files changed (replaced by
another image, deleted, or restored) are checked and counted again; the rest is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvltune.data.mixture import parse_mixture
from qvltune.data.record import Problem

CACHE_DIR = ".qvltune-index"
FORMAT = 2  # bump when the cached document changes
USABLE = ("file", "index", "tokens", "trained", "view", "offset", "line")  # the columns of a usable sample


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def processor_identity(processor: Any) -> dict[str, Any]:
    """What of the processor decides token counts."""
    tok = processor.tokenizer
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None) or ""
    vp = getattr(processor, "video_processor", None)
    return {
        "template": hashlib.blake2b(str(template).encode(), digest_size=16).hexdigest(),
        "vocab": len(tok),
        "tokenizer": type(tok).__name__,
        "image_size": dict(processor.image_processor.size or {}),
        "video": None if vp is None else {"size": dict(vp.size or {}), "fps": getattr(vp, "fps", None), "min_frames": getattr(vp, "min_frames", None), "max_frames": getattr(vp, "max_frames", None)},
    }


def cache_key(spec: Any, processor: Any, settings: dict[str, Any]) -> str:
    from qvltune import __version__

    sources = [
        {"path": str(s.path.resolve()), "content": file_digest(s.path), "percent": s.percent, "image_root": str(s.image_root) if s.image_root else None, "min": s.min_pixels, "max": s.max_pixels}
        for s in parse_mixture(spec)
    ]
    doc = {"format": FORMAT, "version": __version__, "sources": sources, "processor": processor_identity(processor), "settings": settings}
    return hashlib.blake2b(json.dumps(doc, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def cache_path(spec: Any, key: str) -> Path:
    first = parse_mixture(spec)[0].path
    return first.resolve().parent / CACHE_DIR / f"index-{key}.json"


# ----------------------------------------------------------------------------------------------
# Media stamps


def media_files(source: str | tuple[str, ...], root: Path) -> list[str]:
    """The files whose stamps stand for one media item: the file (or each listed frame); for a video
    folder, the folder and its frames. Each named as the loader will open it (qvltune.data.media.
    resolve: absolute, links, ``~``, ``file://`` and Windows separators resolved), so the stamp is
    the file's whatever folder a later run starts from; a path resolve refuses (a URL) is only
    made absolute: its record is an error anyway, and a path that cannot be opened has no stamp."""
    from qvltune.data.media import MediaError, resolve

    names = list(source) if isinstance(source, tuple) else [source]
    paths = []
    for name in names:
        try:
            paths.append(os.fspath(resolve(name, root, allow_outside=True)))
        except MediaError:
            paths.append(os.path.abspath(os.path.join(os.fspath(root), name)))
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        paths += sorted(os.path.join(folder, n) for n in os.listdir(folder))
    return paths


def stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file; None when it cannot be stat-ed (missing)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns)


class MediaTable:
    """Each checked record's media files, with the stamps they had when the record was checked.

    Compact columns (arrays of ints, one string per distinct file): a million records that share ten
    thousand images cost a few tens of MB, not a Python object per record."""

    def __init__(self) -> None:
        self.files: dict[str, int] = {}  # dataset file -> id
        self.paths: dict[str, int] = {}  # media file -> id
        self.stamps: list[tuple[int, int] | None] = []
        self.rec_file, self.rec_index, self.rec_offset, self.rec_line = array("i"), array("q"), array("q"), array("q")
        self.ptr, self.ids = array("q", [0]), array("i")

    def add(self, file: str, index: int, offset: int, line: int | None, media: list[tuple[str, tuple[int, int] | None]]) -> None:
        self.rec_file.append(self.files.setdefault(file, len(self.files)))
        self.rec_index.append(index)
        self.rec_offset.append(offset)
        self.rec_line.append(-1 if line is None else line)
        for path, st in media:
            i = self.paths.get(path)
            if i is None:
                i = self.paths[path] = len(self.stamps)
                self.stamps.append(st)
            self.ids.append(i)
        self.ptr.append(len(self.ids))

    def stale(self) -> dict[str, list[tuple[int, int, int]]]:
        """The records (file -> (index, line, offset)) whose media files changed since they were checked."""
        changed = {i for path, i in self.paths.items() if stamp(path) != self.stamps[i]}
        if not changed:
            return {}
        names = {i: f for f, i in self.files.items()}
        out: dict[str, list[tuple[int, int, int]]] = {}
        for r in range(len(self.rec_file)):
            if any(self.ids[k] in changed for k in range(self.ptr[r], self.ptr[r + 1])):
                line = self.rec_line[r]
                out.setdefault(names[self.rec_file[r]], []).append((self.rec_index[r], None if line < 0 else line, self.rec_offset[r]))
        return out

    def restamp(self, other: MediaTable) -> None:
        """Take the stamps ``other`` (a recount of some records) found for its files."""
        for path, i in other.paths.items():
            if path in self.paths:
                self.stamps[self.paths[path]] = other.stamps[i]

    def to_doc(self) -> dict[str, Any]:
        return {
            "files": list(self.files), "paths": list(self.paths), "stamps": self.stamps,
            "rec_file": list(self.rec_file), "rec_index": list(self.rec_index), "rec_offset": list(self.rec_offset), "rec_line": list(self.rec_line),
            "ptr": list(self.ptr), "ids": list(self.ids),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> MediaTable:
        t = cls()
        t.files = {f: i for i, f in enumerate(doc["files"])}
        t.paths = {p: i for i, p in enumerate(doc["paths"])}
        t.stamps = [tuple(s) if s is not None else None for s in doc["stamps"]]
        t.rec_file, t.rec_index, t.rec_offset, t.rec_line = array("i", doc["rec_file"]), array("q", doc["rec_index"]), array("q", doc["rec_offset"]), array("q", doc["rec_line"])
        t.ptr, t.ids = array("q", doc["ptr"]), array("i", doc["ids"])
        return t


# ----------------------------------------------------------------------------------------------
# The cached document


@dataclass
class CachedIndex:
    files: list[str]
    usable: dict[str, Any]  # USABLE column -> numpy array ("file": an index into ``files``)
    problems: list[Problem]
    media: MediaTable

    @classmethod
    def from_report(cls, report) -> CachedIndex:
        import numpy as np

        files = list(report.files)
        ids = {f: i for i, f in enumerate(files)}
        rows = report.usable
        cols = {name: np.fromiter((r[k] for r in rows), dtype=np.int64, count=len(rows)) for k, name in enumerate(USABLE) if name != "file"}
        cols["file"] = np.fromiter((ids[r[0]] for r in rows), dtype=np.int64, count=len(rows))
        return cls(files, cols, list(report.problems), report.media or MediaTable())

    def respell(self, files: list[str]) -> None:
        """Name the dataset files as this run spells them. The cache key holds each file's resolved
        path, so ``../data/train.jsonl`` from one folder and ``data/train.jsonl`` from another find
        the same cache, whose records are filed under the spelling of the run that wrote it; the
        sources are in the key in order, so they match by position."""
        from dataclasses import replace

        if len(files) != len(self.files) or files == self.files:
            return
        rename = dict(zip(self.files, files))
        self.files = list(files)
        self.problems = [replace(p, file=rename.get(p.file, p.file)) for p in self.problems]
        self.media.files = {rename.get(f, f): i for f, i in self.media.files.items()}

    def recount(self, stale: dict[str, list[tuple[int, int, int]]], report) -> None:
        """Replace what the records in ``stale`` had (samples, their own problems, media stamps) by
        ``report``, their check made again. Duplicate warnings (they depend on the records' text,
        not their media) and dataset-level verdicts stay."""
        import numpy as np

        ids = {f: i for i, f in enumerate(self.files)}
        redo = {(ids[f], index) for f, records in stale.items() for index, _, _ in records}
        keys = self.usable["file"] * (1 << 40) + self.usable["index"]
        keep = ~np.isin(keys, np.array([f * (1 << 40) + i for f, i in redo], dtype=np.int64))
        new = CachedIndex.from_report(report)
        new_ids = np.array([ids[f] for f in new.files], dtype=np.int64)
        cols = {}
        for name in USABLE:
            added = new_ids[new.usable["file"]] if name == "file" and len(new.usable["file"]) else new.usable[name]
            cols[name] = np.concatenate([self.usable[name][keep], added.astype(np.int64)])
        order = np.lexsort((cols["view"], cols["index"], cols["file"]))  # file order, as one pass gives
        self.usable = {name: c[order] for name, c in cols.items()}
        names = {(f, i) for f, records in stale.items() for i, _, _ in records}
        kept = [p for p in self.problems if p.index is None or (p.file, p.index) not in names or p.code == "duplicate"]
        fresh = [p for p in report.problems if p.index is not None and p.code != "duplicate"]
        self.problems = sorted(kept + fresh, key=lambda p: (p.file, p.index if p.index is not None else -1, p.severity != "error"))
        if report.media is not None:
            self.media.restamp(report.media)


def load(path: Path) -> CachedIndex | None:
    """The cached index; None when absent or unreadable (then it is rebuilt)."""
    import numpy as np

    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            return None
        usable = {name: np.asarray(doc["usable"][name], dtype=np.int64) for name in USABLE}
        problems = [Problem(**p) for p in doc["problems"]]
        return CachedIndex(doc["files"], usable, problems, MediaTable.from_doc(doc["media"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(path: Path, index: CachedIndex) -> bool:
    """Write the cache atomically; False when the data folder is not writable (no cache, no error)."""
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        doc = {
            "format": FORMAT,
            "files": index.files,
            "usable": {name: index.usable[name].tolist() for name in USABLE},
            "problems": [p.__dict__ for p in index.problems],
            "media": index.media.to_doc(),
        }
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, path)
        return True
    except OSError:
        return False

"""The checked data index, cached beside the data: a second ``qvltune train`` on the same data and
settings skips re-checking and re-counting every record.

The cache file lives in ``.qvltune-index/`` next to the (first) dataset file, named by a key over
what the counts depend on: each dataset file's content (BLAKE2 of its bytes, so an edited file is a
new key, a touched one is not), each source's settings, the processor (chat template, vocabulary,
image and video processor settings), ``max_seq_length``, the video sampling, ``thinking_turns``, the
image root and the qvltune version. What it holds is what ``check_dataset`` returns to training:
the usable records with their token counts (and views), and the problems. Media are not part of the
key: an image deleted or corrupted after caching is still caught when training loads it
(``data.on_bad_sample``); an image replaced by one of another size is not, so clear the cache folder
(or set ``data.index_cache: false``) after changing images in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qvltune.data.formats import Problem, parse_mixture

CACHE_DIR = ".qvltune-index"
FORMAT = 1  # bump when the cached document changes


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


def load(path: Path) -> tuple[list[tuple], list[Problem]] | None:
    """(usable, problems) from a cache file; None when absent or unreadable (then it is rebuilt)."""
    try:
        doc = json.loads(path.read_text())
        usable = [tuple(u) for u in doc["usable"]]
        problems = [Problem(**p) for p in doc["problems"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return usable, problems


def save(path: Path, usable: list[tuple], problems: list[Problem]) -> bool:
    """Write the cache atomically; False when the data folder is not writable (no cache, no error)."""
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        doc = {"usable": usable, "problems": [p.__dict__ for p in problems]}
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, path)
        return True
    except OSError:
        return False

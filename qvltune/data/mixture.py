"""Datasets and mixtures: the sources of a mixture string (``a.jsonl%50[max_image_tokens=256],b.jsonl``)
or of a config's list of sources, each with its sampling percentage and its own settings
(``DatasetSpec``), and the seeded sample of a file's records each epoch takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetSpec:
    """One source of a mixture and its own settings (None: the run's or command's setting)."""

    path: Path
    percent: float = 100.0  # how much of the file to use per epoch; > 100 repeats records
    image_root: Path | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def text(self) -> str:
        """The source in the mixture-string form: ``path%percent[settings]``."""
        settings = ",".join(f"{k}={v}" for k, v in (("image_root", self.image_root), ("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v is not None)
        pct = f"%{self.percent:g}" if self.percent != 100 else ""
        return f"{self.path}{pct}" + (f"[{settings}]" if settings else "")


def mixture_text(spec: Any) -> str:
    """A mixture (string, or a config's list of sources) as one command-line argument."""
    return ",".join(s.text() for s in parse_mixture(spec))


# Per-source settings a mixture entry may carry: "a.jsonl%50[max_image_tokens=256,image_root=imgs]",
# or the same keys in a config's list of sources (with "path" and "weight").
SOURCE_KEYS = ("image_root", "min_pixels", "max_pixels", "min_image_tokens", "max_image_tokens")


def split_entries(spec: str) -> list[str]:
    """Split a mixture string on the commas outside [...] (settings hold commas too)."""
    out, depth, current = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + [current]


def rewrite_paths(spec: str, fn) -> str:
    """The mixture string with ``fn`` applied to each entry's file and its ``image_root`` setting;
    percentages and other settings kept (``init`` makes them absolute). ValueError on a bad setting."""
    out = []
    for entry in split_entries(spec):
        if not entry.strip():
            continue
        head, settings = split_settings(entry.strip())
        path, sep, pct = head.partition("%")
        if "image_root" in settings:
            settings["image_root"] = fn(settings["image_root"])
        inner = ",".join(f"{k}={v}" for k, v in settings.items())
        out.append(fn(path.strip()) + sep + pct + (f"[{inner}]" if settings else ""))
    return ",".join(out)


def entry_files(spec: str) -> list[str]:
    """The dataset file of each entry of a mixture string (no percentage, no settings)."""
    return [split_settings(e.strip())[0].partition("%")[0].strip() for e in split_entries(spec) if e.strip()]


def split_settings(entry: str) -> tuple[str, dict[str, str]]:
    """``"a.jsonl%50[k=v,k2=v2]"`` -> ("a.jsonl%50", {"k": "v", "k2": "v2"})."""
    settings: dict[str, str] = {}
    if not (entry.endswith("]") and "[" in entry):
        return entry, settings
    head, _, inner = entry[:-1].partition("[")
    for pair in (p.strip() for p in inner.split(",")):
        if not pair:
            continue
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"bad setting {pair!r} in {entry!r}: write key=value")
        settings[key.strip()] = value.strip()
    return head, settings


def _source_settings(entry: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Validated per-source settings -> DatasetSpec keyword arguments (token budgets in pixels)."""
    from qvltune.pixels import resolve_pixels

    unknown = sorted(set(settings) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r} in {entry!r} (known: {', '.join(SOURCE_KEYS)})")
    numbers = {}
    for key in SOURCE_KEYS[1:]:
        value = settings.get(key)
        if value is None:
            continue
        try:
            numbers[key] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} in {entry!r} must be a whole number (got {value!r})") from None
    lo, hi = resolve_pixels(numbers.get("min_pixels"), numbers.get("max_pixels"), numbers.get("min_image_tokens"), numbers.get("max_image_tokens"))
    root = settings.get("image_root")
    return {"image_root": Path(str(root)) if root else None, "min_pixels": lo, "max_pixels": hi}


def _percent(entry: str, pct: Any) -> float:
    try:
        percent = float(pct)
    except (TypeError, ValueError):
        raise ValueError(f"bad sampling percentage in {entry!r}: write it as FILE%50") from None
    if not 0 < percent <= 1000:
        raise ValueError(f"sampling percentage in {entry!r} must be in (0, 1000]")
    return percent


def parse_mixture(spec: str | list[str | dict[str, Any]]) -> list[DatasetSpec]:
    """The sources of a mixture and their settings.

    ``"a.jsonl%50,b.jsonl"``: files and sampling percentages; an entry may carry its own settings in
    brackets, ``"a.jsonl%50[max_image_tokens=256,image_root=imgs]"``. A list holds such strings or
    mappings ``{"path": ..., "weight": 50, "image_root": ..., "max_image_tokens": 256, ...}``."""
    entries = spec if isinstance(spec, list) else split_entries(spec)
    out: list[DatasetSpec] = []
    for entry in entries:
        if hasattr(entry, "model_dump"):  # a config's SourceConfig
            entry = entry.model_dump()
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if v is not None}
            name = str(entry.get("path", ""))
            if not name:
                raise ValueError(f"a source without a path: {entry!r}")
            weight = entry.pop("weight", 100.0)
            settings = {k: v for k, v in entry.items() if k != "path"}
            out.append(DatasetSpec(Path(name), _percent(name, weight), **_source_settings(name, settings)))
            continue
        entry = entry.strip()
        if not entry:
            continue
        head, settings = split_settings(entry)
        path, _, pct = head.rpartition("%") if "%" in head else (head, "", "")
        percent = _percent(entry, pct) if pct else 100.0
        out.append(DatasetSpec(Path(path), percent, **_source_settings(entry, settings)))
    if not out:
        raise ValueError("no dataset given")
    return out


def sample_indices(n: int, percent: float, seed: int) -> list[int]:
    """A seeded sample of ``percent`` % of ``range(n)``: whole repeats above 100 %, then a random subset."""
    rng = random.Random(seed)
    whole, frac = divmod(percent / 100.0, 1.0)
    out = list(range(n)) * int(whole)
    out += sorted(rng.sample(range(n), round(frac * n)))
    return out

"""``qvltune check-data --config RUN.yaml``: a run's data checked exactly as ``qvltune train`` will
check it, so that train finds the index cache warm.

Everything train's check depends on comes from the run config (the train and eval sources with
their mixture settings, image root, pixel budgets, ``max_seq_length``, video sampling, thinking
turns, the model's processor), through the same functions train calls: ``qvltune.model.run_processor``
and ``qvltune.data.dataset.check_run_data``, which writes the index cache entry under the same key.
Unlike train, it never takes the entry it finds: every record and media file is checked again, so
the report it prints is today's, and the entry is rewritten with what it found.

A check-data flag given beside ``--config`` overrides the config's field for this check (the report
says which); the entry it writes is then keyed by the overridden settings, which train will not find
unless the config says the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvltune.config import RunConfig, parse_config

# check-data's flag (its parameter name) -> the config field it stands for.
FLAG_FIELDS = {
    "data": "data.train",
    "model": "model.path",
    "image_root": "data.image_root",
    "min_pixels": "data.min_pixels",
    "max_pixels": "data.max_pixels",
    "min_image_tokens": "data.min_image_tokens",
    "max_image_tokens": "data.max_image_tokens",
    "max_seq_length": "data.max_seq_length",
    "thinking_turns": "data.thinking_turns",
    "video_fps": "data.video_fps",
    "video_min_frames": "data.video_min_frames",
    "video_max_frames": "data.video_max_frames",
    "video_max_tokens": "data.video_max_tokens",
    "allow_outside_root": "data.allow_media_outside_root",
    "image_pixel_limit": "data.image_pixel_limit",
}
# A budget's bound is given in pixels or in tokens: a flag for one replaces the config's other.
ALTERNATIVE = {"min_pixels": "min_image_tokens", "min_image_tokens": "min_pixels", "max_pixels": "max_image_tokens", "max_image_tokens": "max_pixels"}


def flag_name(param: str) -> str:
    return "DATA" if param == "data" else "--" + param.replace("_", "-")


def apply_overrides(cfg: RunConfig, given: dict[str, Any], source: str) -> tuple[RunConfig, list[str]]:
    """``cfg`` with the check-data flags the user gave (parameter name -> value) over its fields,
    validated as a config is; one note per field whose value changes."""
    doc = cfg.model_dump()
    notes = []
    for param, value in given.items():
        section, key = FLAG_FIELDS[param].split(".")
        old = doc[section].get(key)
        if isinstance(value, Path):
            value = str(value)
        if param in ALTERNATIVE:
            doc[section][ALTERNATIVE[param]] = None
        doc[section][key] = value
        if old != value:
            notes.append(f"{flag_name(param)} {value} overrides {FLAG_FIELDS[param]} ({'unset' if old is None else old} in {source})")
    if not notes:
        return cfg, []
    return parse_config(doc, f"{source} with {', '.join(flag_name(p) for p in given)}"), notes


@dataclass
class SplitCheck:
    """One of the run's datasets (``data.train`` or ``data.eval``), checked."""

    field: str  # "data.train" or "data.eval"
    report: Any  # qvltune.data.check.Report (PairReport for preference data)
    cache_file: Path | None  # the index cache entry written; None: none (off, not writable, or DPO)


def check_run(cfg: RunConfig, processor: Any, *, workers: int | None = None, deep: bool = False, progress=None) -> list[SplitCheck]:
    """Check the run's training (and eval) data as ``qvltune train``'s ``prepare_index`` does, writing
    the index cache entries it will look for. ``progress``: a context manager factory giving each
    dataset's progress callback (or None)."""
    from contextlib import nullcontext

    from qvltune.data.dataset import check_run_data

    out = []
    for field in ("train", "eval"):
        spec = getattr(cfg.data, field)
        if not spec:
            continue
        with (progress() if progress else nullcontext()) as bar:
            if cfg.stage == "dpo":  # preference pairs: checked by qvltune.preference, which keeps no index cache
                from dataclasses import replace

                from qvltune.data.check import CheckOptions
                from qvltune.preference.data import check_pairs

                out.append(SplitCheck(f"data.{field}", check_pairs(spec, replace(CheckOptions.for_run(cfg.data, processor), deep=deep, model_name=cfg.model.path)), None))
                continue
            checked = check_run_data(spec, processor, cfg.data, reuse=False, workers=workers, deep=deep, progress=bar, model_name=cfg.model.path)
            out.append(SplitCheck(f"data.{field}", checked.report, checked.cache_file))
    return out

"""The training and eval sets of a run: validated up front, sampled, split, and encoded on access.

``prepare_data`` runs before any GPU work (in ``qvltune train``'s parent, and again in the worker
when launched by hand): it reads every dataset, checks every record and its media exactly as
``check-data`` does, counts tokens exactly with the model's processor, applies mixture percentages
and the held-out split with the run's seed, and returns an index (file, record, tokens) that the
worker's ``SFTDataset`` encodes lazily.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvltune.data.check import check_dataset
from qvltune.data.files import read_items
from qvltune.data.formats import Problem, Record, mixture_text, parse_mixture, parse_record, sample_indices
from qvltune.data.tokenize import Encoded, Encoder, view_of
from qvltune.data.video import configure_video_processor
from qvltune.errors import UserError

MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Entry:
    file: str
    index: int
    tokens: int
    trained: int
    view: int = 0  # which view of the record (tokenize.record_views): 0 = the whole record


@dataclass
class DataIndex:
    train: list[Entry]
    eval: list[Entry]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    from_cache: bool = False  # the training set's checks and counts came from the index cache (not saved)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"train": [asdict(e) for e in self.train], "eval": [asdict(e) for e in self.eval], "skipped": self.skipped}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DataIndex:
        doc = json.loads(path.read_text())
        return cls([Entry(**e) for e in doc["train"]], [Entry(**e) for e in doc["eval"]], doc.get("skipped", []))


def _checked_entries(spec: str | list[str], processor: Any, cfg, seed: int) -> tuple[list[Entry], list[Problem], bool]:
    """Every usable record of a dataset or mixture with its exact token count, after sampling; and
    whether it came from the index cache beside the data (``qvltune.data.index_cache``)."""
    from dataclasses import asdict as _asdict

    from qvltune.data import index_cache

    d = cfg.data
    settings = {
        "image_root": d.image_root,
        "max_seq_length": d.max_seq_length,
        "allow_outside_root": d.allow_media_outside_root,
        "video": _asdict(d.video_sampling()),
        "thinking_turns": d.thinking_turns,
        "image_pixel_limit": d.image_pixel_limit,
    }
    cached = None
    # The encoder sets the video sampling on the processor; set it first so the key sees what counting sees.
    configure_video_processor(processor, d.video_sampling())
    if d.index_cache:
        path = index_cache.cache_path(spec, index_cache.cache_key(spec, processor, settings))
        cached = index_cache.load(path)
    if cached is not None:
        usable, problems = cached
    else:
        report = check_dataset(
            spec,
            image_root=Path(d.image_root) if d.image_root else None,
            processor=processor,
            max_seq_length=d.max_seq_length,
            allow_outside_root=d.allow_media_outside_root,
            video=d.video_sampling(),
            thinking_turns=d.thinking_turns,
            image_pixel_limit=d.image_pixel_limit,
        )
        usable, problems = report.usable, report.problems
        if d.index_cache:
            index_cache.save(path, usable, problems)
    entries: list[Entry] = []
    for s in parse_mixture(spec):
        per_file = [Entry(*u) for u in usable if u[0] == str(s.path)]
        entries += [per_file[i] for i in sample_indices(len(per_file), s.percent, seed)]
    return entries, problems, cached is not None


def source_encoders(cfg, encoder: Encoder) -> dict[str, Encoder]:
    """Each dataset file's encoder: its source's own image root and pixel budget over the run's."""
    from qvltune.data.check import encoder_for_source

    out: dict[str, Encoder] = {}
    for spec_value in (cfg.data.train, cfg.data.eval):
        for spec in parse_mixture(spec_value) if spec_value else []:
            out[str(spec.path)] = encoder_for_source(encoder, spec)
    return out


def prepare_data(cfg, processor: Any) -> DataIndex:
    """Validate, count, sample and split the run's data; ``UserError`` on bad records (policy 'error')."""
    seed = cfg.optim.seed
    train, problems, from_cache = _checked_entries(cfg.data.train, processor, cfg, seed)
    evals: list[Entry] = []
    if cfg.data.eval:
        evals, eval_problems, _ = _checked_entries(cfg.data.eval, processor, cfg, seed)
        problems = problems + eval_problems
    errors = [p for p in problems if p.severity == "error"]
    skipped = []
    if errors:
        if cfg.data.on_bad_sample == "error":
            shown = "\n  ".join(str(p) for p in errors[:MAX_PROBLEMS_SHOWN])
            more = f"\n  ... and {len(errors) - MAX_PROBLEMS_SHOWN} more" if len(errors) > MAX_PROBLEMS_SHOWN else ""
            raise UserError(
                f"{len(errors)} problem(s) in the training data:\n  {shown}{more}",
                f"fix them (qvltune check-data '{mixture_text(cfg.data.train)}' lists all), or set data.on_bad_sample: skip",
            )
        skipped = [{"file": p.file, "line": p.line, "index": p.index, "field": p.field, "problem": p.text(), "code": p.code} for p in errors]
    if not train:
        raise UserError("no usable training records", f"check the data with qvltune check-data '{mixture_text(cfg.data.train)}'")
    if not cfg.data.eval and cfg.data.eval_split:
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, round(len(train) * cfg.data.eval_split))
        held = set(order[:n_eval])
        evals = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    return DataIndex(train, evals, skipped, from_cache)


class RecordStore:
    """Reads records by (file, index), parsing each file once."""

    def __init__(self):
        self._files: dict[str, dict[int, Record]] = {}

    def get(self, file: str, index: int) -> Record:
        if file not in self._files:
            records = {}
            for item in read_items(Path(file)):
                if item.problem is None:
                    rec, _ = parse_record(item, file)
                    if rec is not None:
                        records[item.index] = rec
            self._files[file] = records
        try:
            return self._files[file][index]
        except KeyError:
            raise UserError(f"{file}: record {index} changed since the run was prepared", "prepare the run again (qvltune train re-checks the data)") from None


class BadSampleError(UserError):
    """A record that passed the checks before training but cannot be read now (e.g. its image was
    deleted or corrupted since), under ``on_bad_sample: error``."""


class SFTDataset:
    """A torch map-style dataset: item i is a list of encoded samples (one, or one packed row).

    A record whose media cannot be loaded any more stops training naming the record (``error``), or
    is left out of its batch and appended to ``skipped_log`` (``skip``): never silently replaced."""

    def __init__(self, entries: list[Entry], encoder: Encoder, groups: list[list[int]], on_bad_sample: str = "error", skipped_log: Path | None = None, encoders: dict[str, Encoder] | None = None):
        self.entries = entries
        self.encoder = encoder
        self.encoders = encoders or {}  # per dataset file (a mixture's per-source settings)
        self.groups = groups
        self.on_bad_sample = on_bad_sample
        self.skipped_log = skipped_log
        self.store = RecordStore()

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[Encoded]:
        from qvltune.data.media import MediaError

        out = []
        for j in self.groups[i]:
            e = self.entries[j]
            record = view_of(self.store.get(e.file, e.index), e.view)
            try:
                out.append(self.encoders.get(e.file, self.encoder).encode(record))
            except Exception as err:  # noqa: BLE001 - one record must not end the run: it follows on_bad_sample
                if isinstance(err, MediaError):
                    field, problem = err.field, err.describe()
                else:  # the processor refusing what the check accepted: still this record's failure
                    field, problem = "", f"cannot encode the record ({type(err).__name__}: {err})"
                where = f"{record.where()} {field}".strip()
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"{where}: {problem}", "restore the file, or set data.on_bad_sample: skip, then --resume") from None
                self._log_skip(record, field, problem)
        return out

    def _log_skip(self, record: Record, field: str, problem: str) -> None:
        if self.skipped_log is None:
            return
        line = json.dumps({"file": record.file, "line": record.line, "index": record.index, "field": field, "problem": problem, "during": "training"})
        with open(self.skipped_log, "a") as f:  # one short line per append: safe across loader workers
            f.write(line + "\n")

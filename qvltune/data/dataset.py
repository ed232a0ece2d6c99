"""The training and eval sets of a run: validated up front, sampled, split, and encoded on access.

``prepare_data`` runs before any GPU work (in ``qvltune train``'s parent, and again in the worker
when launched by hand): it reads every dataset, checks every record and its media exactly as
``check-data`` does, counts tokens exactly with the model's processor, applies mixture percentages
and the held-out split with the run's seed, and returns an index (file, record, tokens, byte
offset: ``Entries``, in columns) that the worker's ``SFTDataset`` encodes lazily, each record read
alone at its offset. The checks and counts come from the index cache beside the data when it holds
them (``qvltune.data.index_cache``); otherwise the check runs in every core, once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvltune.data.check import CheckOptions, check_dataset
from qvltune.data.files import ends_the_file, read_items
from qvltune.data.formats import parse_record
from qvltune.data.mixture import mixture_text, parse_mixture, sample_indices
from qvltune.data.record import Problem, Record
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
    offset: int = -1  # the record's byte offset in a plain JSONL file: read alone (-1: parse the file)
    line: int = -1


class Entries:
    """A sequence of ``Entry``, stored as columns (numpy arrays): a million samples cost a few tens of
    MB and load in a second, where a million ``Entry`` objects (and their JSON) cost seconds and GB in
    every process that holds them (the parent, each rank, each data loader worker)."""

    COLUMNS = ("index", "tokens", "trained", "view", "offset", "line")

    def __init__(self, files: list[str], cols: dict[str, Any]):
        import numpy as np

        self.files = list(files)
        self.cols = {name: np.asarray(cols[name], dtype=np.int64) for name in ("file", *self.COLUMNS)}
        self.stamps: dict[str, Any] = {}  # file -> [size, mtime_ns] when the data was checked (RecordStore)

    @classmethod
    def of(cls, entries: list[Entry]) -> Entries:
        files: dict[str, int] = {}
        cols: dict[str, list[int]] = {name: [] for name in ("file", *cls.COLUMNS)}
        for e in entries:
            cols["file"].append(files.setdefault(e.file, len(files)))
            for name in cls.COLUMNS:
                cols[name].append(getattr(e, name))
        return cls(list(files), cols)

    def __len__(self) -> int:
        return len(self.cols["file"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        c = self.cols
        return Entry(self.files[c["file"][i]], *(int(c[name][i]) for name in self.COLUMNS))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def take(self, positions) -> Entries:
        import numpy as np

        pos = np.asarray(list(positions) if not hasattr(positions, "__len__") else positions, dtype=np.int64)
        out = Entries(self.files, {n: c[pos] for n, c in self.cols.items()})
        out.stamps = self.stamps
        return out

    @property
    def tokens(self) -> list[int]:
        return self.cols["tokens"].tolist()

    def to_doc(self) -> dict[str, Any]:
        return {"files": self.files, "stamps": self.stamps, **{n: c.tolist() for n, c in self.cols.items()}}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entries:
        out = cls(doc["files"], doc)
        out.stamps = doc.get("stamps", {})
        return out


@dataclass
class DataIndex:
    train: Entries
    eval: Entries
    skipped: list[dict[str, Any]] = field(default_factory=list)
    from_cache: bool = False  # the training set's checks and counts came from the index cache (not saved)
    recounted: int = 0  # records counted again because their media changed since the cache was made

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": 2, "train": self.train.to_doc(), "eval": self.eval.to_doc(), "skipped": self.skipped}, separators=(",", ":")))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DataIndex:
        doc = json.loads(path.read_text())
        if isinstance(doc["train"], list):  # a run prepared before the index had columns: one object per entry
            return cls(Entries.of([Entry(**e) for e in doc["train"]]), Entries.of([Entry(**e) for e in doc["eval"]]), doc.get("skipped", []))
        return cls(Entries.from_doc(doc["train"]), Entries.from_doc(doc["eval"]), doc.get("skipped", []))


def cache_settings(d) -> dict[str, Any]:
    """What of a run's ``data`` section the index cache's key holds (beside each source and the processor)."""
    from dataclasses import asdict

    return {
        "image_root": d.image_root,
        "max_seq_length": d.max_seq_length,
        "allow_outside_root": d.allow_media_outside_root,
        "video": asdict(d.video_sampling()),
        "thinking_turns": d.thinking_turns,
        "image_pixel_limit": d.image_pixel_limit,
    }


@dataclass
class CheckedData:
    """One dataset or mixture of a run, checked and counted (``check_run_data``)."""

    index: Any  # index_cache.CachedIndex: usable samples, problems, media stamps
    from_cache: bool  # taken from the index cache (then ``report`` is None)
    recounted: int  # records of the cache checked again because their media changed
    report: Any = None  # the check's full report (qvltune.data.check.Report) when the check ran
    cache_file: Path | None = None  # the index cache entry read or written; None: none (off, or not writable)


def check_run_data(spec: str | list[str], processor: Any, d, *, reuse: bool = True, workers: int | None = None, deep: bool = False, progress=None, model_name: str | None = None) -> CheckedData:
    """Check and count a run's dataset or mixture as its ``data`` section ``d`` says, with the run's
    processor; write the index cache entry beside the data (``data.index_cache``).

    The one path of both ``qvltune train`` (``prepare_data``, ``reuse``: a cache entry is taken, its
    changed media checked again) and ``check-data --config`` (``reuse=False``: everything checked,
    with a report to show, and the entry written that train then finds)."""
    import os

    from qvltune.data import index_cache

    from dataclasses import replace

    # model_name only names the model in the report; deep (check-data --deep) decodes every image fully
    options = replace(CheckOptions.for_run(d, processor), deep=deep, model_name=model_name)
    # The encoder sets the video sampling on the processor; set it first so the key sees what counting sees.
    configure_video_processor(processor, d.video_sampling())
    path = index_cache.cache_path(spec, index_cache.cache_key(spec, processor, cache_settings(d))) if d.index_cache else None
    cached = index_cache.load(path) if path is not None and reuse else None
    if cached is not None:
        cached.respell([str(s.path) for s in parse_mixture(spec)])  # the files as this run names them
        stale = cached.media.stale()
        recounted = 0
        if stale:  # media replaced, deleted or restored since: only those records are checked again
            cached.recount(stale, check_dataset(spec, options, only=stale, track_media=True))
            recounted = sum(len(v) for v in stale.values())
            index_cache.save(path, cached)
        return CheckedData(cached, True, recounted, cache_file=path)
    if workers is None:
        # Before training nothing else runs: the check uses every core (a million records: minutes, not tens of minutes).
        workers = min(8, os.cpu_count() or 1) if sum(s.path.stat().st_size for s in parse_mixture(spec)) > WORKERS_FROM_BYTES else 1
    report = check_dataset(spec, options, workers=workers, track_media=True, progress=progress)
    built = index_cache.CachedIndex.from_report(report)
    saved = path is not None and index_cache.save(path, built)
    return CheckedData(built, False, 0, report, path if saved else None)


def _checked_entries(spec: str | list[str], processor: Any, cfg, seed: int) -> tuple[Entries, list[Problem], bool, int]:
    """Every usable record of a dataset or mixture with its exact token count, after sampling;
    whether it came from the index cache beside the data (``qvltune.data.index_cache``); how many
    records of the cache were counted again because their media files changed."""
    import numpy as np

    from qvltune.data import index_cache

    # Stamped before the content is hashed: a file edited after this is refused by the data loader.
    stamps = {str(s.path): index_cache.stamp(str(s.path)) for s in parse_mixture(spec)}
    checked = check_run_data(spec, processor, cfg.data)
    built = checked.index
    problems = built.problems
    usable = Entries(built.files, built.usable)
    ids = {f: i for i, f in enumerate(built.files)}
    picked = []
    for s in parse_mixture(spec):
        per_file = np.flatnonzero(usable.cols["file"] == ids.get(str(s.path), -1))
        picked.append(per_file[np.asarray(sample_indices(len(per_file), s.percent, seed), dtype=np.int64)] if len(per_file) else per_file)
    entries = usable.take(np.concatenate(picked) if picked else [])
    entries.stamps = stamps
    return entries, problems, checked.from_cache, checked.recounted


WORKERS_FROM_BYTES = 16 << 20  # smaller data is checked in one process (forking costs more than it saves)


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
    train, problems, from_cache, recounted = _checked_entries(cfg.data.train, processor, cfg, seed)
    evals = Entries([], {n: [] for n in ("file", *Entries.COLUMNS)})
    if cfg.data.eval:
        evals, eval_problems, _, more = _checked_entries(cfg.data.eval, processor, cfg, seed)
        problems = problems + eval_problems
        recounted += more
    errors = [p for p in problems if p.severity == "error"]
    skipped = []
    refuse_unread_files(errors, cfg.data.on_bad_sample)
    if errors:
        if cfg.data.on_bad_sample == "error":
            shown = "\n  ".join(str(p) for p in errors[:MAX_PROBLEMS_SHOWN])
            more = f"\n  ... and {len(errors) - MAX_PROBLEMS_SHOWN} more" if len(errors) > MAX_PROBLEMS_SHOWN else ""
            raise UserError(
                f"{len(errors)} problem(s) in the training data:\n  {shown}{more}",
                f"fix them (qvltune check-data '{mixture_text(cfg.data.train)}' lists all), or set data.on_bad_sample: skip",
            )
        skipped = [{"file": p.file, "line": p.line, "index": p.index, "field": p.field, "problem": p.text(), "code": p.code} for p in errors]
    if not len(train):
        raise UserError("no usable training records", f"check the data with qvltune check-data '{mixture_text(cfg.data.train)}'")
    if not cfg.data.eval and cfg.data.eval_split:
        evals, train = hold_out(train, cfg.data.eval_split, seed)
    return DataIndex(train, evals, skipped, from_cache, recounted)


def hold_out(train: Entries, share: float, seed: int) -> tuple[Entries, Entries]:
    """(held-out, training) entries: a seeded ``share`` of the records (``held_out``)."""
    import numpy as np

    held = held_out(train.cols["file"] * (1 << 40) + train.cols["index"], share, seed)
    return train.take(np.flatnonzero(held)), train.take(np.flatnonzero(~held))


def held_out(keys, share: float, seed: int):
    """Which entries (``keys``: one int per entry naming its record) a seeded ``share`` of the
    records holds out. By record, not entry: a record repeated by a mixture's percentage
    (a.jsonl%200) or made into several views (a Thinking model's turns) is wholly on one side, never
    trained on and evaluated at once. With one entry per record, the split a seed always gave."""
    import numpy as np

    keys = np.asarray(keys, dtype=np.int64)
    records = keys[np.sort(np.unique(keys, return_index=True)[1])]  # in the order entries first name them
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return np.isin(keys, records[order[: max(1, round(len(records) * share))]])


def refuse_unread_files(errors: list[Problem], policy: str) -> None:
    """on_bad_sample: skip drops bad records, never what a file cut short leaves unread (a truncated
    archive, a JSON list cut short): such a file stops the run under either policy."""
    lost = [p for p in errors if ends_the_file(p)]
    if lost and policy == "skip":
        raise UserError(f"{lost[0]} (data.on_bad_sample: skip drops bad records, not what a file cut short leaves unread)", "fix or re-create the file; `qvltune check-data` lists every problem")


class RecordStore:
    """Reads records by (file, index): alone at its byte offset when the index has one (a plain JSONL
    file: each data loader worker reads just the records it encodes), else parsing the file once.

    ``stamps`` (file -> size and mtime when the run was prepared) guard the offsets: a file changed
    since is an error naming it, never a silently different record."""

    def __init__(self, stamps: dict[str, Any] | None = None, parse=parse_record):
        self._parse = parse  # (RawItem, file) -> (record or None, problems); preference pairs bring their own
        self._files: dict[str, dict[int, Record]] = {}
        self._checked: set[str] = set()  # files whose stamp this process compared
        self._pid = None
        self.stamps = stamps or {}

    def get(self, file: str, index: int, offset: int = -1, line: int = -1) -> Record:
        if offset >= 0:
            return self._read_at(file, index, offset, line)
        if file not in self._files:  # a JSON list or a gzip'd file: parsed whole, once per process
            self._check_stamp(file)
            records = {}
            for item in read_items(Path(file)):
                if item.problem is None:
                    rec, _ = self._parse(item, file)
                    if rec is not None:
                        records[item.index] = rec
            self._files[file] = records
        try:
            return self._files[file][index]
        except KeyError:
            raise _changed(file, f"record {index}") from None

    def _check_stamp(self, file: str) -> None:
        """Once per file and process: the file is as it was when the run was prepared."""
        import os

        if self._pid != os.getpid():  # a forked data loader worker opens its own handles
            self._checked, self._pid = set(), os.getpid()
        if file not in self._checked:
            st = os.stat(file)
            expected = self.stamps.get(file)
            if expected is not None and [st.st_size, st.st_mtime_ns] != list(expected):
                raise _changed(file, "the file")
            self._checked.add(file)

    def _read_at(self, file: str, index: int, offset: int, line: int) -> Record:
        from qvltune.data.files import MAX_RECORD_BYTES, records_at

        self._check_stamp(file)
        item = next(records_at(Path(file), [(index, line if line >= 0 else None, offset)], MAX_RECORD_BYTES), None)
        rec = self._parse(item, file)[0] if item is not None and item.problem is None else None
        if rec is None:
            raise _changed(file, f"record {index}")
        return rec


def _changed(file: str, what: str) -> UserError:
    return UserError(f"{file}: {what} changed since the run was prepared", "prepare the run again (qvltune train re-checks the data)")


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
        self.store = RecordStore(getattr(entries, "stamps", None))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[Encoded]:
        from qvltune.data.media import MediaError

        out = []
        for j in self.groups[i]:
            e = self.entries[j]
            record = view_of(self.store.get(e.file, e.index, e.offset, e.line), e.view)
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

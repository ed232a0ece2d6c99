"""Preference data: checked and counted before training, encoded as two samples per pair, batched so
that both answers of a pair are in the same micro-batch (and, packed, in the same row).

``check_pairs`` is ``check-data`` for preference records: every pair's two SFT records (prompt +
chosen, prompt + rejected) go through the SFT checks (media, boxes, exact token counts, the length
limit) and the pair-level rules (both answers present, non-empty and different; media only in the
prompt). ``prepare_pairs`` is ``prepare_data``'s counterpart for ``stage: dpo``.

Batches: a micro-batch of ``per_device_batch`` items; without packing an item is one pair (two rows,
chosen then rejected); with packing an item is one row holding whole pairs, chosen then rejected,
up to ``2 x max_seq_length`` tokens (each answer's sample is at most ``max_seq_length``). The
collator is SFT's (padded or packed, varlen, the ZeRO-3 dummy image) plus the map from every
labelled position to its answer and from answers to pairs (``qvltune.preference.loss.Pairs``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# check-data's per-record machinery (media, boxes, exact counts, the length limit), run on each answer's record.
from qvltune.data.check import CheckOptions, Report, dataset_specs, percentile
from qvltune.data.check_record import _check_item, _Settings, _Source
from qvltune.data.dataset import RecordStore, held_out, refuse_unread_files
from qvltune.data.files import read_items
from qvltune.data.mixture import mixture_text, parse_mixture, sample_indices
from qvltune.data.packing import BatchStats
from qvltune.data.record import Problem
from qvltune.data.tokenize import Encoded, Encoder
from qvltune.errors import UserError
from qvltune.preference.formats import Pair, is_preference, parse_pair, sft_items
from qvltune.preference.loss import Pairs

MAX_PROBLEMS_SHOWN = 20


def is_preference_data(spec: Any) -> bool:
    """Whether a dataset (or the first file of a mixture) holds preference records: its first
    readable record names a chosen or rejected answer."""
    for s in parse_mixture(spec):
        if not s.path.is_file():
            continue
        for item in read_items(s.path):
            if item.problem is None:
                return is_preference(item.value)
    return False


# ----------------------------------------------------------------------------------------------
# check-data for pairs


@dataclass
class PairReport(Report):
    pairs: list[tuple[str, int, int, int]] = field(default_factory=list)  # (file, index, chosen tokens, rejected tokens)
    layouts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        chosen = [c for _, _, c, _ in self.pairs]
        rejected = [r for _, _, _, r in self.pairs]
        doc["preference"] = {
            "pairs": len(self.pairs),
            "layouts": self.layouts,
            "chosen_tokens": _lengths(chosen),
            "rejected_tokens": _lengths(rejected),
            "chosen_longer": sum(c > r for c, r in zip(chosen, rejected)),
        }
        doc["samples"] = 2 * len(self.pairs)
        return doc


def _lengths(values: list[int]) -> dict[str, int]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "max": max(values, default=0)}


def check_pairs(data: str | list[str], options: CheckOptions = CheckOptions()) -> PairReport:
    """Check a preference dataset or mixture as ``options`` say (``check_dataset``'s); a ``Report``
    (problems, lengths of every answer's sample) with the pairs that can be trained and their two lengths."""
    specs = dataset_specs(data)
    report = PairReport([str(s.path) for s in specs], options.counting(), max_seq_length=options.max_seq_length)
    base, settings = options.encoder(), options.settings()
    for spec in specs:
        source = options.source(spec, base, report)
        for item in read_items(spec.path):
            if item.problem is not None:
                report.records += item.problem.index is not None
                report.problems.append(item.problem)
                continue
            report.records += 1
            _check_pair(item, source, settings, report)
    report.problems.sort(key=lambda p: (p.file, p.index if p.index is not None else -1, p.severity != "error"))
    return report


def _check_pair(item, source: _Source, settings: _Settings, report: PairReport) -> None:
    pair, problems = parse_pair(item, source.file)
    seen = {(p.field, p.message) for p in problems}
    report.problems += problems
    if pair is None:
        return
    conv, items = sft_items(item, source.file)
    lengths: dict[str, int] = {}
    trained: dict[str, int] = {}
    sizes: list = []
    for key, raw in items.items():
        # The SFT checks of this answer's record: media, boxes, exact token count, length limit.
        out = _check_item(raw, source, settings)
        for p in out.problems + ([out.template_error] if out.template_error else []):
            p = conv.rename(p, key)
            if p.code == "too-long":
                p = Problem(p.severity, p.file, p.line, p.index, key, f"prompt + {key} answer: {p.message}", p.fix, p.code)
            if (p.field, p.message) not in seen:
                seen.add((p.field, p.message))
                report.problems.append(p)
        if out.counts is None or out.template_error is not None:
            continue
        # A Thinking template may count views; the pair trains the last answer of the whole record.
        n = max(n for _, n, _ in out.counts)
        report.lengths.append(n)  # every counted answer, too long ones included (as check-data does)
        if out.too_long:
            continue
        lengths[key] = n
        trained[key] = max(t for _, _, t in out.counts)
        sizes = out.image_sizes
        if key == "chosen":
            report.videos += out.videos
            report.images_per_record[out.n_images] += 1
    if len(lengths) < 2:
        return
    report.valid += 1
    report.image_sizes += sizes
    report.layouts[pair.layout] = report.layouts.get(pair.layout, 0) + 1
    report.shapes[pair.layout] += 1
    report.pairs.append((pair.file, pair.index, lengths["chosen"], lengths["rejected"]))
    report.trained_tokens += trained["chosen"] + trained["rejected"]


# ----------------------------------------------------------------------------------------------
# The run's pairs


@dataclass(frozen=True)
class PairEntry:
    file: str
    index: int
    chosen_tokens: int
    rejected_tokens: int

    @property
    def tokens(self) -> int:
        return self.chosen_tokens + self.rejected_tokens


@dataclass
class PairIndex:
    train: list[PairEntry]
    eval: list[PairEntry]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    from_cache: bool = False

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": "dpo", "train": [asdict(e) for e in self.train], "eval": [asdict(e) for e in self.eval], "skipped": self.skipped}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PairIndex:
        doc = json.loads(path.read_text())
        return cls([PairEntry(**e) for e in doc["train"]], [PairEntry(**e) for e in doc["eval"]], doc.get("skipped", []))


def _checked_pairs(spec: Any, processor: Any, cfg, seed: int) -> tuple[list[PairEntry], list[Problem]]:
    report = check_pairs(spec, CheckOptions.for_run(cfg.data, processor))
    entries: list[PairEntry] = []
    for s in parse_mixture(spec):
        per_file = [PairEntry(*p) for p in report.pairs if p[0] == str(s.path)]
        entries += [per_file[i] for i in sample_indices(len(per_file), s.percent, seed)]
    return entries, report.problems


def prepare_pairs(cfg, processor: Any) -> PairIndex:
    """Validate, count, sample and split the run's preference pairs (``prepare_data`` for DPO)."""
    seed = cfg.optim.seed
    if not is_preference_data(cfg.data.train):
        raise UserError(
            f"stage: dpo but {mixture_text(cfg.data.train)} holds no preference records (no \"chosen\"/\"rejected\" answers)",
            "give preference pairs (README: Preference tuning), or set stage: sft",
        )
    train, problems = _checked_pairs(cfg.data.train, processor, cfg, seed)
    evals: list[PairEntry] = []
    if cfg.data.eval:
        evals, more = _checked_pairs(cfg.data.eval, processor, cfg, seed)
        problems = problems + more
    errors = [p for p in problems if p.severity == "error"]
    skipped = []
    refuse_unread_files(errors, cfg.data.on_bad_sample)
    if errors:
        if cfg.data.on_bad_sample == "error":
            shown = "\n  ".join(str(p) for p in errors[:MAX_PROBLEMS_SHOWN])
            more = f"\n  ... and {len(errors) - MAX_PROBLEMS_SHOWN} more" if len(errors) > MAX_PROBLEMS_SHOWN else ""
            raise UserError(f"{len(errors)} problem(s) in the preference data:\n  {shown}{more}", f"fix them (qvltune check-data '{mixture_text(cfg.data.train)}' lists all), or set data.on_bad_sample: skip")
        skipped = [{"file": p.file, "line": p.line, "index": p.index, "field": p.field, "problem": p.text(), "code": p.code} for p in errors]
    if not train:
        raise UserError("no usable preference pairs", f"check the data with qvltune check-data '{mixture_text(cfg.data.train)}'")
    if not cfg.data.eval and cfg.data.eval_split:
        files: dict[str, int] = {}
        held = held_out([files.setdefault(e.file, len(files)) * (1 << 40) + e.index for e in train], cfg.data.eval_split, seed)
        evals = [e for e, h in zip(train, held) if h]
        train = [e for e, h in zip(train, held) if not h]
    return PairIndex(train, evals, skipped)


def load_pairs(data: str) -> list[Pair]:
    """Every pair of a dataset (mixture percentages ignored); a ``UserError`` on the first bad one."""
    out = []
    for spec in parse_mixture(data):
        if not spec.path.is_file():
            raise UserError(f"dataset not found: {spec.path}", "check the path")
        for item in read_items(spec.path):
            pair, problems = parse_pair(item, str(spec.path)) if item.problem is None else (None, [item.problem])
            if pair is None:
                raise UserError(f"{next(p for p in problems if p.severity == 'error')}", f"run qvltune check-data {spec.path}")
            out.append(pair)
    return out


# ----------------------------------------------------------------------------------------------
# Training: dataset and collator


@dataclass
class EncodedPair:
    key: tuple[str, int]  # (split, position in the index): where a precomputed reference is kept
    chosen: Encoded
    rejected: Encoded

    @property
    def samples(self) -> tuple[Encoded, Encoded]:
        return (self.chosen, self.rejected)


class PairDataset:
    """Item i: the encoded pairs of group i (one pair, or the pairs packed into one row). A pair whose
    media cannot be loaded any more stops training (``error``) or is left out whole (``skip``)."""

    def __init__(self, split: str, entries: list[PairEntry], encoder: Encoder, groups: list[list[int]], on_bad_sample: str = "error", skipped_log: Path | None = None, encoders: dict[str, Encoder] | None = None):
        self.split = split
        self.entries = entries
        self.encoder = encoder
        self.encoders = encoders or {}
        self.groups = groups
        self.on_bad_sample = on_bad_sample
        self.skipped_log = skipped_log
        self.store = RecordStore(parse=parse_pair)  # no offsets: each file parsed once per process

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[EncodedPair]:
        from qvltune.data.dataset import BadSampleError
        from qvltune.data.media import MediaError

        out = []
        for j in self.groups[i]:
            e = self.entries[j]
            pair = self.store.get(e.file, e.index)
            encoder = self.encoders.get(e.file, self.encoder)
            try:
                out.append(EncodedPair((self.split, j), encoder.encode(pair.chosen), encoder.encode(pair.rejected)))
            except Exception as err:  # noqa: BLE001 - one pair must not end the run: it follows on_bad_sample
                field, problem = (err.field, err.describe()) if isinstance(err, MediaError) else ("", f"cannot encode the pair ({type(err).__name__}: {err})")
                where = f"{pair.where()} {field}".strip()
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"{where}: {problem}", "restore the file, or set data.on_bad_sample: skip, then --resume") from None
                if self.skipped_log is not None:
                    with open(self.skipped_log, "a") as f:
                        f.write(json.dumps({"file": pair.file, "line": pair.line, "index": pair.index, "field": field, "problem": problem, "during": "training"}) + "\n")
        return out


def pair_groups(entries: list[PairEntry], packing: bool, max_seq_length: int, seed: int) -> list[list[int]]:
    """Items of the dataset: one pair each, or whole pairs packed into rows of 2 x max_seq_length."""
    from qvltune.data.packing import pack_bins

    if not packing:
        return [[i] for i in range(len(entries))]
    return pack_bins([e.tokens for e in entries], 2 * max_seq_length, seed)


class PairCollator:
    """SFT's collator (``PackedCollator`` or ``PaddedCollator``) over the answers' samples, plus
    ``pairs`` (which labelled position belongs to which answer, which answers form a pair) and
    ``pair_keys`` (where each pair's precomputed reference log-probs are)."""

    def __init__(self, base, packed: bool):
        self.base = base
        self.packed = packed

    def __call__(self, items: list[list[EncodedPair]]) -> dict[str, Any]:
        items = [item for item in items if item]
        pairs = [p for item in items for p in item]
        if self.packed:
            rows = [[s for p in item for s in p.samples] for item in items]
        else:
            rows = [[s] for p in pairs for s in p.samples]
        out = self.base(rows)
        width = out["input_ids"].shape[1]
        # The answer each token belongs to, in the collator's layout (samples in row order; the
        # dummy image, when added, is unlabelled and never looked up).
        owner = torch.full((max(len(rows), 1), width), -1, dtype=torch.long)
        s = 0
        for r, row in enumerate(rows):
            k = 0
            for sample in row:
                owner[r, k : k + len(sample)] = s
                k += len(sample)
                s += 1
        index = out["loss_index"]
        # loss position i predicts the token at i + 1 (same row: the last position is never labelled)
        row_sample = owner.reshape(-1).index_select(0, index + 1) if index.numel() else index
        n = 2 * len(pairs)
        tokens = torch.bincount(row_sample, minlength=n) if n else torch.zeros(0, dtype=torch.long)
        out["pairs"] = Pairs(row_sample, torch.arange(0, n, 2), torch.arange(1, n, 2), tokens)
        out["pair_keys"] = [p.key for p in pairs]
        stats = out["stats"]
        out["stats"] = BatchStats(stats.real_tokens, stats.padded_tokens, len(pairs), stats.trained_tokens)
        return out

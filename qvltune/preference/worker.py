"""The worker's preference-tuning parts (``stage: dpo``): index, datasets, collator, trainer class.

``qvltune.worker``'s recipe is the same for both stages; these are the pieces that differ (called
from ``qvltune.training_data`` and the worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvltune.config import RunConfig


def load_index(cfg: RunConfig, run_dir: Path, processor: Any):
    from qvltune.preference.data import PairIndex, prepare_pairs

    path = run_dir / "data_index.json"
    return PairIndex.load(path) if path.exists() else prepare_pairs(cfg, processor)


def preference_parts(cfg: RunConfig, index, encoder, encoders: dict, pad_id: int, hf_config, dummy, varlen: bool, run_dir: Path):
    """(train groups, train set, eval set, collator): pairs batched with both answers together."""
    from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex
    from qvltune.preference.data import PairCollator, PairDataset, pair_groups

    d, seed = cfg.data, cfg.optim.seed
    train_groups = pair_groups(index.train, d.packing, d.max_seq_length, seed)
    eval_groups = pair_groups(index.eval, d.packing, d.max_seq_length, seed) if index.eval else []
    base = PackedCollator(pad_id, RopeIndex(hf_config), dummy, varlen=varlen) if d.packing else PaddedCollator(pad_id, dummy, varlen=varlen)
    skipped = run_dir / "skipped.jsonl"
    train_set = PairDataset("train", index.train, encoder, train_groups, d.on_bad_sample, skipped, encoders)
    eval_set = PairDataset("eval", index.eval, encoder, eval_groups, d.on_bad_sample, skipped, encoders) if index.eval else None
    return train_groups, train_set, eval_set, PairCollator(base, packed=d.packing)


def trainer_and_callback(cfg: RunConfig, writer, train_set, eval_set):
    """(the DPO trainer class, its extra keyword arguments, the callback writing its metrics)."""
    from qvltune.preference.trainer import make_dpo_trainer_class, make_preference_callback

    batches = None
    if cfg.preference().reference != "adapter_off":
        batches = {"train": train_set, **({"eval": eval_set} if eval_set is not None else {})}
    return make_dpo_trainer_class(), {"reference_batches": batches}, make_preference_callback(writer)

"""The worker's data side: what ``transformers.Trainer`` is given to train and evaluate on.

Two halves, split by whether they need the model. ``prepare_data_side`` (processor, data index,
packing plan) needs no weights, so ``qvltune.worker`` runs it in a thread beside the model load;
``build_datasets`` (the datasets and the collator) reads the loaded model's config. DPO's versions
of both live in ``qvltune.preference.worker`` and are called from here. ``close_data_loaders``
stops the loaders' worker processes once training is over.
"""

from __future__ import annotations

import time
from pathlib import Path

from qvltune.config import RunConfig
from qvltune.data.dataset import DataIndex, SFTDataset, prepare_data, source_encoders
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex, dummy_image, pack_bins, padding_fraction
from qvltune.data.tokenize import Encoder
from qvltune.data_ready import wait_for_data
from qvltune.model import language_side_trains, run_processor, vision_side_trains
from qvltune.trainer import unwrap, world_size


def prepare_data_side(cfg: RunConfig, run_dir: Path):
    """(processor, data index, train rows, eval rows, seconds): everything before training that needs
    no model weights. Rows are the packing plan (lists of sample indices), one sample each unpacked."""
    started = time.time()
    processor = run_processor(cfg)  # the parent's (qvltune.train.prepare_index)
    wait_for_data(run_dir)  # qvltune train may still be checking the data (qvltune.data_ready)
    if cfg.stage == "dpo":  # preference pairs: their rows are planned with the datasets (qvltune.preference)
        from qvltune.preference import worker as dpo

        return processor, dpo.load_index(cfg, run_dir, processor), None, None, time.time() - started
    index_path = run_dir / "data_index.json"
    index = DataIndex.load(index_path) if index_path.exists() else prepare_data(cfg, processor)
    if cfg.data.packing:
        train_groups = pack_bins(index.train.tokens, cfg.data.max_seq_length, cfg.optim.seed)
        eval_groups = pack_bins(index.eval.tokens, cfg.data.max_seq_length, cfg.optim.seed) if len(index.eval) else []
    else:
        train_groups = [[i] for i in range(len(index.train))]
        eval_groups = [[i] for i in range(len(index.eval))]
    return processor, index, train_groups, eval_groups, time.time() - started


def gets_dummy_image(ranks: int, zero_stage: int, vision_trains: bool, language_trains: bool) -> bool:
    """Whether a micro-batch without media gets qvltune.data.packing.dummy_image:

    - on several ranks under ZeRO-3, or with the vision side trained: every rank must run the same
      modules in the same order (see dummy_image);
    - on any number of ranks when only the vision side trains (the projector alone, the guide's
      alignment stage): otherwise no trained parameter takes part in that micro-batch, and
      DeepSpeed's backward fails (ZeRO-2: an IndexError on its empty gradient bucket).

    On one rank with the LLM trained, none: a text-only micro-batch trains the LLM as it is (the
    compiled layers' guard is kept by qvltune.compiled_layers.same_graph_with_and_without_images)."""
    return (vision_trains and not language_trains) or (ranks > 1 and (zero_stage == 3 or vision_trains))


def build_datasets(cfg: RunConfig, run_dir: Path, model, processor, index: DataIndex, train_groups, eval_groups):
    """(train rows, train set, eval set or None, collator); DPO plans its rows here, pairs whole. Evaluation gets rows built exactly like training's
    (packed with the same plan, the same collator: varlen boundaries where training has them), so an
    eval runs the same compiled layers and attention kernels, and the fused answer-only loss."""
    root = Path(cfg.data.image_root) if cfg.data.image_root else None
    encoder = Encoder(processor, root=root, allow_outside_root=cfg.data.allow_media_outside_root, video=cfg.data.video_sampling(), thinking_turns=cfg.data.thinking_turns, image_pixel_limit=cfg.data.image_pixel_limit)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    hf_config = unwrap(model).config
    from qvltune.attention import NAME as VARLEN

    varlen = hf_config.get_text_config()._attn_implementation == VARLEN
    vision, language = vision_side_trains(model), language_side_trains(model)
    dummy = dummy_image(hf_config.image_token_id, hf_config.vision_config) if gets_dummy_image(world_size(), cfg.deepspeed.stage, vision, language) else None
    if cfg.stage == "dpo":  # both answers of a pair in one row (qvltune.preference)
        from qvltune.preference import worker as dpo

        return dpo.preference_parts(cfg, index, encoder, source_encoders(cfg, encoder), pad_id, hf_config, dummy, varlen, run_dir)
    if cfg.data.packing:
        collator = PackedCollator(pad_id, RopeIndex(hf_config), dummy, varlen=varlen)
    else:
        collator = PaddedCollator(pad_id, dummy, varlen=varlen)
    policy, skipped_log = cfg.data.on_bad_sample, run_dir / "skipped.jsonl"
    encoders = source_encoders(cfg, encoder)
    train_set = SFTDataset(index.train, encoder, train_groups, policy, skipped_log, encoders)
    eval_set = SFTDataset(index.eval, encoder, eval_groups, policy, skipped_log, encoders) if len(index.eval) else None
    return train_groups, train_set, eval_set, collator


def row_padding(cfg: RunConfig, index, train_groups) -> dict:
    """The ``start`` record's row fields: how many training rows, and the share of padding in their
    batches, packed as planned and (for comparison) one sample per row."""
    b = cfg.optim.per_device_batch
    # SFT's index holds columns (a list of ints: a million samples are summed in a second); DPO's, pairs
    tokens = index.train.tokens if cfg.stage == "sft" else [e.tokens for e in index.train]
    rows = [sum(tokens[j] for j in g) for g in train_groups]
    padded_rows = [rows[i : i + b] for i in range(0, len(rows), b)]
    unpacked = [tokens[i : i + b] for i in range(0, len(tokens), b)]
    return {"train_rows": len(train_groups), "padding": padding_fraction(padded_rows), "padding_unpacked": padding_fraction(unpacked)}


def close_data_loaders(trainer) -> int:
    """Stop the worker processes of the Trainer's data loaders; returns how many loaders had them.

    The loaders keep their workers for the whole run (``dataloader_persistent_workers``), and only
    the iterator's own shutdown tells them to stop. Left to torch's exit handler, which joins each
    worker with a 5 s timeout before it kills it (pinned memory), the workers were never told: the
    exit of an 8B run on the H200 (2 training and 2 eval workers) took 21 s. torch has no public call
    for it; ``_shutdown_workers`` is what the iterator runs when it is deleted (its ``__del__``), and
    the loaders are the Trainer's: the ones the Accelerator prepared, and the cached eval loaders."""
    loaders = [*getattr(trainer.accelerator, "_dataloaders", []), *getattr(trainer, "_eval_dataloaders", {}).values()]
    # Accelerate's DataLoaderShard wraps the loader that owns the iterator (reads pass through to it).
    loaders = [getattr(x, "base_dataloader", x) for x in loaders]
    closed = 0
    for loader in {id(x): x for x in loaders}.values():
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            closed += 1
        loader._iterator = None
    return closed

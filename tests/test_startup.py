"""Start-up choices of the worker that need no launch: where the weights load."""

from __future__ import annotations

import torch

from qvltune.config import parse_config
from qvltune.model import load_model
from qvltune.worker import weights_device


def _cfg(**deepspeed):
    return parse_config({"name": "x", "model": {"path": "builtin:tiny"}, "data": {"train": "x.jsonl"}, "deepspeed": deepspeed})


def test_weights_load_straight_to_the_ranks_gpu_except_where_deepspeed_places_them():
    assert weights_device(_cfg(stage=2), cuda=True, local_rank=3) == torch.device("cuda", 3)
    assert weights_device(_cfg(stage=0), cuda=True, local_rank=0) == torch.device("cuda", 0)
    assert weights_device(_cfg(stage=2), cuda=False, local_rank=0) is None  # CPU runs: the host
    assert weights_device(_cfg(stage=3), cuda=True, local_rank=1) is None  # zero.Init partitions at load
    assert weights_device(_cfg(stage=3, offload_params=True), cuda=True, local_rank=1) is None


def test_a_device_map_load_gives_the_same_weights(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), dtype="float32")
    placed = load_model(str(tiny_model_dir), dtype="float32", device=torch.device("cpu"))
    a, b = plain.state_dict(), placed.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) and b[k].device.type == "cpu" for k in a)


def test_eval_rows_are_packed_and_collated_exactly_like_training_rows(tmp_path, demo_data, tiny_model_dir):
    """Evaluation runs the fast path: packed rows from the same plan, the same collator (varlen
    sample boundaries, no 4-D mask), hence the same compiled layers and attention kernels."""
    from qvltune.training_data import build_datasets, prepare_data_side

    train, evals = demo_data
    cfg = parse_config({
        "name": "x", "output_dir": str(tmp_path), "model": {"path": str(tiny_model_dir), "attn_implementation": "varlen"},
        "data": {"train": str(train), "eval": str(evals), "packing": True, "max_seq_length": 512},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    processor, index, train_groups, eval_groups, _ = prepare_data_side(cfg, run_dir)
    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="varlen")
    _, train_set, eval_set, collator = build_datasets(cfg, run_dir, model, processor, index, train_groups, eval_groups)
    assert len(eval_set) < len(index.eval)  # several held-out samples per row
    train_batch, eval_batch = collator([train_set[0], train_set[1]]), collator([eval_set[0], eval_set[1]])
    assert set(train_batch) == set(eval_batch)
    assert "cu_seq_lens_q" in eval_batch and eval_batch.get("attention_mask") is None
    assert len(eval_batch["cu_seq_lens_q"]) - 1 >= sum(len(eval_set[i]) for i in range(2))  # a segment per sample (and per row end padding)

"""The CPU side of the GPU benchmarks (gpu_throughput.py, multi_gpu.py): the configs they run are
the planner's, and every multi-GPU variant sees the same rows per optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_throughput as gt  # noqa: E402
import multi_gpu as mg  # noqa: E402

from qvltune.config import parse_config  # noqa: E402


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    return gt.make_model_folder(work / "model-2b", "2b"), gt.make_data(work / "data", 60), work


def test_qvltune_variant_is_the_planners_config(bench_inputs):
    model, data, work = bench_inputs
    doc = gt.run_config("v", model, data, work, "mixed", "qvltune", 6, False, None, 64)
    cfg = parse_config(doc)
    assert cfg.data.packing and cfg.data.max_seq_length >= 8192 and not cfg.optim.gradient_checkpointing
    assert cfg.optim.max_steps == 6 and cfg.model.random_init and cfg.optim.compile  # the planner compiles on GPUs
    eager = parse_config(gt.run_config("e", model, data, work, "mixed", "qvltune-eager", 6, False, None, 64))
    assert not eager.optim.compile and eager.data.max_seq_length == cfg.data.max_seq_length
    equal = parse_config(gt.run_config("q", model, data, work, "mixed", "qvltune-8k-checkpointed", 6, False, None, 64))
    assert equal.data.packing and equal.data.max_seq_length == 8192 and equal.optim.gradient_checkpointing and not equal.optim.compile
    plain = parse_config(gt.run_config("p", model, data, work, "mixed", "plain", 6, False, None, 64))
    assert not plain.data.packing and plain.optim.gradient_checkpointing and plain.model.attn_implementation == "sdpa"


def test_multi_gpu_variants_keep_the_rows_per_step(bench_inputs):
    model, data, work = bench_inputs
    base = gt.planned_doc(model, data, "mixed", 64)
    base["optim"]["grad_accum"] = 4
    rows = {}
    for name in ("1gpu-z2", "2gpu-z2", "2gpu-z3-offload", "4gpu-z3"):
        gpus, stage, offload = mg.VARIANTS[name]
        cfg = parse_config(mg.variant_doc(name, base, work, 10, 5))
        rows[name] = cfg.optim.per_device_batch * cfg.optim.grad_accum * gpus
        assert cfg.deepspeed.stage == stage and cfg.deepspeed.offload_optimizer == offload and cfg.launch.gpus == gpus
        assert cfg.optim.compile == (stage < 3)  # as the planner decides: compiled under ZeRO-0..2 only
        assert not cfg.model.random_init  # every variant loads the same saved weights
        assert 0 < mg.predicted_gib(mg.variant_doc(name, base, work, 10, None), model, gpus) < 140
    assert set(rows.values()) == {4}


def test_llamafactory_variant_sees_the_same_records(bench_inputs):
    """The peer runs on the same conversations and images, in its sharegpt layout."""
    import json

    model, data, work = bench_inputs
    folder = gt.llamafactory_data(data)
    ours = [json.loads(line) for line in data.read_text().splitlines()]
    theirs = json.loads((folder / "train.json").read_text())
    assert [r["conversations"] for r in theirs] == [r["conversations"] for r in ours]
    for a, b in zip(ours, theirs):
        assert b["images"] == ([str((data.parent / a["image"]).resolve())] if "image" in a else [])
        assert all(Path(p).exists() for p in b["images"])
    info = json.loads((folder / "dataset_info.json").read_text())["bench"]
    assert info["formatting"] == "sharegpt" and info["columns"]["images"] == "images"
    args = gt.llamafactory_args(model, data, work / "lf", "mixed", "llamafactory-packed", 6, (100, 200))
    assert args["neat_packing"] and args["per_device_train_batch_size"] == 1 and args["lora_rank"] == 64 and args["freeze_vision_tower"]
    assert not args["freeze_multi_modal_projector"]  # mixed: the projector trains beside LoRA
    lora = gt.llamafactory_args(model, data, work / "lf", "lora", "llamafactory", 6, (100, 200))
    assert lora["finetuning_type"] == "lora" and lora["freeze_multi_modal_projector"] and lora["per_device_train_batch_size"] == 4


def test_benchmark_shapes_are_the_released_models_with_the_tiny_tokens(tmp_path):
    """Each shape has its released parameter count; its special-token ids are the tiny tokenizer's."""
    import json

    from qvltune.estimate import model_stats
    from qvltune.tiny import tiny_model_path

    tiny = json.loads((tiny_model_path() / "config.json").read_text())
    released = {"2b": 2_127_532_032, "8b": 8_767_123_696, "30b-a3b": 31_070_754_032}
    for shape, params in released.items():
        folder = gt.make_model_folder(tmp_path / shape, shape)
        config = json.loads((folder / "config.json").read_text())
        assert model_stats(config).total == params, shape
        assert (config["image_token_id"], config["vision_start_token_id"]) == (tiny["image_token_id"], tiny["vision_start_token_id"])
        assert (folder / "tokenizer.json").exists() and (folder / "chat_template.jinja").exists()


def test_llamafactory_step_counts_real_tokens_and_samples(tmp_path, bench_inputs):
    """Padded rows count their 1s; neat-packed rows (LLaMA-Factory's 4-D block-diagonal mask) count
    real tokens and samples; the summary divides by the measured seconds."""
    import json

    import torch

    import llamafactory_run as lf

    timer = lf.StepTimer(tmp_path / "steps.jsonl")
    timer._count(None, (), {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    assert timer.counts.tolist() == [5, 8, 2]
    # Row [sample 1 x2, sample 2 x3, pad], as LLaMA-Factory's prepare_4d_attention_mask builds it.
    idx = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = (idx[:, None, :, None] == idx[:, None, None, :]) & (idx != 0)[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    timer.counts = None
    timer._count(None, (), {"input_ids": torch.zeros(1, 6, dtype=torch.long), "attention_mask": mask})
    assert timer.counts.tolist() == [5, 6, 2]

    model, _, _ = bench_inputs
    steps = tmp_path / "s.jsonl"
    steps.write_text("".join(json.dumps({"step": s, "seconds": 2.0, "tokens": 8000, "slots": 8192, "samples": 10, "mem_peak_gb": 30.0}) + "\n" for s in range(1, 9)))
    summary = gt.summarise_steps(steps, warmup=4, weights=model)
    assert summary["tokens_per_s"] == 4000 and summary["samples_per_s"] == 5 and abs(summary["padding"] - 192 / 8192) < 1e-9
    assert 0 < summary["mfu"] < 1 and summary["status"] == "completed"

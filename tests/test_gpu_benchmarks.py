"""The CPU side of the GPU benchmarks (gpu_throughput.py, multi_gpu.py, zero3_overhead.py): the
configs they run are the planner's, every multi-GPU variant sees the same rows per optimizer step,
and the ZeRO-3 variants differ from ZeRO-2 only in what they compare."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_throughput as gt  # noqa: E402
import multi_gpu as mg  # noqa: E402
import zero3_overhead as z3  # noqa: E402

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
        assert cfg.optim.compile  # as the planner decides: compiled under every stage on GPUs
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

    from qvltune.model_stats import model_stats
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
    assert timer.counts.tolist() == [5, 8, 2, 0]  # real tokens, slots, samples, image patch rows
    # TRL passes input_ids positionally; a DPO reference pass (no gradients) is not a trained batch.
    timer._count(None, (torch.zeros(2, 4, dtype=torch.long),), {"attention_mask": torch.ones(2, 4), "pixel_values": torch.zeros(16, 1536)})
    with torch.no_grad():
        timer._count(None, (torch.zeros(2, 4, dtype=torch.long),), {"attention_mask": torch.ones(2, 4), "pixel_values": torch.zeros(16, 1536)})
    assert timer.counts.tolist() == [13, 16, 4, 16]
    # Row [sample 1 x2, sample 2 x3, pad], as LLaMA-Factory's prepare_4d_attention_mask builds it.
    idx = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = (idx[:, None, :, None] == idx[:, None, None, :]) & (idx != 0)[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    timer.counts = None
    timer._count(None, (), {"input_ids": torch.zeros(1, 6, dtype=torch.long), "attention_mask": mask})
    assert timer.counts.tolist() == [5, 6, 2, 0]

    model, _, _ = bench_inputs
    steps = tmp_path / "s.jsonl"
    steps.write_text("".join(json.dumps({"step": s, "seconds": 2.0, "tokens": 8000, "slots": 8192, "samples": 10, "mem_peak_gb": 30.0}) + "\n" for s in range(1, 9)))
    summary = gt.summarise_steps(steps, warmup=4, weights=model)
    assert summary["tokens_per_s"] == 4000 and summary["samples_per_s"] == 5 and abs(summary["padding"] - 192 / 8192) < 1e-9
    assert 0 < summary["mfu"] < 1 and summary["status"] == "completed"


def test_zero3_variants_change_only_the_stage_settings_and_compile(bench_inputs):
    from qvltune.catalog import builtin_config
    from qvltune.model_stats import model_stats
    from qvltune.zero import Zero3Sizes, zero3_tuning

    model, data, work = bench_inputs
    docs = {v: z3.variant_doc(f"2b-mixed-{v}", v, model, data, work, "mixed", 10, True, 64) for v in z3.VARIANTS}
    cfgs = {v: parse_config(d) for v, d in docs.items()}
    rows = {(c.data.max_seq_length, c.data.packing, c.optim.per_device_batch, c.optim.grad_accum, c.optim.gradient_checkpointing) for c in cfgs.values()}
    assert len(rows) == 1  # every variant runs the planner's rows
    assert {v: (c.deepspeed.stage, c.optim.compile) for v, c in cfgs.items()} == {"z2": (2, True), "z2-eager": (2, False), "z3": (3, True), "z3-eager": (3, False), "z3-defaults": (3, False)}
    stats = model_stats(builtin_config("2B"))
    assert cfgs["z3"].deepspeed.zero3.model_dump() == cfgs["z3-eager"].deepspeed.zero3.model_dump() == zero3_tuning(Zero3Sizes.of(stats, cfgs["z3"])).values()
    assert cfgs["z3-defaults"].deepspeed.zero3.model_dump() == {"prefetch_bucket_size": int(0.9 * 2048**2), "param_persistence_threshold": 20480, "max_live_parameters": 10**9, "max_reuse_distance": 10**9, "reduce_bucket_size": 2048**2, "overlap_comm": True}
    assert cfgs["z3"].schedule.profile_python and cfgs["z3"].schedule.profile_steps == (8, 1)
    assert cfgs["z2"].schedule.profile_steps is None  # only ZeRO-3 steps are profiled


def test_zero3_8b_full_is_cut_to_the_layers_zero2_fits(bench_inputs):
    """8B full fits one H200 under no stage: its row keeps 8B's layers, as many as ZeRO-2 fits."""
    import json

    _, data, work = bench_inputs
    folder, label = z3.model_for("8b-full", work, data, 64)
    layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert label == f"8B full, {layers} of 36 layers" and 0 < layers < 36
    assert z3.plan_fits_zero2(folder, data, "full", 64) and not z3.plan_fits_zero2(z3.cut_layers(folder.with_name("model-8b"), layers + 1), data, "full", 64)


def test_zero3_summary_table_and_grouped_profile(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "start", "time": 100.0}] + [{"kind": "train", "time": 100.0 + 10 * s, "step": s, "loss": 10.0 - s, "tokens_per_s": 1000.0 * s, "mem_peak_gb": 50.0 + s} for s in (2, 4, 6, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + [{"kind": "end", "time": 190.0, "status": "completed"}]))
    s = z3.summarise(run, warmup=4)
    assert s["tokens_per_s"] == 7000 and s["step_s"] == 10.0 and s["mem_peak_gb"] == 58.0 and s["losses"][2] == 8.0
    cut = z3.summarise(run, warmup=4, profiled=7)  # step 7 profiled, in the window logged at 8: left out
    assert cut["tokens_per_s"] == 6000 and cut["step_s"] == 10.0 and 8 not in cut["losses"]
    rows = [{"shape": "a", "variant": "z2", "label": "A", "rows": "1 x 1 x 1", "ckpt": "off", "compile": "yes", **s},
            {"shape": "a", "variant": "z3", "label": "A", "rows": "1 x 1 x 1", "ckpt": "off", "compile": "no", **s, "tokens_per_s": 3500.0}]
    text = z3.table(rows)
    assert "| A | z3 | 1 x 1 x 1 | off | no | 3,500 | 10.00 | 58.0 | 0.50 | - | 8.0000 |" in text

    fetch = "deepspeed/runtime/zero/partitioned_param_coordinator.py(310): fetch_sub_module"
    impl = "deepspeed/runtime/zero/partitioned_param_coordinator.py(352): _fetch_sub_module_impl"
    events = [
        {"ph": "X", "cat": "python_function", "name": fetch, "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "python_function", "name": impl, "ts": 10, "dur": 80, "tid": 1},  # nested: counted once
        {"ph": "X", "cat": "python_function", "name": fetch, "ts": 200, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 300, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL", "ts": 20, "dur": 30, "tid": 7},
        {"ph": "X", "cat": "kernel", "name": "ampere_bf16_gemm", "ts": 400, "dur": 600, "tid": 7},
        {"ph": "i", "name": "marker", "ts": 5},
    ]
    groups = {g["group"]: g for g in z3.profile_groups(events)}
    assert groups["ZeRO-3 gather (fetch + prefetch)"]["host_ms"] == 0.15 and groups["ZeRO-3 gather (fetch + prefetch)"]["calls"] == 3
    assert groups["all-gather (communication)"]["device_ms"] == 0.03 and groups["host syncs"]["host_ms"] == 0.02
    assert groups["compute kernels"]["device_ms"] == 0.6 and groups["profiled span"]["host_ms"] == 1.0
    assert "| host syncs | 0.0 | 0.0 | 1 |" in z3.profile_table(z3.profile_groups(events))

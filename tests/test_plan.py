"""The decision tree (qvltune.plan): a table of cases through every branch, and its small decisions."""

from __future__ import annotations

import pytest

from qvltune.catalog import builtin_config
from qvltune.config_checks import check_against_model, check_conflicts
from qvltune.estimate_inputs import DatasetSummary, Machine
from qvltune.model_stats import model_stats
from qvltune.units import GiB
from qvltune.plan import (
    DEFAULT_EFFECTIVE_BATCH,
    FIXED_PIXELS,
    Answers,
    choose_max_seq_length,
    choose_packing,
    default_name,
    effective_batch_target,
    make_plan,
    parse_answers,
    pixel_budget,
    recommend_model,
)
from qvltune.errors import UserError

MiB = 1024**2
MACHINES = {
    "8xA100": Machine("NVIDIA A100-SXM4-80GB", 81920 * MiB, 8, 1, 1024 * GiB, 312.0),
    "8xH200": Machine("NVIDIA H200", 143771 * MiB, 8, 1, 2048 * GiB, 989.0),
    "1xH200": Machine("NVIDIA H200", 143771 * MiB, 1, 1, 128 * GiB, 989.0),
    "1xA100": Machine("NVIDIA A100-SXM4-80GB", 81920 * MiB, 1, 1, 256 * GiB, 312.0),
    "4xA6000": Machine("NVIDIA RTX A6000", 49140 * MiB, 4, 1, 256 * GiB, 155.0),
    "1xA6000": Machine("NVIDIA RTX A6000", 49140 * MiB, 1, 1, 128 * GiB, 155.0),
    "1x4090": Machine("NVIDIA GeForce RTX 4090", 24564 * MiB, 1, 1, 64 * GiB, 165.0),
    "4xV100": Machine("Tesla V100-SXM2-32GB", 32768 * MiB, 4, 1, 256 * GiB, 125.0, bf16=False),
    "cpu": Machine(None, 24 * GiB, 0, 1, 24 * GiB, None, False),
}
# 5,000 records of ~2,600 tokens (784 of them image tokens): too long to pack (rows of one record).
DATA = DatasetSummary(records=5000, p50=2500, p99=3000, longest=3500, mean=2600.0, tokens=13_000_000, image_tokens=3_920_000, max_images_per_record=1, suggested_max_seq_length=3584, trained_tokens=1_000_000)
# 3,000 short records (~310 tokens): packed into rows of up to 8192 tokens.
SHORT = DatasetSummary(records=3000, p50=300, p99=500, longest=520, mean=310.0, tokens=930_000, image_tokens=600_000, max_images_per_record=1, suggested_max_seq_length=768, trained_tokens=60_000)


def stats(size):
    return model_stats(builtin_config(size))


def plan(machine="1xH200", size="8B", data=DATA, **answers):
    model = "builtin:tiny" if size == "tiny" else f"Qwen/Qwen3-VL-{size}-Instruct"
    if size == "tiny":
        from qvltune.model_stats import resolve_model_config

        st = model_stats(resolve_model_config("builtin:tiny")[0])
    else:
        st = stats(size)
    return make_plan(Answers(model=model, data="/data/train.jsonl", **answers), MACHINES[machine], st, data)


def choice(p, topic):
    return p.decision(topic).choice


# Each row walks one path; together they take every branch of the tree.
CASES = [
    # (id, machine, size, answers, expected {topic: choice} and config checks)
    ("8xA100 8B: full fits -> full, ZeRO-2, no checkpointing", "8xA100", "8B", {}, {"strategy": "full", "vision": "frozen", "zero": "ZeRO-2", "gradient checkpointing": "off", "learning rate": "5e-05"}),
    ("1xH200 8B: full does not fit -> mixed", "1xH200", "8B", {}, {"strategy": "mixed", "vision": "frozen", "zero": "ZeRO-2", "learning rate": "0.0001"}),
    ("fast turnaround -> LoRA + frozen vision", "8xA100", "8B", {"fast": True}, {"strategy": "lora", "vision": "frozen"}),
    ("domain shift, full fits -> vision trained fully", "8xA100", "2B", {"domain_shift": True}, {"strategy": "full", "vision": "full"}),
    ("domain shift, mixed -> vision LoRA", "1xH200", "8B", {"domain_shift": True}, {"strategy": "mixed", "vision": "lora"}),
    ("domain shift + fast -> LoRA, vision LoRA", "1xH200", "8B", {"domain_shift": True, "fast": True}, {"strategy": "lora", "vision": "lora"}),
    ("--strategy overrides the tree", "1xH200", "2B", {"strategy": "lora"}, {"strategy": "lora"}),
    ("checkpointing on when ZeRO-2 needs it", "1xA6000", "8B", {}, {"strategy": "mixed", "zero": "ZeRO-2", "gradient checkpointing": "on"}),
    ("ZeRO-3 when ZeRO-2 does not fit", "8xA100", "32B", {}, {"strategy": "mixed", "zero": "ZeRO-3"}),
    ("ZeRO-3 + optimizer offload", "4xA6000", "8B", {"strategy": "full"}, {"zero": "ZeRO-3 + offload optimizer"}),
    ("ZeRO-3 + optimizer and parameter offload", "1x4090", "8B", {}, {"strategy": "mixed", "zero": "ZeRO-3 + offload optimizer + params"}),
    ("MoE: ZeRO-2, never ZeRO-3", "1xA100", "30B-A3B", {}, {"strategy": "mixed", "zero": "ZeRO-2"}),
    ("MoE: ZeRO-2 + offload as last resort", "8xH200", "30B-A3B", {"strategy": "full"}, {"zero": "ZeRO-2 + offload optimizer"}),
    ("no bf16 on V100s -> fp32", "4xV100", "2B", {}, {"precision": "fp32"}),
    ("variable resolution", "1xH200", "8B", {"resolution": "variable"}, {"resolution": "variable"}),
    ("CPU + tiny model", "cpu", "tiny", {}, {"machine": "CPU", "precision": "fp32", "strategy": "full", "learning rate": "0.002"}),
]


@pytest.mark.parametrize("machine, size, answers, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tree(machine, size, answers, expected):
    p = plan(machine, size, **answers)
    for topic, value in expected.items():
        assert choice(p, topic) == value, (topic, p.decision(topic))
        assert p.decision(topic).why  # every branch says why
    cfg = p.config
    assert p.fits
    assert not check_conflicts(cfg) and not check_against_model(cfg, stats(size).model_type if size != "tiny" else "qwen3_vl")
    # the config says what the decisions say
    assert cfg.strategy == choice(p, "strategy") and cfg.modes()["vision"] == choice(p, "vision")
    assert cfg.optim.gradient_checkpointing == (choice(p, "gradient checkpointing") == "on")
    assert f"ZeRO-{cfg.deepspeed.stage}" in choice(p, "zero")
    assert cfg.deepspeed.offload_optimizer == ("offload optimizer" in choice(p, "zero"))
    assert cfg.deepspeed.offload_params == ("params" in choice(p, "zero"))
    assert cfg.optim.bf16 == (choice(p, "precision") == "bf16")
    # compiled decoder layers on bf16 GPUs, ZeRO-3 included (not on CPU or V100s, not with the
    # parameters offloaded: never measured compiled)
    assert cfg.optim.compile == (cfg.optim.bf16 and not cfg.deepspeed.offload_params)
    assert any(d.topic == "compile" for d in p.decisions) == cfg.optim.bf16
    if cfg.deepspeed.offload_params and cfg.optim.bf16:
        assert choice(p, "compile") == "off" and "offloaded" in p.decision("compile").why
    # the estimate is of the written config, and fits with the margin
    assert p.estimate.per_gpu <= MACHINES[machine].gpu_memory * 0.9
    # effective batch = per-device batch x accumulation x GPUs
    o = cfg.optim
    assert p.effective_batch == o.per_device_batch * o.grad_accum * MACHINES[machine].world_size == o.effective_batch
    assert cfg.optim.warmup_ratio == 0.03 and cfg.optim.scheduler == "cosine" and cfg.optim.weight_decay == 0.01


def test_learning_rates_by_strategy_and_vision():
    full = plan("8xA100", "2B", domain_shift=True).config
    assert full.optim.learning_rate == 5e-5 and full.lr_for("vision") == 1e-5 and full.lr_for("llm") == 5e-5
    mixed = plan("1xH200", "8B", domain_shift=True).config
    assert mixed.optim.learning_rate == 1e-4 and mixed.lr_for("vision") == 5e-5 and mixed.lr_for("merger") == 1e-4
    assert plan("1xH200", "8B").config.optim.component_lr.vision is None


def test_prefers_checkpointing_off_and_says_why_when_on():
    off = plan("8xA100", "8B")
    assert not off.config.optim.gradient_checkpointing and "no recomputed forward" in off.decision("gradient checkpointing").why
    on = plan("1xA6000", "8B")
    assert "without it this stage needs" in on.decision("gradient checkpointing").why


def test_cheapest_stage_first():
    # ZeRO-2 fits 8B full on 8 x A100: ZeRO-3 is never chosen although it would fit too.
    p = plan("8xA100", "8B")
    assert p.config.deepspeed.stage == 2


@pytest.mark.parametrize(
    "machine, size, answers, expect",
    [
        ("1x4090", "32B", {}, ["more GPUs: 8 x NVIDIA GeForce RTX 4090", "a smaller model: --model Qwen/Qwen3-VL-8B-Instruct"]),
        ("4xA6000", "30B-A3B", {}, ["a smaller model"]),
        ("1x4090", "8B", {"strategy": "full", "domain_shift": True}, ["LoRA: --strategy mixed would fit"]),
    ],
)
def test_nothing_fits_says_so_with_the_nearest_options(machine, size, answers, expect):
    p = plan(machine, size, **answers)
    assert not p.fits
    assert "nothing fits" in p.decision("zero").why
    text = "\n".join(p.suggestions)
    for e in expect:
        assert e in text, text
    assert p.config.optim.gradient_checkpointing  # the most frugal setting is written
    assert p.config.deepspeed.stage == (2 if size == "30B-A3B" else 3)


def test_suggestions_are_checked_by_the_estimator():
    """Applying the 'smaller model' suggestion gives a plan that fits."""
    p = plan("1x4090", "32B")
    smaller = next(s for s in p.suggestions if s.startswith("a smaller model"))
    size = smaller.split("Qwen3-VL-")[1].split("-Instruct")[0]
    assert plan("1x4090", size).fits


def test_shorter_rows_fewer_pixels_and_a_frozen_tower_suggested():
    # 16k-token records of 40 images each, the vision tower trained, on a 24 GB GPU
    many_images = DatasetSummary(2000, 8192, 15384, 16384, 8192.0, 16_000_000, 15_000_000, 40, 16384, 500_000)
    p = plan("1x4090", "2B", data=many_images, domain_shift=True, resolution="variable")
    assert not p.fits
    starts = ("a frozen vision tower (--no-domain-shift) would fit", "lower max_pixels: --max-image-tokens", "shorter rows: --max-seq-length 8192")
    assert len(p.suggestions) == 3 and all(s.startswith(x) for s, x in zip(p.suggestions, starts)), p.suggestions
    assert "records longer than 8192 would be skipped" in p.suggestions[-1]


def test_cpu_with_a_real_model_does_not_fit():
    p = plan("cpu", "2B")
    assert not p.fits and "impractically slow" in p.warnings[0]
    tiny = plan("cpu", "tiny")
    assert tiny.fits and tiny.config.optim.optimizer == "adamw_torch" and tiny.config.launch.cpu_processes == 1


def test_multi_node():
    p = plan("8xA100", "8B", nodes=2)
    assert p.config.launch.nodes == 2 and p.config.launch.hostfile == "hostfile"
    assert p.machine.world_size == 8 and "hostfile" in p.decision("nodes").why


def test_effective_batch_meets_the_target():
    p = plan("8xA100", "8B")
    assert p.effective_batch == DEFAULT_EFFECTIVE_BATCH
    p = plan("1xH200", "2B", effective_batch=16)
    assert p.effective_batch == 16
    small = DatasetSummary(200, 2500, 3000, 3100, 2600.0, 520_000, 150_000, 1, 3584, 40_000)
    assert plan("1xH200", "2B", data=small).effective_batch == 8  # >= 20 steps per epoch


def test_packing_counts_rows_not_samples():
    p = plan("1xH200", "8B", data=SHORT)
    assert p.config.data.packing and p.config.optim.per_device_batch == 1
    per_row = int(p.config.data.max_seq_length // SHORT.mean)
    assert p.effective_batch == round(DEFAULT_EFFECTIVE_BATCH / per_row)
    assert f"packed rows of ~{per_row} samples" in p.decision("effective batch").why


def test_every_plan_config_validates_and_names_itself():
    for _, machine, size, answers, _ in CASES:
        p = plan(machine, size, **answers)
        assert p.config.name == p.doc["name"] and p.config.name.endswith(p.config.strategy)


# -- the small decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answers, expected",
    [
        ({"resolution": "fixed"}, (FIXED_PIXELS, FIXED_PIXELS)),
        ({"resolution": "fixed", "max_image_tokens": 256}, (262144, 262144)),
        ({"resolution": "variable"}, (50176, 802816)),
        ({"resolution": "variable", "max_image_tokens": 32}, (32768, 32768)),
        ({"model": "builtin:tiny"}, (65536, 65536)),  # fixed (the default answer), at the tiny model's size
        ({"model": "builtin:tiny", "resolution": "variable"}, (4096, 65536)),
    ],
)
def test_pixel_budget(answers, expected):
    lo, hi, why = pixel_budget(Answers(**answers))
    assert (lo, hi) == expected and why


@pytest.mark.parametrize(
    "answers, data, expected",
    [
        ({"max_seq_length": 2048}, DATA, (2048, True)),  # given, shorter than the longest record (3,500): those are skipped, as the reason says
        ({"max_seq_length": 4096}, DATA, (4096, False)),
        ({}, SHORT, (768, False)),  # the longest fits: nothing skipped
        ({}, DatasetSummary(100, 500, 1000, 9000, 600.0, 60000, 0, 0, 1024, 1000), (1024, True)),  # outliers: p99, skip the rest
        ({}, None, (4096, False)),
    ],
)
def test_max_seq_length(answers, data, expected):
    seq, skip, why = choose_max_seq_length(Answers(**answers), data)
    assert (seq, skip) == expected and why


def test_outliers_are_skipped_in_the_config():
    data = DatasetSummary(5000, 500, 1000, 9000, 600.0, 3_000_000, 0, 0, 1024, 100_000)
    assert plan("1xH200", "2B", data=data).config.data.on_bad_sample == "skip"


@pytest.mark.parametrize(
    "packing, data, seq, on",
    [
        ("auto", SHORT, 4096, True),
        ("auto", DATA, 3584, False),
        ("auto", None, 4096, False),
        ("on", DATA, 3584, True),
        ("off", SHORT, 4096, False),
    ],
)
def test_packing(packing, data, seq, on):
    got, why = choose_packing(Answers(packing=packing), data, seq)
    assert got == on and why


@pytest.mark.parametrize(
    "answers, data, target",
    [({}, DATA, 64), ({"effective_batch": 128}, DATA, 128), ({}, DatasetSummary(300, 1, 1, 1, 1.0, 300, 0, 0, 256, 0), 8), ({"model": "builtin:tiny"}, DATA, 32)],
)
def test_effective_batch_target(answers, data, target):
    assert effective_batch_target(Answers(**answers), data)[0] == target


@pytest.mark.parametrize(
    "machine, model",
    [("cpu", "builtin:tiny"), ("1x4090", "Qwen/Qwen3-VL-2B-Instruct"), ("1xA6000", "Qwen/Qwen3-VL-8B-Instruct"), ("8xA100", "Qwen/Qwen3-VL-8B-Instruct")],
)
def test_recommended_model(machine, model):
    assert recommend_model(MACHINES[machine]) == model


@pytest.mark.parametrize(
    "answers, name",
    [
        ({"model": "Qwen/Qwen3-VL-8B-Instruct"}, "qwen3vl-8b-mixed"),
        ({"model": "builtin:tiny"}, "tiny-mixed"),
        ({"model": "/models/my fine tune/"}, "my-fine-tune-mixed"),
        ({"model": "x", "name": "run1"}, "run1"),
    ],
)
def test_default_name(answers, name):
    assert default_name(Answers(**answers), "mixed") == name


def test_answers_are_strict():
    with pytest.raises(UserError) as e:
        parse_answers({"modle": "x", "nodes": 0, "packing": "maybe"})
    msg = e.value.message
    assert "modle: unknown key" in msg and "nodes" in msg and "packing" in msg


def test_packed_rows_start_long_and_halve():
    from qvltune.plan import row_lengths

    assert row_lengths(Answers(), SHORT, 768, True) == [32768, 16384, 8192, 4096, 2048, 1024, 768]
    assert row_lengths(Answers(max_seq_length=2048), SHORT, 2048, True) == [2048]  # given: kept
    assert row_lengths(Answers(), SHORT, 768, False) == [768]
    assert row_lengths(Answers(), SHORT, 9000, True) == [32768, 16384, 9000]  # never shorter than the longest record
    # 141 GB: 16k rows fit without checkpointing (32k would hold ~105 samples, above the batch of 64).
    roomy = plan("1xH200", "2B", data=SHORT)
    assert roomy.config.data.max_seq_length == 16384 and not roomy.config.optim.gradient_checkpointing
    assert "fits without gradient checkpointing" in roomy.decision("max_seq_length").why
    # 80 GB: 16k rows of the 8B model would need checkpointing, so the guide's 8192 (checkpointed) is kept.
    a100 = plan("1xA100", "8B", data=SHORT)
    assert a100.config.data.max_seq_length <= 8192
    tight = plan("1x4090", "2B", data=SHORT)  # 8192 and 4096 need checkpointing on 24 GB; 2048 does not
    assert tight.config.data.max_seq_length == 2048 and not tight.config.optim.gradient_checkpointing
    assert "halved from the guide's 8192" in tight.decision("max_seq_length").why


def test_packed_rows_shrink_to_keep_the_effective_batch():
    # 8 GPUs x one 8192-token row of ~26 short samples would be ~210 samples per step, far above 64.
    p = plan("8xH200", "8B", data=SHORT)
    per_row = int(p.config.data.max_seq_length // SHORT.mean)
    assert p.config.data.max_seq_length == 2048 and 8 * per_row <= DEFAULT_EFFECTIVE_BATCH
    assert p.effective_batch == 8 and "halved from the guide's 8192" in p.decision("max_seq_length").why


def test_preference_tuning_scales_every_learning_rate_and_says_so():
    """DPO's factor applied to the LLM's rate only left a LoRA vision tower at 10x the LLM's rate,
    and the plan's learning-rate line showed the SFT rate."""
    from qvltune.plan.rules import DPO_LR_FACTOR, LR_LORA, LR_VISION_LORA

    p = plan("1xH200", "8B", stage="dpo", strategy="lora", domain_shift=True)
    o = p.config.optim
    assert o.learning_rate == pytest.approx(LR_LORA * DPO_LR_FACTOR) and o.component_lr.vision == pytest.approx(LR_VISION_LORA * DPO_LR_FACTOR)
    assert float(choice(p, "learning rate")) == pytest.approx(o.learning_rate) and "preference tuning" in p.decision("learning rate").why

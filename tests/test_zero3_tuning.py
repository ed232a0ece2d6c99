"""ZeRO-3's settings from the model's sizes (``qvltune.zero.zero3_tuning``): the table of rules, the
sizes read off a real model, and the DeepSpeed JSON that carries them."""

from __future__ import annotations

import pytest

from qvltune.catalog import builtin_config
from qvltune.config import RunConfig, parse_config
from qvltune.errors import UserError
from qvltune.model_stats import model_stats
from qvltune.zero import STAGE3_MAX_LIVE_PARAMETERS, ZERO12_BUCKET_SIZE, Zero3Sizes, deepspeed_config, zero3_tuning

LIVE = int(STAGE3_MAX_LIVE_PARAMETERS)


def sizes(**kw) -> Zero3Sizes:
    base = dict(hidden=2048, block=52_826_368, vision_block=12_596_224, largest_tensor=311_164_928, smallest_matrix=1_048_576, largest_vector=6144, lora_matrix=393_216, lora_total=69_730_304, trained_block=2_490_368)
    return Zero3Sizes(**{**base, **kw})


# (case, sizes, expected prefetch, persistence, reduce bucket)
TABLE = [
    # LoRA: every adapter matrix persists; a layer's adapters fit the Trainer's hidden^2 bucket
    ("2B mixed", sizes(), 52_826_368, 393_216, 2048**2),
    # full: only norms and biases persist; one reduction per layer
    ("2B full", sizes(block=50_336_000, lora_matrix=0, lora_total=0, trained_block=50_336_000), 50_336_000, 6144, 50_336_000),
    # a LoRA matrix larger than the smallest weight matrix: the threshold stays below the weights
    ("32B mixed", sizes(hidden=5120, block=495_986_944, smallest_matrix=1_327_104, largest_vector=25_600, lora_matrix=1_638_400, trained_block=8_388_608), 495_986_944, 1_327_103, 5120**2),
    # a layer beyond half the live budget: prefetch what the budget leaves; the bucket stops at 5e8
    ("huge layer", sizes(hidden=8192, block=700_000_000, lora_matrix=0, lora_total=0, trained_block=700_000_000), LIVE - 700_000_000, 6144, int(ZERO12_BUCKET_SIZE)),
    # the LLM frozen (vision LoRA only): nothing to reduce per layer, the Trainer's bucket
    ("frozen LLM", sizes(trained_block=0), 52_826_368, 393_216, 2048**2),
]


@pytest.mark.parametrize("case, z, prefetch, persistence, bucket", TABLE, ids=[t[0] for t in TABLE])
def test_zero3_settings_table(case, z, prefetch, persistence, bucket):
    t = zero3_tuning(z)
    assert (t.prefetch_bucket_size, t.param_persistence_threshold, t.reduce_bucket_size) == (prefetch, persistence, bucket)
    assert t.max_live_parameters == t.max_reuse_distance == LIVE and t.overlap_comm
    assert set(t.why) == set(t.values()) and all(t.why.values())
    # the reasons carry the numbers that chose the values
    assert f"{t.prefetch_bucket_size / 1e6:.1f}M" in t.why["prefetch_bucket_size"]
    assert f"{z.smallest_matrix / 1e6:.1f}M" in t.why["param_persistence_threshold"]


@pytest.mark.parametrize("size", ["2B", "8B", "32B"])
@pytest.mark.parametrize("strategy", ["mixed", "full"])
def test_released_shapes_keep_weights_partitioned_and_small_tensors_whole(size, strategy):
    cfg = parse_config({"name": "x", "model": {"path": f"Qwen/Qwen3-VL-{size}-Instruct"}, "data": {"train": "t.jsonl"}, "strategy": strategy})
    stats = model_stats(builtin_config(size))
    z = Zero3Sizes.of(stats, cfg)
    t = zero3_tuning(z)
    # every weight matrix stays partitioned; every norm weight (hidden, head_dim) persists
    assert z.hidden <= t.param_persistence_threshold < min(lin.in_features * lin.out_features for lin in stats.linears)
    if strategy == "mixed" and size != "32B":
        assert t.param_persistence_threshold >= z.lora_matrix > 0  # every LoRA A/B matrix persists
    # the next layer is prefetched whole, within the live budget the estimator counts
    assert t.prefetch_bucket_size == z.block and t.prefetch_bucket_size + z.block <= LIVE
    assert t.reduce_bucket_size >= (z.trained_block if strategy == "full" else z.hidden**2)


def test_sizes_are_read_off_the_model(tiny_model_dir):
    """Zero3Sizes.of (from config.json alone) against the tiny model with LoRA applied."""
    from qvltune.model import apply_strategy, load_model
    from qvltune.model_stats import resolve_model_config

    cfg = RunConfig.model_validate({"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "t.jsonl"}, "strategy": "mixed", "components": {"vision": "lora"}, "lora": {"rank": 8}})
    z = Zero3Sizes.of(model_stats(resolve_model_config(str(tiny_model_dir))[0]), cfg)
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32"), cfg)
    named = dict(model.named_parameters())
    layer0 = {n: p for n, p in named.items() if ".language_model.layers.0." in n}
    assert z.block == sum(p.numel() for p in layer0.values())
    assert z.trained_block == sum(p.numel() for p in layer0.values() if p.requires_grad)
    assert z.lora_matrix == max(p.numel() for n, p in named.items() if "lora_" in n)
    assert z.lora_total == sum(p.numel() for n, p in named.items() if "lora_" in n)
    base = [p for n, p in named.items() if p.dim() == 2 and "lora_" not in n and "embed" not in n]
    assert z.smallest_matrix == min(p.numel() for p in base)
    assert max(p.numel() for p in named.values() if p.dim() == 1) <= z.largest_vector
    assert z.largest_tensor == max(p.numel() for n, p in named.items() if "lora_" not in n)


def test_deepspeed_json_carries_the_settings():
    doc = {"name": "x", "model": {"path": "Qwen/Qwen3-VL-2B-Instruct"}, "data": {"train": "t.jsonl"}, "strategy": "mixed", "deepspeed": {"stage": 3}}
    stats = model_stats(builtin_config("2B"))
    cfg = parse_config(doc)
    tuned = zero3_tuning(Zero3Sizes.of(stats, cfg))
    zero = deepspeed_config(cfg, stats)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == tuned.prefetch_bucket_size and zero["stage3_param_persistence_threshold"] == tuned.param_persistence_threshold
    assert zero["reduce_bucket_size"] == tuned.reduce_bucket_size and zero["stage3_max_live_parameters"] == LIVE and zero["overlap_comm"] is True
    # the config's own values win; without the model's sizes, the Trainer's "auto"
    given = parse_config({**doc, "deepspeed": {"stage": 3, "zero3": {"prefetch_bucket_size": 123, "overlap_comm": False}}})
    zero = deepspeed_config(given, stats)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 123 and zero["overlap_comm"] is False and zero["reduce_bucket_size"] == tuned.reduce_bucket_size
    assert deepspeed_config(cfg)["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"
    assert "stage3_prefetch_bucket_size" not in deepspeed_config(parse_config({**doc, "deepspeed": {"stage": 2}}), stats)["zero_optimization"]
    with pytest.raises(UserError, match="deepspeed.zero3: ZeRO-3 settings with stage 2"):
        parse_config({**doc, "deepspeed": {"stage": 2, "zero3": {"prefetch_bucket_size": 1}}})


def test_the_planner_writes_the_settings_it_explains():
    """Under ZeRO-3 (32B on 8 A100s) the plan's config carries zero3_tuning's values; one GPU never
    plans ZeRO-3 without offloading the parameters (it would partition nothing)."""
    from qvltune.estimate_inputs import Machine
    from qvltune.plan import Answers, make_plan
    from qvltune.units import GiB

    a100x8 = Machine("NVIDIA A100-SXM4-80GB", 80 * GiB, 8, 1, 1024 * GiB, 312.0, True)
    answers = Answers(model="Qwen/Qwen3-VL-32B-Instruct", strategy="mixed")
    stats = model_stats(builtin_config("32B"))
    plan = make_plan(answers, a100x8, stats)
    assert plan.config.deepspeed.stage == 3
    assert plan.config.deepspeed.zero3.model_dump() == zero3_tuning(Zero3Sizes.of(stats, plan.config)).values()
    assert "prefetch_bucket_size 495986944:" in plan.decision("zero-3 settings").why
    one = make_plan(Answers(model="Qwen/Qwen3-VL-8B-Instruct", strategy="full"), Machine("NVIDIA H200", int(139.8 * GiB), 1, 1, 1024 * GiB, 989.0, True), model_stats(builtin_config("8B")))
    assert (one.config.deepspeed.stage, one.config.deepspeed.offload_optimizer) == (2, True)
    assert all(d.topic != "zero-3 settings" for d in one.decisions)


def test_the_estimator_counts_the_reduce_bucket_zero3_allocates():
    """ZeRO-3 allocates one reduce buffer of reduce_bucket_size elements (stage3.py): the estimate
    counts the size the JSON carries (one 8B full decoder layer's parameters, or the config's)."""
    from qvltune.estimate import estimate
    from qvltune.estimate_inputs import Machine
    from qvltune.units import GiB

    stats = model_stats(builtin_config("8B"))
    two = Machine("NVIDIA H200", int(139.8 * GiB), 2, 1, 256 * GiB, 989.0, True)
    doc = {"name": "x", "model": {"path": "Qwen/Qwen3-VL-8B-Instruct"}, "data": {"train": "t.jsonl"}, "strategy": "full", "deepspeed": {"stage": 3}}
    for zero3 in ({}, {"reduce_bucket_size": 1000}):
        cfg = parse_config({**doc, "deepspeed": {"stage": 3, "zero3": zero3}})
        bucket = deepspeed_config(cfg, stats)["zero_optimization"]["reduce_bucket_size"]
        terms = {t.name: t.bytes for t in estimate(cfg, stats, two).gpu_terms}
        assert terms["gradient buckets"] == 2 * bucket and bucket == (zero3 or {"reduce_bucket_size": stats.layer_params})["reduce_bucket_size"]


def test_compiled_zero3_keeps_the_plain_linear():
    """With compiled layers, ZeRO-3's JSON turns off DeepSpeed's replacement of
    ``torch.nn.functional.linear`` (its backward reads each weight's ``ds_id``, which dynamo turned
    into one graph per layer); DeepSpeed's own config parser must read the key as written."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    doc = {"name": "x", "model": {"path": "Qwen/Qwen3-VL-2B-Instruct"}, "data": {"train": "t.jsonl"}, "strategy": "mixed", "deepspeed": {"stage": 3}}
    stats = model_stats(builtin_config("2B"))
    compiled = deepspeed_config(parse_config({**doc, "optim": {"compile": True}}), stats)["zero_optimization"]
    eager = deepspeed_config(parse_config(doc), stats)["zero_optimization"]
    assert DeepSpeedZeroConfig(**compiled).memory_efficient_linear is False
    assert DeepSpeedZeroConfig(**eager).memory_efficient_linear is True  # DeepSpeed's default kept when eager

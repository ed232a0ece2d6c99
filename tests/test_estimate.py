"""The estimator: parameter counts from config.json alone (meta device), memory terms by ZeRO stage,
checkpointing, LoRA and offload, FLOPs and time; checked against the real tiny model where it can be."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qvltune.catalog import QWEN3_VL_CONFIGS, builtin_config, size_of
from qvltune.config import parse_config
from qvltune.estimate import ASSUMED_UTILIZATION, CUDA_CONTEXT_BYTES, OPTIMIZER_STATE_BYTES, estimate
from qvltune.estimate_inputs import Machine, summarize_report, workload_for
from qvltune.model_stats import _config_object, lora_params, model_stats, resolve_model_config
from qvltune.units import GiB

H200 = Machine("NVIDIA H200", 143771 * 1024**2, 1, 1, 128 * GiB, 989.0)
A100x8 = Machine("NVIDIA A100-SXM4-80GB", 80 * GiB, 8, 1, 1024 * GiB, 312.0)
CPU = Machine(None, 24 * GiB, 0, 1, 24 * GiB, None, False)


def conf(strategy="mixed", **over):
    doc = {"name": "t", "model": {"path": "Qwen/Qwen3-VL-8B-Instruct"}, "data": {"train": "d.jsonl", "max_seq_length": 4096, "min_pixels": 802816, "max_pixels": 802816}, "strategy": strategy}
    for dotted, value in over.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(doc)


def terms(est):
    return {t.name: t.bytes for t in est.gpu_terms}


@pytest.fixture(scope="module")
def s8():
    return model_stats(builtin_config("8B"))


@pytest.fixture(scope="module")
def s2():
    return model_stats(builtin_config("2B"))


# -- the built-in configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, total, tied, vision, llm",
    [
        ("2B", 2_127_532_032, True, 306_242_560, 1_409_410_048),
        ("4B", 4_437_815_808, True, None, None),
        ("8B", 8_767_123_696, False, 415_891_440, 6_946_075_648),
        ("32B", 33_357_390_064, False, None, None),
        ("30B-A3B", 31_070_754_032, False, None, None),
    ],
)
def test_builtin_configs_match_the_released_parameter_counts(size, total, tied, vision, llm):
    s = model_stats(builtin_config(size))
    assert s.total == total and s.tied == tied
    if vision:
        assert s.params["vision"] == vision and s.params["llm"] == llm
    assert s.params["lm_head"] == s.vocab * s.hidden * (1 if tied else 2)


@pytest.mark.parametrize(
    "size, hidden, layers, heads, kv, inter, vdepth, vhidden, vout, deepstack",
    [
        ("2B", 2048, 28, 16, 8, 6144, 24, 1024, 2048, [5, 11, 17]),
        ("4B", 2560, 36, 32, 8, 9728, 24, 1024, 2560, [5, 11, 17]),
        ("8B", 4096, 36, 32, 8, 12288, 27, 1152, 4096, [8, 16, 24]),
        ("32B", 5120, 64, 64, 8, 25600, 27, 1152, 5120, [8, 16, 24]),
        ("30B-A3B", 2048, 48, 32, 4, 6144, 27, 1152, 2048, [8, 16, 24]),
    ],
)
def test_builtin_configs_use_transformers_field_names(size, hidden, layers, heads, kv, inter, vdepth, vhidden, vout, deepstack):
    c = _config_object(builtin_config(size))  # Qwen3VLConfig / Qwen3VLMoeConfig: unknown names would be ignored
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size, t.vocab_size) == (hidden, layers, heads, kv, 128, inter, 151936)
    assert (v.depth, v.hidden_size, v.out_hidden_size, list(v.deepstack_visual_indexes), v.patch_size, v.spatial_merge_size, v.num_position_embeddings) == (vdepth, vhidden, vout, deepstack, 16, 2, 2304)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["rope_theta"] == 5_000_000
    if size == "30B-A3B":
        assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (128, 8, 768)


@pytest.mark.parametrize(
    "name, size",
    [
        ("Qwen/Qwen3-VL-8B-Instruct", "8B"),
        ("Qwen/Qwen3-VL-2B-Thinking", "2B"),
        ("qwen/qwen3-vl-30b-a3b-instruct", "30B-A3B"),
        ("Qwen/Qwen3-VL-32B-Instruct-FP8", "32B"),
        ("Qwen/Qwen3-VL-235B-A22B-Instruct", None),
        ("Qwen/Qwen2.5-VL-7B-Instruct", None),
        ("./my-model", None),
    ],
)
def test_size_of_hub_ids(name, size):
    assert size_of(name) == size
    assert (builtin_config(name) is None) == (size is None)


def test_builtin_config_is_a_copy():
    builtin_config("8B")["text_config"]["hidden_size"] = 1
    assert QWEN3_VL_CONFIGS["8B"]["text_config"]["hidden_size"] == 4096


def test_resolve_model_config_offline_for_known_ids(tmp_path):
    config, source = resolve_model_config("Qwen/Qwen3-VL-4B-Instruct")
    assert config["text_config"]["hidden_size"] == 2560 and "built-in" in source


def test_moe_active_parameters(s8):
    moe = model_stats(builtin_config("30B-A3B"))
    assert moe.is_moe and not s8.is_moe
    assert 2.5e9 < moe.llm_active_params() < 3.5e9  # "A3B": ~3 B active (LLM part)
    assert s8.llm_active_params() == s8.params["llm"]


# -- against the real tiny model -------------------------------------------------------------------


@pytest.mark.parametrize("strategy, components", [("full", {}), ("mixed", {}), ("lora", {"vision": "lora"}), ("mixed", {"lm_head": "full"})])
def test_counts_match_the_real_model(tiny_model_dir, strategy, components):
    """Per-component totals and trainable counts (LoRA included) equal those of the model qvltune
    actually builds (qvltune.model.apply_strategy + trainable_table)."""
    from qvltune.model import apply_strategy, load_model, trainable_table

    doc = {"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "d.jsonl"}, "strategy": strategy, "components": components, "optim": {"bf16": False}}
    cfg = parse_config(doc)
    stats = model_stats(resolve_model_config(str(tiny_model_dir))[0])
    est = estimate(cfg, stats, CPU)
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa"), cfg)
    real = {s.component: s for s in trainable_table(model, cfg)}
    for c in est.components:
        assert c.params == real[c.component].total, c
        expected = real[c.component].trainable
        if c.mode == "full" and cfg.uses_lora():
            expected = real[c.component].total  # peft's trainable copy; the frozen original is counted in weights
        assert c.trainable == expected, c
    assert est.lora_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_flops_per_token_is_the_workers_rule(tiny_model_dir):
    from qvltune.model import load_model
    from qvltune.worker import llm_flops_per_token

    cfg = parse_config({"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "d.jsonl"}, "strategy": "full", "optim": {"bf16": False}})
    stats = model_stats(resolve_model_config(str(tiny_model_dir))[0])
    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa")
    assert estimate(cfg, stats, CPU).flops_per_token == llm_flops_per_token(model)


@pytest.mark.parametrize("size", ["8B", "30B-A3B"])
def test_released_shapes_count_the_parameters_a_token_passes_through(size):
    """MFU's 6N: all LLM weights of a dense model; of the MoE, the 8 of 128 experts a token is routed to."""
    from qvltune.model_stats import meta_model
    from qvltune.worker import llm_flops_per_token

    model = meta_model(builtin_config(size))
    assert llm_flops_per_token(model) == pytest.approx(6.0 * model_stats(builtin_config(size)).llm_active_params())


def test_lora_parameters_of_2b(s2):
    # rank 64 on q,k,v,o,gate,up,down of 28 layers: 64 x (4096 + 3072 + 3072 + 4096 + 3 x 8192) x 28
    assert lora_params(s2, conf("lora"))["llm"] == 64 * 38912 * 28
    assert lora_params(s2, conf("lora", lora__rank=8, lora__target_modules=["q_proj", "v_proj"]))["llm"] == 8 * (4096 + 3072) * 28
    assert lora_params(s2, conf("full")) == dict.fromkeys(("vision", "merger", "deepstack", "llm", "lm_head"), 0)


def test_moe_lora_adapts_attention_only():
    moe = model_stats(builtin_config("30B-A3B"))
    h, q, kv = 2048, 32 * 128, 4 * 128
    per_layer = 64 * ((h + q) + 2 * (h + kv) + (q + h))
    assert lora_params(moe, conf("lora"))["llm"] == per_layer * 48


# -- memory terms ---------------------------------------------------------------------------------


def test_zero_stages_partition_what_they_should(s8):
    W = A100x8.world_size
    z2 = estimate(conf("full", deepspeed__stage=2), s8, A100x8)
    z3 = estimate(conf("full", deepspeed__stage=3), s8, A100x8)
    t2, t3 = terms(z2), terms(z3)
    T = z2.trainable_params
    assert t2["weights"] == 2 * s8.total  # ZeRO-2: every rank holds all bf16 weights
    assert t3["weights"] == 2 * s8.total / W  # ZeRO-3 partitions them
    assert t2["optimizer states"] == t3["optimizer states"] == OPTIMIZER_STATE_BYTES * T / W
    assert t2["gradients"] == 2 * T / W
    assert "gathered parameters" in t3 and "gathered parameters" not in t2
    assert z3.peak_allocated < z2.peak_allocated


def test_offload_moves_optimizer_states_to_the_host(s8):
    on = estimate(conf("full", deepspeed__stage=3, deepspeed__offload_optimizer=True, deepspeed__offload_params=True), s8, A100x8)
    off = estimate(conf("full", deepspeed__stage=3), s8, A100x8)
    assert "optimizer states" not in terms(on) and "weights" not in terms(on)
    host = {t.name: t.bytes for t in on.host_terms}
    T, W = on.trainable_params, A100x8.world_size
    assert host["optimizer states (offloaded)"] == pytest.approx(16 * T / W * 8)  # 8 ranks on the node
    assert host["weights (offloaded)"] == pytest.approx(2 * s8.total)
    assert on.peak_allocated < off.peak_allocated
    assert on.host_fits(A100x8.host_ram) and not on.host_fits(64 * GiB)


def test_checkpointing_cuts_activations_and_scales_with_tokens(s8):
    off = terms(estimate(conf("lora", optim__gradient_checkpointing=False), s8, H200))
    on = terms(estimate(conf("lora", optim__gradient_checkpointing=True), s8, H200))
    assert on["LLM activations"] < off["LLM activations"] / 5
    half = terms(estimate(conf("lora", optim__gradient_checkpointing=False, data__max_seq_length=2048), s8, H200))
    assert half["LLM activations"] == pytest.approx(off["LLM activations"] / 2)


def test_full_layer_activation_formula(s8):
    """Full training, no mask: 16h + 12 q_dim + 10 kv_dim + 8i bytes per token per layer (see estimate.py)."""
    est = estimate(conf("full", optim__gradient_checkpointing=False), s8, H200)
    h, q, kv, i = 4096, 4096, 1024, 12288
    per_layer = 16 * h + 12 * q + 10 * kv + 8 * i
    assert terms(est)["LLM activations"] == pytest.approx(4096 * per_layer * (36 + 1))


def test_vision_tower_activations_only_when_it_trains(s2):
    frozen = terms(estimate(conf("mixed", optim__gradient_checkpointing=False), s2, H200))
    trained = terms(estimate(conf("mixed", components__vision="lora", optim__gradient_checkpointing=False), s2, H200))
    assert "vision activations" not in frozen and trained["vision activations"] > 1 * GiB
    fewer = terms(estimate(conf("mixed", components__vision="lora", optim__gradient_checkpointing=False, data__min_pixels=200704, data__max_pixels=200704), s2, H200))
    assert fewer["vision activations"] == pytest.approx(trained["vision activations"] * 196 / 784)


def test_fused_loss_is_much_smaller_than_full_logits(s8):
    fused = terms(estimate(conf("lora"), s8, H200))
    plain = terms(estimate(conf("lora", optim__fused_loss=False), s8, H200))
    assert plain["logits + loss"] == 4096 * 151936 * 12
    assert fused["loss (fused)"] < plain["logits + loss"] / 2
    # lm_head trained beside LoRA: peft wraps it, the worker falls back to plain logits
    assert "logits + loss" in terms(estimate(conf("mixed", components__lm_head="full"), s8, H200))


def test_masks_only_for_sdpa(s2):
    packed_gpu = terms(estimate(conf("lora", data__packing=True), s2, H200))  # auto -> varlen on GPUs
    packed_sdpa = terms(estimate(conf("lora", data__packing=True, model__attn_implementation="sdpa"), s2, H200))
    assert "attention mask" not in packed_gpu and packed_sdpa["attention mask"] == 4096**2
    assert packed_sdpa["LLM activations"] > packed_gpu["LLM activations"]  # sdpa repeats k/v with a mask


def test_dtype_scales_weights(s2):
    bf16 = terms(estimate(conf("full"), s2, H200))
    fp32 = terms(estimate(conf("full", optim__bf16=False), s2, H200))
    assert fp32["weights"] == 2 * bf16["weights"]


def test_peak_at_the_optimizer_step_when_states_dominate(s8):
    est = estimate(conf("full", optim__gradient_checkpointing=True, data__max_seq_length=1024), s8, H200)
    assert est.peak_phase == "optimizer step" and "optimizer-step temporaries" in terms(est)


def test_fits_keeps_a_margin_and_adds_the_overhead(s2):
    est = estimate(conf("lora"), s2, H200)
    assert est.per_gpu == pytest.approx(est.peak_allocated * 1.05 + CUDA_CONTEXT_BYTES)
    assert est.fits(int(est.per_gpu / 0.9) + 1) and not est.fits(int(est.per_gpu / 0.9) - 10**6)
    assert estimate(conf("lora"), s2, CPU).overhead == 0


def test_time_per_epoch(s8):
    wl = replace(workload_for(conf("mixed")), tokens_per_epoch=10_000_000)
    est = estimate(conf("mixed"), s8, A100x8, wl)
    assert est.seconds_per_epoch == pytest.approx(1e7 * est.step_flops_per_token / (8 * 312e12 * ASSUMED_UTILIZATION))
    assert estimate(conf("mixed"), s8, A100x8).seconds_per_epoch is None  # no dataset: no time
    # LoRA's backward skips weight gradients; checkpointing adds a forward
    full = estimate(conf("full", optim__gradient_checkpointing=False), s8, A100x8, wl).step_flops_per_token
    lora = estimate(conf("lora", optim__gradient_checkpointing=False), s8, A100x8, wl).step_flops_per_token
    ckpt = estimate(conf("lora", optim__gradient_checkpointing=True), s8, A100x8, wl).step_flops_per_token
    assert lora < full and ckpt > lora
    assert 6 * s8.params["llm"] == estimate(conf("full"), s8, A100x8).flops_per_token


# -- workload -------------------------------------------------------------------------------------


def test_workload_without_data_is_the_worst_case():
    wl = workload_for(conf("lora", optim__per_device_batch=2))
    assert (wl.tokens, wl.image_tokens, wl.rows, wl.label_share) == (8192, 2 * 784, 2, 1.0)
    packed = workload_for(conf("lora", data__packing=True))
    assert packed.tokens == 4096 and 0.9 < packed.image_tokens / 4096 < 1.0 and "assumed" in packed.assumption


def test_summary_from_check_data(demo_data):
    from qvltune.data.check import CheckOptions, check_dataset

    train, _ = demo_data
    report = check_dataset(str(train), CheckOptions(min_pixels=4096, max_pixels=65536))
    s = summarize_report(report, 4096, 65536)
    assert s.records == 64 and s.max_images_per_record == 1 and 0 < s.image_tokens < s.tokens
    assert s.p50 <= s.p99 <= s.longest and s.suggested_max_seq_length == 256
    wl = workload_for(conf("lora", data__packing=True, data__max_seq_length=256), s)
    assert wl.image_tokens == int(256 * s.image_share) and wl.tokens_per_epoch == s.tokens and wl.label_share < 1


def test_trained_parameters_share_one_dtype_in_bf16(tiny_model_dir):
    """ZeRO-3 partitions all trained parameters into one flat buffer and aborts on mixed dtypes:
    LoRA adapters must be created in the weights' bf16 beside the fully trained (bf16) mergers."""
    import torch

    from qvltune.model import apply_strategy, load_model

    cfg = parse_config({"name": "t", "model": {"path": str(tiny_model_dir)}, "data": {"train": "d.jsonl"}, "strategy": "mixed"})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="bfloat16", attn_implementation="sdpa"), cfg)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("merger" in n for n in trained)
    assert set(trained.values()) == {torch.bfloat16}

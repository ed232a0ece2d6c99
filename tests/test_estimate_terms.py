"""Each memory term of the estimator pinned to its formula, and the peak to its composition.

The formulas are written out here from the tensors each term counts (see the calibration notes in
qvltune/estimate.py), for the 8B shape: hidden h = 4096, q = 32 x 128, kv = 8 x 128, SwiGLU
intermediate i = 12288, 36 layers. A changed factor anywhere (an activation term doubled, the
checkpointed layers counted twice, a ZeRO partition forgotten) changes one of these numbers.
"""

from __future__ import annotations

import pytest

from qvltune.catalog import builtin_config
from qvltune.config import parse_config
from qvltune.estimate import CUDA_CONTEXT_BYTES, FRAGMENTATION, estimate
from qvltune.estimate_inputs import Machine, Workload
from qvltune.model_stats import model_stats
from qvltune.units import GiB

H, Q, KV, I, L = 4096, 32 * 128, 8 * 128, 12288, 36
TOKENS = 8192
IMAGE_TOKENS = 2048
LABEL_SHARE = 0.25
H200x2 = Machine("NVIDIA H200", 140 * GiB, 2, 1, 256 * GiB, 989.0, True)


@pytest.fixture(scope="module")
def s8():
    s = model_stats(builtin_config("8B"))
    assert (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate, s.layers) == (H, Q, KV, I, L)
    return s


def conf(strategy: str, **optim):
    return parse_config({
        "name": "t", "model": {"path": "Qwen/Qwen3-VL-8B-Instruct", "attn_implementation": "varlen"},
        "data": {"train": "d.jsonl", "max_seq_length": TOKENS, "packing": True},
        "strategy": strategy, "lora": {"dropout": optim.pop("dropout", 0.0)},
        "optim": {"per_device_batch": 1, "grad_accum": 1, "compile": False, "gradient_checkpointing": False, **optim},
        "deepspeed": {"stage": 2},
    })


def run(cfg, s):
    workload = Workload(TOKENS, IMAGE_TOKENS, 1, label_share=LABEL_SHARE)
    est = estimate(cfg, s, H200x2, workload)
    return est, {t.name: t.bytes for t in est.gpu_terms}


# Bytes saved for backward per token by one decoder layer, varlen attention (k and v stay kv-wide).
FULL_LAYER = 16 * H + 12 * Q + 10 * KV + 8 * I
LORA_LAYER = 12 * H + 10 * Q + 8 * KV + 8 * I  # frozen base, LoRA on all 7 linears, no dropout
LORA_DROPOUT_LAYER = 23 * H + 11 * Q + 8 * KV + 9 * I  # + 3 bytes per adapted input element
COMPILED = -8 * H - 2 * I  # fused RMSNorms keep no fp32 copy; silu recomputed


@pytest.mark.parametrize(
    ("strategy", "optim", "layer"),
    [
        ("full", {}, FULL_LAYER),
        ("lora", {}, LORA_LAYER),
        ("lora", {"dropout": 0.05}, LORA_DROPOUT_LAYER),
        ("full", {"compile": True}, FULL_LAYER + COMPILED),
    ],
)
def test_llm_activations_are_tokens_x_layer_bytes_x_layers_plus_one(s8, strategy, optim, layer):
    _, terms = run(conf(strategy, **optim), s8)
    assert terms["LLM activations"] == TOKENS * layer * (L + 1)  # + one layer's transients in backward


def test_checkpointed_activations_keep_one_input_per_layer_and_recompute_one_layer(s8):
    _, terms = run(conf("lora", gradient_checkpointing=True), s8)  # (full's peak is its optimizer step)
    assert terms["LLM activations"] == TOKENS * (L * 2 * H + LORA_LAYER * 2)


def test_static_terms_follow_zero2_partitioning(s8):
    est, terms = run(conf("full"), s8)
    n, trained = s8.total, est.trainable_params
    assert trained == n - s8.params["vision"]  # full: everything but the frozen vision tower
    assert terms["weights"] == 2 * n  # bf16, whole on each rank under ZeRO-2
    assert terms["gradients"] == 2 * trained / 2  # bf16, partitioned over 2 ranks
    assert terms["optimizer states"] == 12 * trained / 2  # fp32 master + 2 moments, partitioned
    assert terms["gradient buckets"] == 2 * 5e8 * 2  # two reduce buffers of 5e8 bf16 elements


def test_fused_loss_holds_one_chunk_of_logits_and_the_hidden_gradient(s8):
    _, terms = run(conf("lora"), s8)
    labelled = int(TOKENS * LABEL_SHARE)
    chunk_rows = (1 << 28) // s8.vocab
    assert terms["loss (fused)"] == labelled * H * 2 + min(labelled, chunk_rows) * s8.vocab * 6


@pytest.mark.parametrize("strategy", ["full", "lora", "mixed"])
def test_peak_is_the_sum_of_its_terms_and_the_total_adds_the_overhead(s8, strategy):
    est, terms = run(conf(strategy), s8)
    assert est.peak_phase == "backward"
    assert est.peak_allocated == pytest.approx(sum(terms.values()), rel=1e-12)
    assert est.per_gpu == pytest.approx(est.peak_allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES, rel=1e-12)

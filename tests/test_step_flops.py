"""qvltune.step_flops against what PyTorch counts: one training step of the real tiny Qwen3-VL under
torch.utils.flop_counter.FlopCounterMode, for the strategies whose parts differ (LoRA's skipped
weight gradients, a frozen or trained vision tower, trained mergers)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qvltune.catalog import builtin_config
from qvltune.compiled_layers import compile_blocks
from qvltune.data.packing import PaddedCollator
from qvltune.data.tokenize import Encoder
from qvltune.estimate_inputs import Workload, summarize_report, workload_for
from qvltune.model import apply_strategy, load_model
from qvltune.model_stats import model_stats
from qvltune.step_flops import ATTENTION_BACKWARD, step_parts
from test_invariants import config, summed_loss
from test_packing import records

LINEARS = ("aten.mm", "aten.addmm")
ATTENTION = ("aten.bmm",)  # eager attention's two products per head


def counted_backend():
    """Inductor's partition of each compiled layer into forward, backward and what the backward
    recomputes (the min-cut partitioner), run as aten ops the FLOP counter sees (Inductor's own
    kernels it cannot)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def run(graph, _inputs):
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=run, bw_compiler=run, partition_fn=min_cut_rematerialization_partition)


def counted(mode: FlopCounterMode, ops: tuple[str, ...]) -> int:
    return sum(v for k, v in mode.get_flop_counts()["Global"].items() if str(k) in ops)


# The linears' tolerance: the parts count norms and biases as matmul weights (under 0.5% here); with
# LoRA on the vision tower they also count the input gradient of the first vision block's first
# linear, which nothing needs (1 linear of 2 blocks here, of 24-27 in the released models: 2.9%).
@pytest.mark.parametrize("layers", ["plain", "checkpointed", "compiled"])
@pytest.mark.parametrize(("strategy", "components", "tolerance"), [("mixed", {}, 0.01), ("full", {}, 0.01), ("full", {"vision": "full"}, 0.01), ("lora", {"vision": "lora", "merger": "full"}, 0.04)])
def test_the_parts_are_what_pytorch_counts(tmp_path, tiny_model_dir, tiny_processor, strategy, components, tolerance, layers):
    """One sample with an image, eager attention (PyTorch can count its products), fp32, the plain
    loss over every token: the linears (LLM, LoRA, lm_head, vision, mergers; the patch embedding's
    convolution left out of both) and the attention products, forward alone and the whole step;
    without activation checkpointing, with it as the worker turns it on (non-reentrant), and with it
    under compiled decoder layers (what recomputing a block costs differs: see step_parts).
    (Eager computes the whole causal square and keeps its scores; the varlen kernels' causal half
    and recomputing backward are the same rule with other factors, not measured here.)"""
    cfg = config(strategy, components)
    cfg.optim.fused_loss = False
    cfg.optim.gradient_checkpointing = layers != "plain"
    cfg.optim.compile = layers == "compiled"
    torch.manual_seed(0)
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="eager"), cfg).train()
    batch = PaddedCollator(0)([[Encoder(tiny_processor).encode(records(tmp_path)[0])]])
    if cfg.optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as worker.py's TrainingArguments
    if cfg.optim.compile:
        compile_blocks(model, backend=counted_backend())
        summed_loss(model, batch).backward()  # compiles outside the counters
        model.zero_grad()
    tokens = batch["input_ids"].shape[1]
    image = int(batch["image_grid_thw"].prod()) // 4  # LLM image tokens: 2x2 patches each
    stats = model_stats(json.loads((tiny_model_dir / "config.json").read_text()))
    workload = Workload(tokens, image, 1, attended_tokens=tokens, attended_image_tokens=image)
    parts = {p.name: p for p in step_parts(cfg, stats, workload, attention="eager")}

    # The backward is counted apart from a forward run outside the counter: under the counter's mode
    # the compiled layers would run eagerly, and with them their recompute.
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        summed_loss(model, batch)
    model.zero_grad()
    loss = summed_loss(model, batch)
    with backward:
        loss.backward()

    # The recompute part holds linears and attention: its attention is the checkpointed blocks' (every
    # LLM layer here, gradients flow through all; vision blocks only when the tower trains).
    again = parts.pop("recomputed forward (checkpointing)", None)
    vision_trains = cfg.modes()["vision"] != "frozen"
    again_attention = (parts["LLM attention"].forward + parts["vision attention"].forward * vision_trains) if again else 0.0
    linears = [p for name, p in parts.items() if "attention" not in name]
    assert counted(forward, LINEARS) == pytest.approx(tokens * sum(p.forward for p in linears), rel=tolerance)
    again_linears = again.forward - again_attention if again else 0.0
    assert counted(forward, LINEARS) + counted(backward, LINEARS) == pytest.approx(tokens * (sum(p.flops for p in linears) + again_linears), rel=tolerance)
    attention = [parts["LLM attention"], parts["vision attention"]]
    assert counted(forward, ATTENTION) == pytest.approx(tokens * sum(p.forward for p in attention), rel=1e-6)
    assert counted(forward, ATTENTION) + counted(backward, ATTENTION) == pytest.approx(tokens * (sum(p.flops for p in attention) + again_attention), rel=1e-6)
    assert (again is not None) == cfg.optim.gradient_checkpointing
    assert (parts["vision attention"].backward > 0) == (cfg.modes()["vision"] != "frozen")


def test_varlen_attends_within_samples_and_a_masked_row_costs_its_whole_square():
    stats = model_stats(builtin_config("8B"))
    packed = config("mixed")
    packed.data.packing = True
    wl = Workload(8192, 4096, 1, attended_tokens=1000, attended_image_tokens=600)
    varlen = {p.name: p for p in step_parts(packed, stats, wl, attention="varlen")}["LLM attention"]
    sdpa = {p.name: p for p in step_parts(packed, stats, wl, attention="sdpa")}["LLM attention"]
    assert varlen.forward == 2 * stats.layers * stats.heads * stats.head_dim * 1000 and varlen.backward == ATTENTION_BACKWARD * varlen.forward
    assert sdpa.forward == 4 * stats.layers * stats.heads * stats.head_dim * 8192  # the block mask computes every pair of the row


def test_lora_skips_the_frozen_weights_gradients_and_checkpointing_runs_the_forward_again():
    stats = model_stats(builtin_config("8B"))
    wl = Workload(8192, 4096, 1, attended_tokens=1000, attended_image_tokens=600)

    def parts(strategy, **optim):
        cfg = config(strategy)
        for k, v in optim.items():
            setattr(cfg.optim, k, v)
        return {p.name: p for p in step_parts(cfg, stats, wl)}

    n = stats.llm_active_params()
    assert parts("full", gradient_checkpointing=False)["LLM linears"].flops == 6 * n  # the MFU rule's 6N
    mixed = parts("mixed", gradient_checkpointing=False)
    assert mixed["LLM linears"].flops == 4 * n and "recomputed forward (checkpointing)" not in mixed
    # The whole forward but each layer's down_proj (hidden x intermediate) and its adapter's B (rank x
    # hidden) compiled; eager layers rerun down_proj (its adapter's A, which saves, comes after it).
    down, down_b = stats.layers * stats.hidden * stats.intermediate, stats.layers * config("mixed").lora.rank * stats.hidden
    whole = mixed["LLM linears"].forward + mixed["LLM attention"].forward + mixed["LoRA adapters"].forward
    assert parts("mixed", gradient_checkpointing=True, compile=True)["recomputed forward (checkpointing)"].forward == whole - 2 * down - 2 * down_b
    assert parts("mixed", gradient_checkpointing=True, compile=False)["recomputed forward (checkpointing)"].forward == whole - 2 * down_b
    assert mixed["vision linears"].backward == 0 and mixed["vision attention"].backward == 0  # frozen: forward only


def test_lengths_are_token_weighted():
    """A 100-token and a 900-token sample: an average token sits in a sample of 820 tokens (what its
    attention costs), not 500; images likewise."""

    class Report:
        lengths = [100, 900]
        image_sizes = [(320, 320), (960, 960)]  # 100 and 900 LLM image tokens at 32x32 pixels each
        images_per_record = {1: 2}
        trained_tokens = 50

        def percentile(self, q):
            return 900

        def suggested_max_seq_length(self):
            return 1024

    s = summarize_report(Report(), 64 * 32 * 32, 1024 * 32 * 32)
    assert (s.attended_sample_tokens, s.attended_image_tokens) == (820, 820)
    cfg = config("mixed")
    cfg.data.packing = True
    assert (workload_for(cfg, s).attended_tokens, workload_for(cfg, s).attended_image_tokens) == (820, 820)
    # The answers' share as counted (the step's lm_head), beside the memory estimate's doubled one.
    assert (workload_for(cfg, s).answer_share, workload_for(cfg, s).label_share) == (0.05, 0.1)
    cfg.data.packing = False  # a padded row attends over the whole row: the parts take its length
    assert workload_for(cfg, s).attended_tokens == 0


def test_the_estimate_says_what_share_of_a_step_each_part_takes():
    from qvltune.step_flops import Part, shares_line

    parts = [Part("vision linears", 6.0, 0.0), Part("LLM linears", 40.0, 40.0), Part("LoRA adapters", 1.0, 2.0), Part("mergers", 0.2, 0.2)]
    assert shares_line(parts) == "LLM linears 89% · vision linears 7% · LoRA adapters 3%"  # under 0.5%: left out


@pytest.mark.parametrize(("reference", "epochs", "divisor"), [("adapter_off", 3.0, 1.0), ("precomputed", 3.0, 3.0)])
def test_the_dpo_reference_is_the_base_models_forward(reference, epochs, divisor):
    """adapter_off: one more forward of the base model per step (no adapters, nothing recomputed);
    precomputed: that forward once over the data, spread over the epochs."""
    from qvltune.config import parse_config

    cfg = parse_config({"name": "t", "model": {"path": "builtin:tiny"}, "data": {"train": "d.jsonl"}, "strategy": "mixed", "stage": "dpo",
                        "dpo": {"reference": reference}, "optim": {"gradient_checkpointing": True, "epochs": epochs}})
    parts = {p.name: p for p in step_parts(cfg, model_stats(builtin_config("8B")), Workload(8192, 4096, 1, attended_tokens=1000, attended_image_tokens=600))}
    base = ("LLM linears", "LLM attention", "lm_head (labelled tokens)", "vision linears", "vision attention", "mergers (+ DeepStack)")
    reference_part = parts[f"DPO reference forward ({reference})"]
    assert reference_part.forward == pytest.approx(sum(parts[name].forward for name in base) / divisor) and reference_part.backward == 0


def test_an_epochs_flops_take_the_datas_image_share_not_the_worst_batchs():
    """Padded rows: memory is sized for a batch of the largest images (image_tokens), the epoch's
    FLOPs follow the data's share of image tokens; padded batches of several rows attend over the
    whole row whatever the attention (varlen falls back to masked sdpa there)."""
    stats = model_stats(builtin_config("2B"))
    cfg = config("mixed")
    cfg.data.packing = False
    cfg.optim.per_device_batch = 4
    wl = Workload(4 * 2000, 4 * 1500, 4, mean_image_share=0.25)
    vision = {p.name: p for p in step_parts(cfg, stats, wl)}["vision linears"]
    assert vision.forward == pytest.approx(0.25 * stats.spatial_merge**2 * 2 * stats.vision_depth * stats.vision_block_params)
    llm_attention = {p.name: p for p in step_parts(cfg, stats, wl, attention="varlen")}["LLM attention"]
    assert llm_attention.forward == 4 * stats.layers * stats.heads * stats.head_dim * 2000


def test_a_checkpointed_mixture_of_experts_layer_reruns_its_whole_forward():
    """The experts' down projections are scaled by the routing weights, whose gradient reads them: a
    checkpointed MoE block (frozen, a gradient flowing through it) recomputes every product, unlike a
    dense block's down_proj; the parts count the whole forward again for an MoE model."""
    from torch.utils.checkpoint import checkpoint
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    torch.manual_seed(0)
    hidden, inner, experts, top_k, tokens = 64, 32, 4, 2, 50
    block = Qwen3VLMoeTextSparseMoeBlock(Qwen3VLMoeTextConfig(hidden_size=hidden, moe_intermediate_size=inner, num_experts=experts, num_experts_per_tok=top_k))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
        p.requires_grad_(False)

    def backward_flops(checkpointed):
        x = torch.randn(1, tokens, hidden, requires_grad=True)
        y = checkpoint(lambda h: h + block(h), x, use_reentrant=False) if checkpointed else x + block(x)
        mode = FlopCounterMode(display=False)
        with mode:
            y.sum().backward()
        return mode.get_total_flops()

    forward = 2 * tokens * (experts * hidden + top_k * 3 * hidden * inner)  # router, gate/up and down of the chosen experts
    assert backward_flops(True) - backward_flops(False) == forward

    stats = model_stats(builtin_config("30B-A3B"))
    wl = Workload(4096, 1024, 1, attended_tokens=800, attended_image_tokens=400)

    def parts(**optim):
        cfg = config("lora")
        for k, v in optim.items():
            setattr(cfg.optim, k, v)
        return {p.name: p for p in step_parts(cfg, stats, wl)}

    plain = parts(gradient_checkpointing=False)
    for compiled in (False, True):
        again = parts(gradient_checkpointing=True, compile=compiled)["recomputed forward (checkpointing)"]
        assert again.forward == plain["LLM linears"].forward + plain["LLM attention"].forward + plain["LoRA adapters"].forward

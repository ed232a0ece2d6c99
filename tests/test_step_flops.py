"""qvltune.step_flops against what PyTorch counts: one training step of the real tiny Qwen3-VL under
torch.utils.flop_counter.FlopCounterMode, for the strategies whose parts differ (LoRA's skipped
weight gradients, a frozen or trained vision tower, trained mergers)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qvltune.data.packing import PaddedCollator
from qvltune.data.tokenize import Encoder
from qvltune.catalog import builtin_config
from qvltune.estimate_inputs import Workload, summarize_report, workload_for
from qvltune.model import apply_strategy, load_model
from qvltune.model_stats import model_stats
from qvltune.step_flops import ATTENTION_BACKWARD, step_parts
from test_invariants import config, summed_loss
from test_packing import records

LINEARS = ("aten.mm", "aten.addmm")
ATTENTION = ("aten.bmm",)  # eager attention's two products per head


def counted(mode: FlopCounterMode, ops: tuple[str, ...]) -> int:
    return sum(v for k, v in mode.get_flop_counts()["Global"].items() if str(k) in ops)


@pytest.mark.parametrize(("strategy", "components"), [("mixed", {}), ("full", {}), ("lora", {"vision": "lora", "merger": "full"})])
def test_the_parts_are_what_pytorch_counts(tmp_path, tiny_model_dir, tiny_processor, strategy, components):
    """One sample with an image, eager attention (PyTorch can count its products), fp32, the plain
    loss over every token. Linears (LLM, LoRA, lm_head, vision, mergers): forward alone and the whole
    step agree with the parts to the norms' and biases' parameters (which the parts count as
    matmul weights; the patch embedding's convolution is left out of both). Attention: eager computes the whole causal square where flash skips the masked
    half, and its backward runs 2 products per forward one where flash's recomputes the scores (5 for
    2): the counts are converted to eager's before they are compared."""
    cfg = config(strategy, components)
    cfg.optim.fused_loss = False
    cfg.optim.gradient_checkpointing = False
    torch.manual_seed(0)
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="eager"), cfg).train()
    batch = PaddedCollator(0)([[Encoder(tiny_processor).encode(records(tmp_path)[0])]])
    tokens = batch["input_ids"].shape[1]
    image = int(batch["image_grid_thw"].prod()) // 4  # LLM image tokens: 2x2 patches each
    stats = model_stats(json.loads((tiny_model_dir / "config.json").read_text()))
    parts = {p.name: p for p in step_parts(cfg, stats, Workload(tokens, image, 1, attended_tokens=tokens, attended_image_tokens=image))}

    forward, step = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        summed_loss(model, batch)
    model.zero_grad()
    with step:
        summed_loss(model, batch).backward()

    linears = [p for name, p in parts.items() if "attention" not in name]
    assert counted(forward, LINEARS) == pytest.approx(tokens * sum(p.forward for p in linears), rel=0.02)
    # 4%: the parts also count the input gradient of the first vision block's first linear, which
    # nothing needs (1 linear of 2 blocks here, of 24-27 in the released models).
    assert counted(step, LINEARS) == pytest.approx(tokens * sum(p.flops for p in linears), rel=0.04)
    llm, vision = parts["LLM attention"], parts["vision attention"]
    eager_forward = 2 * llm.forward + vision.forward
    eager_backward = 2 * (2 * llm.forward) * (llm.backward > 0) + 2 * vision.forward * (vision.backward > 0)
    assert counted(forward, ATTENTION) == pytest.approx(tokens * eager_forward, rel=1e-6)
    assert counted(step, ATTENTION) == pytest.approx(tokens * (eager_forward + eager_backward), rel=1e-6)
    assert llm.backward == ATTENTION_BACKWARD * llm.forward and (vision.backward > 0) == (cfg.modes()["vision"] != "frozen")


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
    again = parts("mixed", gradient_checkpointing=True)["recomputed forward (checkpointing)"]
    assert again.forward == mixed["LLM linears"].forward + mixed["LLM attention"].forward + mixed["LoRA adapters"].forward
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
    cfg.data.packing = False  # a padded row attends over the whole row: the parts take its length
    assert workload_for(cfg, s).attended_tokens == 0

"""What one training step computes, part by part: the FLOPs per LLM token of each family of matrix
products Qwen3-VL runs under a strategy, from the model's config and the data's shape alone.

The MFU the panel shows counts 6N (worker.llm_flops_per_token: the LLM's linears, forward and both
backward products), the rule MFU figures are compared by. A step really computes something else:
LoRA and mixed skip the frozen weights' gradients (4N, not 6N), activation checkpointing runs the
forward again, attention grows with the sample's length, and a frozen vision tower still runs its
forward, with full attention over each image's patches. ``step_parts`` lists each of these, so the
estimator's time (their sum) and ``benchmarks/step_account.py`` (where a measured step's time goes)
read them from one place.

Counting rules (2 FLOPs per multiply-add; per token of the packed micro-batch, text and image alike):
- a linear of P parameters: 2P forward, 2P for the input gradient (whenever a gradient flows through
  it), 2P for the weight gradient (only when it trains);
- causal attention over a sample of L tokens: 2 x heads x head_dim x L forward per token (QK^T and
  PV over half the sample on average) with varlen/flash kernels; eager attention and sdpa with a
  mask compute the whole row's square (4 x heads x head_dim x row length); a vision block attends
  to its whole image: 4 x hidden x P per patch for an image of P patches. The backward of flash
  attention runs 5 products where the forward runs 2 (it recomputes the scores): 2.5x the forward;
  eager's 2x;
- lengths are token-weighted (sum L^2 / sum L): a long sample costs more per token and holds more
  of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvltune.config import RunConfig
from qvltune.estimate_inputs import Workload
from qvltune.model_stats import ModelStats, adapted_linears, lora_params
from qvltune.pixels import TOKEN_PIXELS

# FlashAttention's backward (and sdpa's fused kernels'): the recomputed scores, dV, dP, dQ and dK
# against the forward's QK^T and PV. Eager attention keeps the scores: its backward runs 4 products.
ATTENTION_BACKWARD = 2.5
EAGER_ATTENTION_BACKWARD = 2.0


@dataclass(frozen=True)
class Part:
    name: str
    forward: float  # FLOPs per LLM token of one training step
    backward: float
    # What the part is: the base model's own compute ("model": what a DPO reference pass reruns),
    # the LoRA adapters', checkpointing's recompute, or the DPO reference's pass.
    kind: str = "model"

    @property
    def flops(self) -> float:
        return self.forward + self.backward


def uses_fused_loss(cfg: RunConfig) -> bool:
    """The worker installs qvltune.loss's head unless lm_head is wrapped by peft (trained beside LoRA)."""
    return cfg.optim.fused_loss and not (cfg.uses_lora() and cfg.modes()["lm_head"] == "full")


def sdpa_with_mask(attention: str, packing: bool, rows: int) -> bool:
    """Whether the language model's attention is sdpa with a mask over whole rows, which computes
    every pair of a row (and makes transformers' sdpa repeat k and v to every query head): sdpa on
    packed rows (a block mask), and padded rows in batches of several, where varlen has no sample
    boundaries and falls back to masked sdpa (qvltune.attention). False for eager attention, which
    is no sdpa: it always computes the square (and repeats k and v), its callers count it apart."""
    if packing:
        return attention == "sdpa"
    return rows > 1 and attention in ("sdpa", "varlen")


def step_parts(cfg: RunConfig, stats: ModelStats, wl: Workload, attention: str = "varlen") -> list[Part]:
    """The FLOPs per LLM token of one training step of ``cfg`` with ``attention`` (the kind the
    worker runs: qvltune.estimate.attention_kind), by part (parts that cost nothing are left out)."""
    s, modes = stats, cfg.modes()
    ckpt = cfg.optim.gradient_checkpointing
    trains = {c: m != "frozen" for c, m in modes.items()}
    # A gradient flows back through the LLM when it trains or anything before it does.
    through_llm = trains["llm"] or trains["vision"] or trains["merger"] or trains["deepstack"]
    n = s.llm_active_params()
    # LLM image tokens per LLM token: the data's (an epoch's FLOPs), else the micro-batch's.
    share = wl.mean_image_share or (wl.image_tokens / wl.tokens if wl.tokens else 0.0)
    patches = share * s.spatial_merge**2  # vision patches per LLM token

    row = wl.tokens / max(wl.rows, 1)
    image_size = wl.attended_image_tokens or cfg.data.pixel_budget()[1] // TOKEN_PIXELS  # unknown: the largest image
    # varlen / flash (and sdpa on one unmasked row) attend within each sample and skip the causal
    # half; eager, and any attention with a mask, compute the whole row's square.
    if attention == "eager" or sdpa_with_mask(attention, cfg.data.packing, wl.rows):
        llm_attention = 4 * s.layers * s.heads * s.head_dim * row
    else:
        llm_attention = 2 * s.layers * s.heads * s.head_dim * (wl.attended_tokens or row)  # unknown: a whole row
    backward_factor = EAGER_ATTENTION_BACKWARD if attention == "eager" else ATTENTION_BACKWARD
    # The loss's head computes the answers' logits only with the fused loss (their share, not the
    # memory estimate's doubled one), every token's without it.
    head = 2 * s.vocab * s.hidden * ((wl.answer_share or wl.label_share) if uses_fused_loss(cfg) else 1.0)
    vision_linears = patches * 2 * s.vision_depth * s.vision_block_params
    attended_patches = image_size * s.spatial_merge**2
    vision_attention = patches * s.vision_depth * 4 * s.vision_hidden * attended_patches
    merger = share * 2 * s.params["merger"]  # the merger's forward, per LLM token
    deepstack = share * 2 * s.params["deepstack"]
    mergers = merger + deepstack
    # A trained merger computes both gradients (the input one too: the LayerNorm in front of its
    # first linear trains); a frozen one only the input gradient, and that only for a trained tower.
    merger_backward = sum(f * (2 if trains[c] else trains["vision"]) for c, f in (("merger", merger), ("deepstack", deepstack)))

    vision_backward = {"full": 2, "lora": 1}.get(modes["vision"], 0)  # weight + input gradients, or input only
    parts = [
        Part("LLM linears", 2 * n, 2 * n * (through_llm + (modes["llm"] == "full"))),
        Part("LLM attention", llm_attention, backward_factor * llm_attention * through_llm),
        Part("lm_head" + (" (labelled tokens)" if uses_fused_loss(cfg) else ""), head, head * (through_llm + (modes["lm_head"] == "full"))),
    ]
    # Adapters sit only on LLM layers and vision blocks (qvltune.model.lora_target_regex).
    lora = lora_params(s, cfg)
    llm_adapters, vision_adapters = lora["llm"], patches * lora["vision"]
    if llm_adapters or vision_adapters:
        parts.append(Part("LoRA adapters", 2 * (llm_adapters + vision_adapters), 4 * (llm_adapters + vision_adapters), kind="adapters"))
    parts += [
        Part("vision linears", vision_linears, vision_backward * vision_linears),
        Part("vision attention", vision_attention, backward_factor * vision_attention * trains["vision"]),
        Part("mergers (+ DeepStack)", mergers, merger_backward),
    ]
    if ckpt:
        # Checkpointed blocks run their forward again in the backward, but not all of it: a block's
        # last linear (down_proj, the vision MLP's linear_fc2) and its adapter's second half feed
        # only the residual sum, whose backward reads neither. A compiled decoder layer (optim.compile)
        # recomputes just what the backward reads, so both are skipped. An eager block (the vision
        # tower always) reruns in order until the last tensor the backward saved: an adapter's first
        # half runs after its base linear and saves its output, so with an adapter there only the
        # second half is skipped, without one the linear itself. (A mixture-of-experts layer reruns
        # all of its forward: see last_linears.)
        llm_tail, vision_tail = last_linears(s)
        tail_b = tail_adapter_outputs(s, cfg)
        llm_skip = (llm_tail + tail_b["llm"]) if cfg.optim.compile else (tail_b["llm"] or llm_tail)
        vision_skip = tail_b["vision"] or vision_tail
        again_llm = 2 * (n + lora["llm"] - llm_skip) + llm_attention
        again_vision = vision_linears + vision_attention + patches * 2 * (lora["vision"] - vision_skip)
        parts.append(Part("recomputed forward (checkpointing)", again_llm * through_llm + again_vision * trains["vision"], 0.0, kind="recompute"))
    if cfg.stage == "dpo":
        # The reference's log-probs: one more forward (no gradients) per step with adapters off, or
        # one forward pass over the data before training when precomputed (counted against an epoch).
        epochs = 1.0 if cfg.preference().reference == "adapter_off" else max(cfg.optim.epochs, 1.0)
        forward = sum(p.forward for p in parts if p.kind == "model")
        parts.append(Part(f"DPO reference forward ({cfg.preference().reference})", forward / epochs, 0.0, kind="reference"))
    return [p for p in parts if p.flops]


def last_linears(s: ModelStats) -> tuple[int, int]:
    """Parameters of the block's last linear that a recompute skips: (per LLM token, all layers:
    down_proj; per vision patch, all blocks: linear_fc2). None in a mixture-of-experts layer: its
    experts' down projections are scaled by the routing weights, whose gradient reads them (it
    reaches the hidden states even with a frozen router), so they run again."""
    llm = 0 if s.is_moe else s.layers * s.hidden * s.intermediate
    return llm, s.vision_depth * s.vision_intermediate * s.vision_hidden


def tail_adapter_outputs(s: ModelStats, cfg: RunConfig) -> dict[str, int]:
    """Parameters of the LoRA B halves (rank x out) on each block's last linear, all blocks, for the
    LLM and the vision tower: 0 where that linear carries no adapter."""
    out = {"llm": 0, "vision": 0}
    for lin in adapted_linears(s, cfg):
        if lin.name.endswith((".mlp.down_proj", ".mlp.linear_fc2")) and lin.component in out:
            out[lin.component] += cfg.lora.rank * lin.out_features
    return out


def total(parts: list[Part]) -> float:
    return sum(p.flops for p in parts)


def shares_line(parts: list[Part]) -> str:
    """The parts' shares of a step's FLOPs, largest first (those under 0.5% left out), for
    ``qvltune estimate``: e.g. ``LLM linears 80% · vision linears 6% · ...``."""
    step = total(parts)
    shares = sorted(((p.flops / step, p.name) for p in parts), reverse=True) if step else []
    return " · ".join(f"{name} {share:.0%}" for share, name in shares if share >= 0.005)

"""The DeepSpeed config, generated from the run config (never a hand-edited template).

Values the Trainer also sets (micro-batch, accumulation, clipping, bf16) are written explicitly and
equal to the ``TrainingArguments`` the worker builds, so the Trainer's consistency check passes and
the JSON is complete on its own (for ``launch.sh`` or a cluster). ``gradient_clipping`` is always
present — the official recipe's JSON leaves it out, which silently disables clipping. Only the
global batch stays ``auto``: it depends on how many processes are launched.

ZeRO-3 also gets: every transformer block gathered whole (``zero3_leaf_blocks``), and its prefetch,
persistence, live-parameter and reduce-bucket sizes from the model's own sizes (``zero3_tuning``),
unless the config's ``deepspeed.zero3`` gives them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvltune.config import RunConfig
from qvltune.model import transformer_blocks

if TYPE_CHECKING:
    from qvltune.model_stats import ModelStats


# DeepSpeed buffer sizes qvltune sets (elements); qvltune.estimate counts the memory they hold.
ZERO12_BUCKET_SIZE = 5e8
STAGE3_MAX_LIVE_PARAMETERS = 1e9


def deepspeed_config(cfg: RunConfig, stats: ModelStats | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON of ``cfg``. ``stats`` (the model's sizes) fills the ZeRO-3 settings the
    config leaves unset (``zero3_tuning``); without them those stay the Trainer's ``auto``."""
    o, ds = cfg.optim, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage in (1, 2):
        zero.update(
            {
                "allgather_partitions": True,
                "allgather_bucket_size": ZERO12_BUCKET_SIZE,
                "reduce_scatter": True,
                "reduce_bucket_size": ZERO12_BUCKET_SIZE,
                "overlap_comm": True,
                "contiguous_gradients": True,
            }
        )
    elif ds.stage == 3:
        zero.update(
            {
                "contiguous_gradients": True,
                "sub_group_size": 1e9,
                **zero3_values(cfg, stats),
                # Save a full 16-bit copy of the weights with the checkpoint, so the final model and
                # merge need no separate zero_to_fp32 step.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if o.compile:
            # DeepSpeed's ZeRO-3 swaps torch.nn.functional.linear for its own autograd Function,
            # whose backward reads each weight's integer `ds_id`. Traced into a compiled decoder
            # layer, that became a guard per layer: every layer compiled its own graph, dynamo hit
            # its recompile limit at the 9th, and the rest ran eagerly in the checkpoint's recompute
            # but compiled in the forward ("recomputed metadata" mismatch; H200, RESULTS.md). With
            # the plain linear all layers share one graph, as under ZeRO-2; each leaf block is
            # gathered whole before its backward anyway (`zero3_leaf_blocks`).
            zero["memory_efficient_linear"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": o.per_device_batch,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": "auto",
        "gradient_clipping": o.max_grad_norm,
        "bf16": {"enabled": o.bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Progress is reported by qvltune's own metrics; DeepSpeed's periodic prints would interleave.
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def zero3_leaf_blocks(model) -> int:
    """Make every transformer block one ZeRO-3 unit; returns how many blocks were marked.

    By default ZeRO-3 gathers and releases parameters per submodule, through a hook pair on each. A
    decoder layer with LoRA has ~30 parameterised submodules, and those hooks made the ZeRO-3 step
    host-bound. A leaf block is gathered whole before its forward (and backward) and released after:
    one hook pair per block. On 2 H200s this took 2B mixed from 12.3k to 29.4k tokens/s
    (benchmarks/RESULTS.md).

    The largest block qvltune knows (a 30B-A3B MoE decoder layer, ~0.6e9 parameters; a 32B layer has
    ~0.5e9) stays below ``stage3_max_live_parameters``, so the gathered memory stays what the
    estimator counts.

    Call it after ``apply_strategy``: a block with trained parameters also gets its input made to
    require grad (``_hidden_states_require_grad``), which only the trained blocks need.
    """
    from deepspeed.utils import set_z3_leaf_module

    blocks = transformer_blocks(model)
    for block in blocks:
        set_z3_leaf_module(block, True)
        if any(p.requires_grad for p in block.parameters()):
            block.register_forward_pre_hook(_hidden_states_require_grad)
    return len(blocks)


def _hidden_states_require_grad(block, args):
    """Make a trained leaf block's input require grad, so DeepSpeed reduces its gradients after its backward.

    DeepSpeed reduces a leaf block's gradients in a full backward hook. torch fires that hook once
    the gradients of the block's inputs exist, i.e. after the block's backward, but when no input
    requires grad it fires as soon as the gradients of the *outputs* arrive: before the block's
    backward has gathered its parameters or computed their gradients. DeepSpeed then reduces an
    empty gradient ("0 != N Cannot reduce scatter gradients ..."), with or without gradient
    checkpointing. That is any trained block behind frozen inputs: the first vision block with vision
    LoRA (patch and position embeddings frozen). The input gets a gradient instead, one block's
    input-gradient matmuls; no parameter's gradient changes. Blocks with no trained parameter get no
    hook: a frozen vision tower would otherwise run a full backward for nothing.
    """
    import torch  # here, not at the top: the CLI imports this module for the JSON alone

    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad and torch.is_grad_enabled():
        return (hidden.detach().requires_grad_(), *args[1:])
    return None


# The run folder's record of the DeepSpeed config the ranks were given (rank 0 writes it as it starts).
DS_CONFIG = "ds_config.json"


def write_deepspeed_config(path: Path, ds_config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# ZeRO-3 settings from the model's own sizes
#
# With every transformer block one ZeRO-3 unit (``zero3_leaf_blocks``), a step gathers each block
# once per pass. What is left to tune is how far ahead the next block is gathered, which parameters
# are never partitioned at all, and how many gradients go into one reduction. The Trainer's "auto"
# values derive all three from the hidden size alone (transformers/integrations/deepspeed.py:
# prefetch 0.9 x hidden^2, persistence 10 x hidden, reduce bucket hidden^2), i.e. a fraction of one
# block: the prefetcher then gathers a few tensors of the next block, not the block.


@dataclass(frozen=True)
class Zero3Sizes:
    """The sizes (in parameters) the ZeRO-3 settings are derived from."""

    hidden: int
    block: int  # one decoder layer, with its LoRA adapters
    vision_block: int
    largest_tensor: int  # the embedding / lm_head
    smallest_matrix: int  # the smallest weight matrix of a linear: partitioning must keep it
    largest_vector: int  # an upper bound on norm weights and biases
    lora_matrix: int  # the largest LoRA A or B matrix (0 without LoRA)
    lora_total: int  # every LoRA parameter
    trained_block: int  # trained parameters of one decoder layer (LoRA or the whole layer)

    @classmethod
    def of(cls, stats: ModelStats, cfg: RunConfig) -> Zero3Sizes:
        import re

        from qvltune.model import lora_target_regex

        regex = lora_target_regex(cfg) if cfg.uses_lora() else None
        pattern = re.compile(regex) if regex else None
        rank = cfg.lora.rank
        adapted = [lin for lin in stats.linears if pattern and pattern.fullmatch(lin.name)]
        lora_total = sum(rank * (lin.in_features + lin.out_features) for lin in adapted)
        lora_block = sum(rank * (lin.in_features + lin.out_features) for lin in adapted if ".language_model.layers.0." in lin.name + ".")
        llm = cfg.modes()["llm"]
        matrices = [lin.in_features * lin.out_features for lin in stats.linears]
        vectors = [n for lin in stats.linears for n in (lin.in_features, lin.out_features) if n < stats.vocab]
        return cls(
            hidden=stats.hidden,
            block=stats.layer_params + lora_block,
            vision_block=stats.vision_block_params,
            largest_tensor=stats.largest_tensor,
            smallest_matrix=min(matrices),
            largest_vector=max([stats.hidden, *vectors]),
            lora_matrix=max((rank * max(lin.in_features, lin.out_features) for lin in adapted), default=0),
            lora_total=lora_total,
            trained_block={"full": stats.layer_params, "lora": lora_block}.get(llm, 0),
        )


@dataclass(frozen=True)
class Zero3Tuning:
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int
    max_reuse_distance: int
    reduce_bucket_size: int
    overlap_comm: bool
    why: dict[str, str]  # setting -> the reason, with the numbers that chose it

    def values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters", "max_reuse_distance", "reduce_bucket_size", "overlap_comm")}


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n):,}"


def zero3_tuning(z: Zero3Sizes) -> Zero3Tuning:
    """ZeRO-3's settings from the model's sizes (pure; tests/test_zero3_tuning.py tables it).

    - persistence: every norm, bias and LoRA A/B matrix stays whole on every GPU, so no gather ever
      waits on them; the weight matrices, which hold nearly all the memory, stay partitioned (the
      threshold stays below the smallest of them).
    - max live parameters: qvltune's 1e9, what the estimator counts as the gathered working set.
    - prefetch: one decoder layer, so the next layer's gather runs while this one computes; never
      more than the live budget leaves beside the current layer.
    - reuse distance: the live budget (a gathered block reused within it is kept, not re-gathered).
    - reduce bucket: one decoder layer's trained parameters, so the backward reduces once per layer;
      never below the Trainer's hidden^2 nor above ZeRO-1/2's 5e8.
    - overlap_comm: gathers and reductions on their own streams, beside the compute.
    """
    why: dict[str, str] = {}
    small = max(z.largest_vector, z.lora_matrix)
    persistence = min(small, z.smallest_matrix - 1)
    kept = "norms, biases" + (" and LoRA A/B matrices" if z.lora_matrix else "")
    why["param_persistence_threshold"] = f"tensors of up to {_m(persistence)} elements ({kept}) stay whole on every GPU and are never gathered; weight matrices (the smallest has {_m(z.smallest_matrix)}) stay partitioned"
    if z.lora_matrix > persistence:
        why["param_persistence_threshold"] += f"; LoRA matrices above that (the largest has {_m(z.lora_matrix)}) are gathered with their block"
    elif z.lora_total:
        why["param_persistence_threshold"] += f" ({_m(z.lora_total)} LoRA parameters kept whole)"
    live = int(STAGE3_MAX_LIVE_PARAMETERS)
    why["max_live_parameters"] = f"{live:.0e} gathered parameters at most: the working set `qvltune estimate` counts (the largest tensor has {_m(z.largest_tensor)}, a decoder layer {_m(z.block)})"
    prefetch = max(0, min(z.block, live - z.block))
    why["prefetch_bucket_size"] = f"one decoder layer ({_m(z.block)} parameters): the next layer is gathered while this one computes (the Trainer's 0.9 x hidden^2 = {_m(0.9 * z.hidden**2)} gathers a fraction of it)"
    if prefetch < z.block:
        why["prefetch_bucket_size"] = f"{_m(prefetch)} parameters: what the live budget ({live:.0e}) leaves beside the current decoder layer ({_m(z.block)})"
    why["max_reuse_distance"] = f"{live:.0e}, the live budget: a gathered block needed again that soon is kept rather than gathered twice"
    bucket = int(min(ZERO12_BUCKET_SIZE, max(z.hidden**2, z.trained_block)))
    if z.trained_block > z.hidden**2:
        why["reduce_bucket_size"] = f"one decoder layer's trained parameters ({_m(z.trained_block)}): one gradient reduction per layer in the backward, not {-(-z.trained_block // z.hidden**2)}"
    else:
        why["reduce_bucket_size"] = f"hidden^2 = {_m(z.hidden**2)}, the Trainer's: it already holds a layer's trained parameters ({_m(z.trained_block)})"
    if bucket < z.trained_block:
        why["reduce_bucket_size"] = f"{_m(bucket)}, ZeRO-1/2's bucket: a layer's trained parameters ({_m(z.trained_block)}) in {-(-z.trained_block // bucket)} reductions"
    why["overlap_comm"] = "gathers and gradient reductions run on their own CUDA streams, beside the compute"
    return Zero3Tuning(prefetch, persistence, live, live, bucket, True, why)


def zero3_stats(cfg: RunConfig) -> ModelStats | None:
    """The model's sizes (its config.json on the meta device: no weights) when ZeRO-3 needs them."""
    if cfg.deepspeed.stage != 3:
        return None
    from qvltune.model_stats import model_stats, resolve_model_config

    return model_stats(resolve_model_config(cfg.model.path, cfg.model.trust_remote_code)[0])


def zero3_values(cfg: RunConfig, stats: ModelStats | None) -> dict[str, Any]:
    """The ``zero_optimization`` keys of ZeRO-3's settings: the config's, else the model's
    (``zero3_tuning``), else (no sizes known) the Trainer's ``auto``."""
    given = cfg.deepspeed.zero3.model_dump()
    derived = zero3_tuning(Zero3Sizes.of(stats, cfg)).values() if stats is not None else {}
    fallback = {
        "prefetch_bucket_size": "auto",
        "param_persistence_threshold": "auto",
        "max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
        "max_reuse_distance": STAGE3_MAX_LIVE_PARAMETERS,
        "reduce_bucket_size": "auto",
        "overlap_comm": True,
    }
    value = {k: given[k] if given[k] is not None else derived.get(k, fallback[k]) for k in fallback}
    out = {("" if k in ("reduce_bucket_size", "overlap_comm") else "stage3_") + k: v for k, v in value.items()}
    return out

"""The DeepSpeed config, generated from the run config (never a hand-edited template).

Values the Trainer also sets (micro-batch, accumulation, clipping, bf16) are written explicitly and
equal to the ``TrainingArguments`` the worker builds, so the Trainer's consistency check passes and
the JSON is complete on its own (for ``launch.sh`` or a cluster). ``gradient_clipping`` is always
present — the official recipe's JSON leaves it out, which silently disables clipping. Only the
global batch stays ``auto``: it depends on how many processes are launched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvltune.config import RunConfig
from qvltune.model import transformer_blocks


# DeepSpeed buffer sizes qvltune sets (elements); qvltune.estimate counts the memory they hold.
ZERO12_BUCKET_SIZE = 5e8
STAGE3_MAX_LIVE_PARAMETERS = 1e9


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
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
                "overlap_comm": True,
                "contiguous_gradients": True,
                "sub_group_size": 1e9,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
                "stage3_max_reuse_distance": STAGE3_MAX_LIVE_PARAMETERS,
                # Save a full 16-bit copy of the weights with the checkpoint, so the final model and
                # merge need no separate zero_to_fp32 step.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
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


def write_deepspeed_config(cfg: RunConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deepspeed_config(cfg), indent=2) + "\n")
    return path

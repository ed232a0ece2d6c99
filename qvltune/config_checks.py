"""Conflicts between a run config's fields: those the file alone decides (``check_conflicts``, run
by ``parse_config``), and those needing the model (``check_against_model``) or the machine
(``check_against_hardware``), checked before anything is launched. Each is one
``field: message`` line that says how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qvltune.config import RunConfig

# Components that can be trained fully beside LoRA adapters (peft's modules_to_save keeps a
# trainable copy, so only the small parts qualify).
FULL_BESIDE_LORA = {"merger", "deepstack", "lm_head"}
# Attention implementations that keep packed samples apart (block-diagonal mask or varlen kernels).
PACKING_SAFE_ATTENTION = {"auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "varlen"}


def check_conflicts(cfg: RunConfig) -> list[str]:
    """Every conflict between fields that the file alone decides, as 'field: message' lines."""
    out: list[str] = []
    modes = cfg.modes()
    lora_parts = [c for c, m in modes.items() if m == "lora"]
    if all(m == "frozen" for m in modes.values()):
        out.append("components: every component is frozen: nothing to train (unfreeze one, e.g. components.llm: lora)")
    if cfg.strategy in ("lora", "mixed") and not lora_parts:
        out.append(f"strategy: '{cfg.strategy}' but no component is LoRA-adapted: LoRA has nothing to adapt (set components.llm: lora, or strategy: full)")
    if cfg.strategy == "full" and lora_parts:
        out.append(f"components: strategy 'full' with LoRA on {', '.join(lora_parts)} (use strategy: mixed or lora)")
    if lora_parts:
        heavy = [c for c, m in modes.items() if m == "full" and c not in FULL_BESIDE_LORA]
        if heavy:
            out.append(f"components: {', '.join(heavy)} trained fully beside LoRA adapters would be copied whole into the adapter; train {', '.join(heavy)} with LoRA, freeze it, or use strategy: full")
        if "llm" in lora_parts and not cfg.lora.target_modules:
            out.append("lora.target_modules: empty while components.llm is lora: LoRA has nothing to adapt")
        if "vision" in lora_parts and not cfg.lora.vision_target_modules:
            out.append("lora.vision_target_modules: empty while components.vision is lora: LoRA has nothing to adapt")
    o = cfg.optim
    if o.effective_batch is not None:
        per_step = o.per_device_batch * o.grad_accum
        if o.effective_batch % per_step:
            out.append(
                f"optim.effective_batch: {o.effective_batch} is not a multiple of per_device_batch x grad_accum = {per_step} "
                f"(effective batch = per_device_batch x grad_accum x processes)"
            )
    ds = cfg.deepspeed
    if ds.offload_optimizer and ds.stage < 1:
        out.append("deepspeed.offload_optimizer: needs ZeRO stage 1, 2 or 3 (got stage 0)")
    if ds.offload_params and ds.stage != 3:
        out.append(f"deepspeed.offload_params: needs ZeRO stage 3 (got stage {ds.stage})")
    if ds.stage != 3 and any(v is not None for v in ds.zero3.model_dump().values()):
        out.append(f"deepspeed.zero3: ZeRO-3 settings with stage {ds.stage} would be ignored (remove the section, or use stage: 3)")
    if cfg.data.packing and cfg.model.attn_implementation not in PACKING_SAFE_ATTENTION:
        out.append(f"data.packing: attention '{cfg.model.attn_implementation}' cannot keep packed samples apart (use sdpa or varlen)")
    if cfg.data.eval and cfg.data.eval_split:
        out.append("data.eval_split: give an eval set or a held-out split, not both")
    out += _preference_conflicts(cfg)
    if isinstance(cfg.launch.gpus, list) and cfg.launch.nodes > 1:
        out.append("launch.gpus: a device list applies to one node; with several nodes give a count or 'all'")
    return out


def _preference_conflicts(cfg: RunConfig) -> list[str]:
    if cfg.stage != "dpo":
        return ["dpo: settings given but stage is sft (set stage: dpo, or remove the dpo section)"] if cfg.dpo is not None else []
    d, out = cfg.preference(), []
    if d.reference == "adapter_off" and not cfg.uses_lora():
        out.append(f"dpo.reference: adapter_off needs LoRA adapters to switch off (strategy is {cfg.strategy} without LoRA): use reference: precomputed (the starting model's log-probs, computed once) or a model path")
    if d.label_smoothing and d.loss != "sigmoid":
        out.append(f"dpo.label_smoothing: applies to the sigmoid loss only (loss is {d.loss}); set it to 0")
    return out


def check_against_model(cfg: RunConfig, model_type: str) -> list[str]:
    out = []
    if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
        out.append(f"model.path: {cfg.model.path} is a '{model_type}' model, not Qwen3-VL (qwen3_vl or qwen3_vl_moe)")
    if model_type == "qwen3_vl_moe" and cfg.deepspeed.stage == 3:
        out.append("deepspeed.stage: ZeRO-3 with the MoE model (30B-A3B) gathers every expert each step and hangs or crawls with uneven routing; use stage 2 (with offload_optimizer if memory is short)")
    return out


def launched_processes(cfg: RunConfig, gpus: list[Any]) -> int:
    """Ranks ``qvltune train`` starts on this machine's GPUs (every node alike)."""
    g = cfg.launch.gpus
    per_node = len(gpus) if g == "all" else len(g) if isinstance(g, list) else g
    return per_node * cfg.launch.nodes


def effective_batch_mismatch(cfg: RunConfig, gpus: list[Any]) -> str | None:
    """A warning when the planned optim.effective_batch is not what the launch will train with: the
    plan's batch, learning rate and ZeRO stage were chosen for another number of GPUs (a config
    planned for 2 of 8 GPUs, run with launch.gpus: all, trains at 4x the batch)."""
    o = cfg.optim
    if o.effective_batch is None or not gpus:
        return None
    n = launched_processes(cfg, gpus)
    got = o.per_device_batch * o.grad_accum * n
    if got == o.effective_batch:
        return None
    planned = o.effective_batch // (o.per_device_batch * o.grad_accum)
    return (
        f"optim.effective_batch: {o.effective_batch} was planned, but {n} process(es) (launch.gpus: {cfg.launch.gpus}) x per_device_batch "
        f"{o.per_device_batch} x grad_accum {o.grad_accum} train with {got}: set launch.gpus: {planned}, or re-plan with qvltune init"
    )


def check_against_hardware(cfg: RunConfig, gpus: list[Any]) -> list[str]:
    """Conflicts that depend on the machine (``gpus`` from ``hardware.detect_gpus``)."""
    out = []
    if not gpus:
        if cfg.optim.bf16:
            out.append("optim.bf16: no GPU found (CPU mode): set optim.bf16: false")
        if cfg.optim.optimizer == "adamw_torch_fused":
            out.append("optim.optimizer: adamw_torch_fused needs a GPU: use adamw_torch in CPU mode")
        return out
    if cfg.optim.bf16:
        old = [g for g in gpus if not g.bf16]
        if old:
            out.append(f"optim.bf16: GPU {old[0].index} ({old[0].name}, compute capability {old[0].compute_capability}) has no bf16: set optim.bf16: false")
    if isinstance(cfg.launch.gpus, list):
        missing = [i for i in cfg.launch.gpus if i >= len(gpus)]
        if missing:
            out.append(f"launch.gpus: device(s) {missing} do not exist ({len(gpus)} GPU(s) found)")
    elif isinstance(cfg.launch.gpus, int) and cfg.launch.gpus > len(gpus) and cfg.launch.nodes == 1:
        out.append(f"launch.gpus: {cfg.launch.gpus} requested but {len(gpus)} found")
    return out

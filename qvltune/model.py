"""Load Qwen3-VL processors and models, and decide what trains: components, freezing, LoRA, LR groups.

The three trainable parts of Qwen3-VL, by parameter name (after peft's ``base_model.model.`` prefix):

- vision tower: ``model.visual.{patch_embed, pos_embed, blocks.N}``
- projection: ``model.visual.merger`` and the DeepStack mergers ``model.visual.deepstack_merger_list.N``
- language model: ``model.language_model.{layers.N, norm}``; ``lm_head`` and the input embeddings
  ``model.language_model.embed_tokens`` form the ``lm_head`` component (they are one tensor in the
  tied 2B/4B models).

Freezing is done on parameters (``requires_grad``); setting it on a module object does nothing.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvltune.config import COMPONENTS, RunConfig
from qvltune.errors import UserError
from qvltune.tiny import resolve_model_path

SUPPORTED_MODEL_TYPES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}

_COMPONENT_PATTERNS = [
    ("deepstack", re.compile(r"(^|\.)visual\.deepstack_merger_list\.")),
    ("merger", re.compile(r"(^|\.)visual\.merger\.")),
    ("vision", re.compile(r"(^|\.)visual\.")),
    ("lm_head", re.compile(r"(^|\.)(lm_head|language_model\.embed_tokens)\.")),
    ("llm", re.compile(r"(^|\.)language_model\.")),
]


# Transformer blocks, by class-name suffix (Qwen3VLTextDecoderLayer, Qwen3VLMoeTextDecoderLayer,
# Qwen3VLVisionBlock, ...): the units that compilation and ZeRO-3 gathering work on.
DECODER_LAYER = "DecoderLayer"
VISION_BLOCK = "VisionBlock"


def transformer_blocks(model, kinds: tuple[str, ...] = (DECODER_LAYER, VISION_BLOCK)) -> list[Any]:
    """Every module whose class name ends with one of ``kinds``, in model order."""
    return [m for m in model.modules() if type(m).__name__.endswith(kinds)]


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its name (works through peft wrappers)."""
    for component, pattern in _COMPONENT_PATTERNS:
        if pattern.search(name):
            return component
    raise ValueError(f"parameter {name} belongs to no known Qwen3-VL component")


def _trains(model, components: tuple[str, ...]) -> bool:
    return any(p.requires_grad for name, p in model.named_parameters() if component_of(name) in components)


def vision_side_trains(model) -> bool:
    """Whether any parameter before the language model (vision tower, merger, DeepStack mergers)
    trains: then image features carry a gradient into the LLM's input."""
    return _trains(model, ("vision", "merger", "deepstack"))


def language_side_trains(model) -> bool:
    """Whether any parameter of the language model or lm_head trains (LoRA adapters included): then
    every micro-batch, with images or without, gives a trained parameter a gradient."""
    return _trains(model, ("llm", "lm_head"))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def adapter_start(name_or_path: str) -> tuple[str, Path] | None:
    """(base model, adapter folder) when ``model.path`` is a LoRA adapter folder (an SFT run's
    ``final/``, the usual start of preference tuning); None for a model folder or Hub id."""
    from qvltune.adapter import base_for_adapter, is_adapter

    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir() or not is_adapter(path):
        return None
    return base_for_adapter(path)[0], path


def read_model_config(name_or_path: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a folder or Hub id (the Hub through its cache / download); an adapter
    folder's is its base model's."""
    start = adapter_start(name_or_path)
    if start is not None:
        return read_model_config(start[0], trust_remote_code)
    path = resolve_model_path(name_or_path)
    local = Path(path) / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {name_or_path}: {_first_line(e)}", "give a local model folder, or a Hub id reachable from here (the Hub cache works offline)") from None


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False) -> Any:
    """The model's processor (tokenizer, chat template, image/video processors) with the pixel budget applied."""
    from transformers import AutoProcessor

    from qvltune.data.tokenize import configure_processor

    path = resolve_model_path(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the processor of {name_or_path}: {_first_line(e)}", "give a local model folder or a Hub id you can download (HF_HUB_OFFLINE=1 uses the cache only)") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(f"{name_or_path} has no image processor: it is not a vision-language model", "use a Qwen3-VL model")
    return configure_processor(processor, min_pixels, max_pixels)


def run_processor(cfg) -> Any:
    """The processor a run counts and encodes with: its model's, at the data section's pixel budget.
    ``qvltune train`` and ``check-data --config`` both take it from here, so their token counts (and
    the index cache's key, which holds the processor's settings) are the same."""
    lo, hi = cfg.data.pixel_budget()
    return load_processor(cfg.model.path, lo, hi, cfg.model.trust_remote_code)


def model_class(model_type: str):
    """The model class named by config.json's model_type (never guessed from the path)."""
    import transformers

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type '{model_type}' is not Qwen3-VL", "use a Qwen3-VL model (model_type qwen3_vl or qwen3_vl_moe)")
    return getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])


def load_model(name_or_path: str, *, dtype: str = "bfloat16", attn_implementation: str = "sdpa", trust_remote_code: bool = False, random_init: bool = False, device=None):
    """Load through ``from_pretrained`` (under ZeRO-3 the Trainer's DeepSpeed config partitions at load).

    ``device``: load the weights straight onto it (``device_map``) instead of the host.

    ``random_init`` builds the architecture from its config with random weights instead (benchmarks
    of real-size shapes), on the GPU when there is one: the cost of a step does not depend on the
    weights' values."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # qvltune shows its own progress
    start = adapter_start(name_or_path)
    if start is not None:
        # Start from base + an adapter (an SFT run's final/): the adapter merged into the base, so
        # this run's own adapters (and its reference, "adapters off") start from the SFT model.
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from qvltune.adapter import attach_adapter

        base, adapter = start
        if is_deepspeed_zero3_enabled():
            raise UserError(f"model.path {adapter} is a LoRA adapter: ZeRO-3 cannot merge it into partitioned weights", f"merge it first (qvltune merge {adapter} --out merged/) and set model.path to the merged folder")
        base_model = load_model(base, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
        return attach_adapter(base_model, adapter, base).merge_and_unload()
    config = read_model_config(name_or_path, trust_remote_code)
    cls = model_class(config.get("model_type", "?"))
    if attn_implementation == "auto":
        from qvltune.attention import varlen_available

        attn_implementation = "varlen" if varlen_available() else "sdpa"
    attn = "sdpa" if attn_implementation == "varlen" else attn_implementation
    try:
        if random_init:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
            with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
                model = cls._from_config(hf_config, dtype=getattr(torch, dtype), attn_implementation=attn)
        else:
            placement = {"device_map": {"": device}} if device is not None else {}
            model = cls.from_pretrained(
                resolve_model_path(name_or_path), dtype=getattr(torch, dtype), attn_implementation=attn, trust_remote_code=trust_remote_code, **placement
            )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {name_or_path}: {_first_line(e)}", "check the path or Hub id, and that the weights are complete") from None
    # transformers 5 keeps, after a ZeRO-3 (zero.Init) load, every weight conversion of the model
    # type, used or not (integrations/deepspeed.py), and reverses them all in save_pretrained: a full
    # model trained under ZeRO-3 was saved as model.language_model.model.layers.N..., names that
    # from_pretrained then silently re-initialises. Keep only the conversions the load used, as its
    # ordinary load path does (core_model_loading.py).
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: True)()]
    if attn_implementation == "varlen":
        from qvltune.attention import use_varlen_attention

        use_varlen_attention(model)
    return model


# ----------------------------------------------------------------------------------------------
# What trains


def lora_target_regex(cfg: RunConfig) -> str | None:
    """A regex over module names that selects exactly the LoRA-adapted linears of each LoRA component."""
    modes = cfg.modes()
    parts = []
    if modes["llm"] == "lora" and cfg.lora.target_modules:
        names = "|".join(re.escape(t) for t in cfg.lora.target_modules)
        parts.append(rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})")
    if modes["vision"] == "lora" and cfg.lora.vision_target_modules:
        names = "|".join(re.escape(t) for t in cfg.lora.vision_target_modules)
        parts.append(rf".*visual\.blocks\.\d+\.(attn|mlp)\.({names})")
    return "|".join(f"({p})" for p in parts) if parts else None


def modules_to_save(cfg: RunConfig, model) -> list[str]:
    """Fully trained small components beside LoRA: peft keeps a trainable copy and merges it."""
    modes = cfg.modes()
    out = []
    if modes["merger"] == "full":
        out.append("merger")
    if modes["deepstack"] == "full":
        # peft wraps modules, not ModuleLists: name each DeepStack merger.
        out += [f"deepstack_merger_list.{i}" for i in range(len(model.config.vision_config.deepstack_visual_indexes))]
    if modes["lm_head"] == "full":
        out.append("lm_head")
        if not model.config.get_text_config().tie_word_embeddings:
            out.append("embed_tokens")
    return out


def apply_strategy(model, cfg: RunConfig):
    """Freeze per component, add LoRA adapters, and return the (possibly peft-wrapped) model."""
    modes = cfg.modes()
    for name, param in model.named_parameters():
        param.requires_grad_(modes[component_of(name)] == "full")
    if not cfg.uses_lora():
        return model
    from peft import LoraConfig, get_peft_model

    target = lora_target_regex(cfg)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target,
        modules_to_save=modules_to_save(cfg, model) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # Adapters in the weights' dtype (peft would make them fp32): DeepSpeed keeps fp32 master
        # copies of every trained parameter itself, and ZeRO-3 refuses trained parameters of mixed
        # dtypes (fp32 adapters beside bf16 modules_to_save abort its partitioning).
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    except ValueError as e:
        raise UserError(f"LoRA found nothing to adapt: {_first_line(e)}", "check lora.target_modules against the model's module names") from None
    return peft_model


@dataclass
class ComponentStats:
    component: str
    mode: str
    total: int
    trainable: int
    lr: float | None


def trainable_table(model, cfg: RunConfig) -> list[ComponentStats]:
    """Parameters per component (base weights + adapters), counted once even when tied."""
    total: dict[str, int] = defaultdict(int)
    trainable: dict[str, int] = defaultdict(int)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions params
        c = component_of(name)
        if "modules_to_save" not in name and "lora_" not in name:
            total[c] += n
        if p.requires_grad:
            trainable[c] += n
    modes = cfg.modes()
    return [ComponentStats(c, modes[c], total[c], trainable[c], cfg.lr_for(c) if trainable[c] else None) for c in COMPONENTS]


def parameter_groups(model, cfg: RunConfig) -> list[dict[str, Any]]:
    """Optimizer groups: one per (component, weight decay or not), each with its component's LR.

    Biases, norms and embeddings get no weight decay (the usual AdamW practice)."""
    groups: dict[tuple[str, bool], list] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.split(".")[-2] or "embed" in name
        groups[(component_of(name), not no_decay)].append(p)
    return [
        {"params": params, "lr": cfg.lr_for(c), "weight_decay": cfg.optim.weight_decay if decay else 0.0, "name": f"{c}{'' if decay else '/no_decay'}"}
        for (c, decay), params in sorted(groups.items())
    ]

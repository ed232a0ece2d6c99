"""What a model's config.json says, without its weights: shapes and parameter counts.

The model is built on PyTorch's ``meta`` device (shapes only, instantly) to count parameters per
component and list every linear layer LoRA could adapt. ``qvltune.estimate`` turns these counts
into memory and time, ``qvltune.zero`` into ZeRO-3's settings, the planner into its choices.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from qvltune.config import COMPONENTS, RunConfig


# ----------------------------------------------------------------------------------------------
# The model, from config.json


@dataclass(frozen=True)
class Linear:
    name: str
    component: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelStats:
    """Shapes and parameter counts of a Qwen3-VL model (from its config, no weights)."""

    model_type: str
    params: dict[str, int]  # per component (tied embeddings counted once, in lm_head)
    linears: tuple[Linear, ...]  # every nn.Linear, for LoRA counts
    largest_tensor: int  # elements of the largest parameter (ZeRO-3 gathers it whole)
    layer_params: int  # parameters of one decoder layer
    # text
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int
    experts_per_token: int
    moe_intermediate: int
    # vision
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_out: int
    deepstack: int
    spatial_merge: int
    vision_block_params: int

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def llm_active_params(self) -> int:
        """LLM parameters a token passes through (all of them for dense models; for MoE only the
        routed experts' share)."""
        if not self.is_moe:
            return self.params["llm"]
        expert_params = self.layers * self.experts * 3 * self.hidden * self.moe_intermediate
        return self.params["llm"] - expert_params + expert_params * self.experts_per_token // self.experts


def _config_object(config: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(f"model_type '{model_type}' is not Qwen3-VL (qwen3_vl or qwen3_vl_moe)")
    doc = {k: v for k, v in config.items() if k != "model_type"}
    return CONFIG_MAPPING[model_type].from_dict(doc)


def meta_model(config: dict[str, Any]):
    """The model a config.json describes, built on the meta device: shapes only, no memory, instant."""
    import torch

    from qvltune.model import model_class

    with torch.device("meta"):
        return model_class(config["model_type"])._from_config(_config_object(config), dtype=torch.bfloat16)


@lru_cache(maxsize=32)
def _stats_cached(config_json: str) -> ModelStats:
    from torch import nn

    from qvltune.model import component_of

    config = json.loads(config_json)
    model = meta_model(config)
    cfg = model.config
    params = dict.fromkeys(COMPONENTS, 0)
    largest = 0
    layer0 = 0
    for name, p in model.named_parameters():  # tied weights appear once
        params[component_of(name)] += p.numel()
        largest = max(largest, p.numel())
        if ".language_model.layers.0." in name:
            layer0 += p.numel()
    linears = tuple(
        Linear(name, component_of(name + ".weight"), m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    vblock = sum(p.numel() for n, p in model.named_parameters() if ".visual.blocks.0." in n)
    t, v = cfg.text_config, cfg.vision_config
    return ModelStats(
        model_type=config["model_type"],
        params=params,
        linears=linears,
        largest_tensor=largest,
        layer_params=layer0,
        hidden=t.hidden_size,
        layers=t.num_hidden_layers,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        intermediate=t.intermediate_size,
        vocab=t.vocab_size,
        tied=bool(getattr(t, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False)),
        experts=getattr(t, "num_experts", 0) or 0,
        experts_per_token=getattr(t, "num_experts_per_tok", 0) or 0,
        moe_intermediate=getattr(t, "moe_intermediate_size", 0) or 0,
        vision_depth=v.depth,
        vision_hidden=v.hidden_size,
        vision_intermediate=v.intermediate_size,
        vision_out=v.out_hidden_size,
        deepstack=len(v.deepstack_visual_indexes),
        spatial_merge=v.spatial_merge_size,
        vision_block_params=vblock,
    )


def model_stats(config: dict[str, Any]) -> ModelStats:
    """Parameter counts and shapes of the model a config.json describes (built on the meta device)."""
    return _stats_cached(json.dumps(config, sort_keys=True, default=str))


def adapted_linears(stats: ModelStats, cfg: RunConfig) -> list[Linear]:
    """The linears the run's LoRA adapts: those its target regex selects (the same regex peft gets,
    matched the way peft does: re.fullmatch)."""
    from qvltune.model import lora_target_regex

    regex = lora_target_regex(cfg)
    if not regex:
        return []
    pattern = re.compile(regex)
    return [lin for lin in stats.linears if pattern.fullmatch(lin.name)]


def lora_params(stats: ModelStats, cfg: RunConfig) -> dict[str, int]:
    """LoRA adapter parameters per component: rank x (in + out) for each adapted linear."""
    out = dict.fromkeys(COMPONENTS, 0)
    for lin in adapted_linears(stats, cfg):
        out[lin.component] += cfg.lora.rank * (lin.in_features + lin.out_features)
    return out


def _adapted_inputs(stats: ModelStats, cfg: RunConfig, prefix: str) -> dict[str, int]:
    """Input width of each adapted linear of one layer (e.g. {'q_proj': 2048, ...})."""
    return {lin.name.rsplit(".", 1)[-1]: lin.in_features for lin in adapted_linears(stats, cfg) if lin.name.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Where the model config comes from (the only I/O here)


def resolve_model_config(path: str, trust_remote_code: bool = False) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it came from). Known Qwen3-VL Hub ids use the built-in table
    (no network); folders and ``builtin:tiny`` their own config.json; anything else the Hub cache."""
    from pathlib import Path

    from qvltune.catalog import builtin_config, size_of

    if not path.startswith("builtin:") and not Path(path).exists():
        known = builtin_config(path)
        if known is not None:
            return known, f"built-in config of Qwen3-VL-{size_of(path)}"
    from qvltune.model import read_model_config

    return read_model_config(path, trust_remote_code), f"{path}/config.json" if not path.startswith("builtin:") else f"{path} config.json"

"""The released Qwen3-VL sizes: their Hub ids and ``config.json`` values, for planning offline.

``qvltune init`` and ``qvltune estimate`` need a model's architecture before anything is
downloaded (and where nothing can be). The values below are those of the released checkpoints'
``config.json`` (Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct and Qwen3-VL-30B-A3B-Instruct; the Thinking
variants share them), written with transformers 5's field names (``Qwen3VLConfig`` /
``Qwen3VLMoeConfig``: ``rope_parameters`` instead of 4.x's ``rope_scaling`` + ``rope_theta``).
Only what changes the shapes or the training cost matters here; token ids are the released ones.

Checked: built on the meta device with transformers 5, the parameter counts match the released
models (8B: 8,767,123,696; 30B-A3B: 31,070,754,032 — tests/test_estimate.py pins all five).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

# Interleaved multimodal RoPE of every Qwen3-VL text model (head_dim 128: sections of 24/20/20 pairs).
_ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "rope_parameters": _ROPE,
}

_VISION_COMMON: dict[str, Any] = {
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "initializer_range": 0.02,
}

# The two vision towers: the 2B/4B one (24 blocks of width 1024) and the larger one of 8B/32B/30B-A3B.
_VISION_SMALL = {**_VISION_COMMON, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}
_VISION_LARGE = {**_VISION_COMMON, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}


def _dense(text: dict[str, Any], vision: dict[str, Any], tied: bool) -> dict[str, Any]:
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "text_config": {**_TEXT_COMMON, "model_type": "qwen3_vl_text", **text, "tie_word_embeddings": tied},
        "vision_config": {**vision, "model_type": "qwen3_vl_vision", "out_hidden_size": text["hidden_size"]},
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": tied,
    }


def _moe(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    doc = _dense(text, vision, tied=False)
    doc["model_type"] = "qwen3_vl_moe"
    doc["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    doc["text_config"]["model_type"] = "qwen3_vl_moe_text"
    doc["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    return doc


QWEN3_VL_CONFIGS: dict[str, dict[str, Any]] = {
    "2B": _dense({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8}, _VISION_SMALL, tied=True),
    "4B": _dense({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8}, _VISION_SMALL, tied=True),
    "8B": _dense({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8}, _VISION_LARGE, tied=False),
    "32B": _dense({"hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8}, _VISION_LARGE, tied=False),
    # Every decoder layer is a mixture of 128 experts (8 active per token) of width 768;
    # intermediate_size is that of dense layers, of which the released model has none.
    "30B-A3B": _moe(
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        _VISION_LARGE,
    ),
}

# Approximate total parameters (billions), for ordering sizes and short labels.
SIZE_BILLIONS = {"2B": 2.1, "4B": 4.4, "8B": 8.8, "32B": 33.4, "30B-A3B": 31.1}


@dataclass(frozen=True)
class KnownModel:
    size: str  # "8B"
    hub_id: str  # "Qwen/Qwen3-VL-8B-Instruct"

    @property
    def is_moe(self) -> bool:
        return self.size == "30B-A3B"


KNOWN_MODELS = [KnownModel(size, f"Qwen/Qwen3-VL-{size}-Instruct") for size in ("2B", "4B", "8B", "32B", "30B-A3B")]

_SIZE_IN_NAME = re.compile(r"qwen3-vl-(2b|4b|8b|32b|30b-a3b)(?![0-9a-z])", re.IGNORECASE)


def size_of(name_or_path: str) -> str | None:
    """The Qwen3-VL size a Hub id names ("Qwen/Qwen3-VL-8B-Thinking" -> "8B"), else None."""
    m = _SIZE_IN_NAME.search(name_or_path)
    return m.group(1).upper() if m else None


def builtin_config(name_or_path: str) -> dict[str, Any] | None:
    """A deep copy of the built-in config.json for a known Qwen3-VL Hub id or size ("8B"), else None."""
    size = name_or_path.upper() if name_or_path.upper() in QWEN3_VL_CONFIGS else size_of(name_or_path)
    return copy.deepcopy(QWEN3_VL_CONFIGS[size]) if size else None

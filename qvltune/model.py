"""Load Qwen3-VL processors and models through the normal ``from_pretrained`` path."""

from __future__ import annotations

from typing import Any

from qvltune.errors import UserError
from qvltune.tiny import resolve_model_path


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False) -> Any:
    """The model's processor (tokenizer, chat template, image/video processors) with the pixel budget applied."""
    from transformers import AutoProcessor

    from qvltune.data.tokenize import configure_processor

    path = resolve_model_path(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the processor of {name_or_path}: {_first_line(e)}", "give a local model folder or a Hub id you can download (HF_HUB_OFFLINE=1 uses the cache only)") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(f"{name_or_path} has no image processor: it is not a vision-language model", "use a Qwen3-VL model")
    return configure_processor(processor, min_pixels, max_pixels)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

"""Image resolution budgets: pixels and tokens per image.

Qwen3-VL turns every 32x32 pixels of a resized image into one LLM token (patch 16, spatial merge 2).
The practitioner's guide writes budgets in Qwen2-VL/2.5-VL units of 28x28 pixels per token
(``max_pixels = 1024 * 28 * 28``); qvltune keeps budgets in plain pixels, so such a value means the
same image area, which Qwen3-VL turns into fewer tokens (802,816 px -> 784 tokens).
"""

from __future__ import annotations

TOKEN_PIXELS = 32 * 32  # pixels per LLM image token in Qwen3-VL
QWEN25_TOKEN_PIXELS = 28 * 28  # the guide's unit

# The guide's variable-resolution budget (64*28*28 to 1024*28*28 pixels): 49 to 784 Qwen3-VL tokens.
DEFAULT_MIN_PIXELS = 64 * QWEN25_TOKEN_PIXELS
DEFAULT_MAX_PIXELS = 1024 * QWEN25_TOKEN_PIXELS


def resolve_pixels(
    min_pixels: int | None, max_pixels: int | None, min_tokens: int | None = None, max_tokens: int | None = None
) -> tuple[int | None, int | None]:
    """One (min, max) pixel budget from pixels or tokens per image; ``None`` where nothing was given."""
    if min_pixels is not None and min_tokens is not None:
        raise ValueError("give the minimum in pixels or in tokens per image, not both")
    if max_pixels is not None and max_tokens is not None:
        raise ValueError("give the maximum in pixels or in tokens per image, not both")
    lo = min_pixels if min_pixels is not None else (min_tokens * TOKEN_PIXELS if min_tokens is not None else None)
    hi = max_pixels if max_pixels is not None else (max_tokens * TOKEN_PIXELS if max_tokens is not None else None)
    for name, value in (("minimum", lo), ("maximum", hi)):
        if value is not None and value < TOKEN_PIXELS:
            raise ValueError(f"the {name} image budget must be at least one token ({TOKEN_PIXELS} pixels), got {value}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min pixels {lo} is larger than max pixels {hi}")
    return lo, hi


def tokens_for(pixels: int) -> int:
    return pixels // TOKEN_PIXELS

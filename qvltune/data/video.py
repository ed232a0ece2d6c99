"""Video frame sampling and budgets: which frames a video contributes and how many tokens they cost.

A video file is sampled at ``fps`` frames per second of its own duration (as Qwen3-VL's video
processor samples: ``int(total / rate * fps)`` frames, uniformly spaced), clamped to
``[min_frames, max_frames]``; a folder or list of frames is taken to be ``fps`` frames per second
already and is only thinned, uniformly, when it holds more than ``max_frames``. The chosen frame
indices travel with the frames as the processor's ``VideoMetadata``, so the timestamps it writes
between frame groups (``<1.2 seconds>``) are those of the frames really shown, and the same at
counting (check-data, the data index) and at encoding (training).

``max_tokens`` bounds a whole video's LLM tokens: Qwen3-VL's video resize keeps
frames x height x width under the video processor's ``longest_edge`` pixels, and one token covers
32x32 pixels of a pair of frames (temporal patch 2), so the bound is ``max_tokens x 32 x 32 x 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qvltune.pixels import TOKEN_PIXELS


@dataclass(frozen=True)
class VideoSampling:
    fps: float = 2.0
    min_frames: int = 2  # one temporal patch (2 frames) at least
    max_frames: int | None = None
    max_tokens: int | None = None  # LLM tokens per video (all frames); None: the processor's budget


def coerce(sampling: VideoSampling | float) -> VideoSampling:
    """Older call sites pass the sampling rate alone."""
    return sampling if isinstance(sampling, VideoSampling) else VideoSampling(fps=float(sampling))


def uniform(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (first and last included), computed as
    Qwen3-VL's video processor computes them (``np.linspace(...).round()``), so both pick the same frames."""
    import numpy as np

    if count >= total:
        return list(range(total))
    return np.linspace(0, total - 1, max(count, 1)).round().astype(int).tolist()


def file_indices(total: int, rate: float, sampling: VideoSampling) -> list[int]:
    """Frame indices of a ``rate`` fps video file of ``total`` frames, resampled to ``sampling``."""
    count = int(total / rate * sampling.fps) if rate > 0 else total
    count = max(count, sampling.min_frames)
    if sampling.max_frames is not None:
        count = min(count, sampling.max_frames)
    return uniform(total, min(count, total))


def list_indices(total: int, sampling: VideoSampling) -> list[int]:
    """Frame indices of a folder or list of frames (already at ``fps``): all, or ``max_frames`` of them."""
    if sampling.max_frames is not None and total > sampling.max_frames:
        return uniform(total, sampling.max_frames)
    return list(range(total))


def configure_video_processor(processor: Any, sampling: VideoSampling) -> Any:
    """Apply the sampling and the per-video token budget to the processor's video processor, so the
    saved processor samples and resizes videos at inference as training did."""
    vp = processor.video_processor
    vp.fps = sampling.fps
    vp.min_frames = sampling.min_frames
    if sampling.max_frames is not None:
        vp.max_frames = sampling.max_frames
    if sampling.max_tokens is None:
        return processor
    size = dict(vp.size)
    size["longest_edge"] = int(sampling.max_tokens * TOKEN_PIXELS * vp.temporal_patch_size)
    size["shortest_edge"] = min(size.get("shortest_edge", 0), size["longest_edge"])
    vp.size = size
    return processor


def metadata(info) -> Any:
    """The ``VideoMetadata`` the processor writes timestamps from: the chosen frames of the source."""
    from transformers.video_utils import VideoMetadata

    indices = list(info.indices) if info.indices else list(range(info.frames))
    return VideoMetadata(total_num_frames=info.total_frames or info.frames, fps=info.fps, frames_indices=indices)


def with_frames(info, count: int):
    """The same video with ``count`` of its chosen frames (uniformly kept): for 'what would fit'."""
    from dataclasses import replace

    keep = uniform(info.frames, count)
    indices = tuple(info.indices[i] for i in keep) if info.indices else tuple(keep)
    paths = tuple(info.frame_paths[i] for i in keep) if info.frame_paths else ()
    return replace(info, frames=len(keep), indices=indices, frame_paths=paths)


def frames_that_fit(infos: list, count_tokens, limit: int) -> int | None:
    """The most frames per video (the same cap for every video of the record) that keep the record
    within ``limit`` tokens; ``count_tokens(infos) -> int``. None when even 2 frames do not fit.

    Binary search: a record's tokens grow with its frames (at a fixed per-frame resolution; under a
    total-pixel budget fewer frames get more pixels each, so each candidate is counted, not scaled)."""
    from qvltune.data.media import VideoInfo

    most = max((i.frames for i in infos if isinstance(i, VideoInfo)), default=0)

    def fits(n: int) -> bool:
        capped = [with_frames(i, min(n, i.frames)) if isinstance(i, VideoInfo) else i for i in infos]
        return count_tokens(capped) <= limit

    lo, hi, best = 2, most - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best

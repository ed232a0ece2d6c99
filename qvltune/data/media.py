"""Media files: resolve paths safely, read image sizes from headers, load images and video frames.

A video is a video file (decoded with PyAV when it is installed), a folder of frames, or a list of
frame paths. Which frames are used, and the timestamps they carry, is ``qvltune.data.video``'s
sampling: files are resampled to ``fps``; folders and lists are taken to be ``fps`` frames per
second apart and only thinned beyond ``max_frames``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}


class MediaError(Exception):
    """A media reference that cannot be used; ``code`` names the kind, ``fix`` the next step."""

    def __init__(self, message: str, fix: str = "", code: str = "bad-media", field: str = ""):
        super().__init__(message)
        self.message, self.fix, self.code, self.field = message, fix, code, field


def resolve(source: str, root: Path, allow_outside: bool = False) -> Path:
    """The file a media path names: relative paths resolve against ``root`` and may not escape it."""
    path = Path(os.path.expanduser(source))
    if not path.is_absolute():
        path = root / path
    resolved = Path(os.path.normpath(path))
    if not allow_outside:
        root_norm = Path(os.path.normpath(root.absolute()))
        absolute = resolved if resolved.is_absolute() else Path(os.path.normpath(resolved.absolute()))
        if Path(source).is_absolute() or ".." in Path(source).parts:
            if root_norm != absolute and root_norm not in absolute.parents:
                raise MediaError(
                    f"{source} is outside the image root {root}",
                    "move the file under the image root, pass --image-root, or allow it (data.allow_media_outside_root)",
                    "outside-root",
                )
    return resolved


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames the model will see
    width: int
    height: int
    fps: float  # frame rate of the source (a file's own; a frame list's configured fps)
    frame_paths: tuple[Path, ...] = ()  # the chosen frames; empty for video files
    indices: tuple[int, ...] = ()  # the chosen frames' indices in the source (timestamps = index / fps)
    total_frames: int = 0  # frames in the source


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise MediaError(f"{what} not found: {path}", "fix the path or pass --image-root", "missing-media")
    if path.is_dir():
        raise MediaError(f"{what} is a directory: {path}", "point at a file", "media-is-dir")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(f"cannot read {path}: {e.strerror}", "check permissions", "unreadable-media") from None
    if size == 0:
        raise MediaError(f"{what} is empty (0 bytes): {path}", "re-export the file", "empty-media")


def probe_image(path: Path, deep: bool = False) -> ImageInfo:
    """Read an image's size from its header (``deep`` decodes it fully to catch truncated files)."""
    from PIL import Image, UnidentifiedImageError

    _check_file(path, "image")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if deep:
                im.load()
    except UnidentifiedImageError:
        raise MediaError(f"not an image: {path}", "convert it to JPEG or PNG", "not-image") from None
    except PermissionError as e:
        raise MediaError(f"cannot read {path}: {e.strerror}", "check permissions", "unreadable-media") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"corrupt image {path}: {e}", "re-export or remove it", "corrupt-image") from None
    if width < 1 or height < 1:
        raise MediaError(f"image has no pixels: {path}", "re-export it", "corrupt-image")
    return ImageInfo(width, height)


def load_image(path: Path):
    """Decode an image as RGB (raises ``MediaError`` with the path on any failure)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"image not found: {path}", "fix the path or the image root", "missing-media") from None
    except Exception as e:  # PIL raises many types for bad files
        raise MediaError(f"cannot decode image {path}: {e}", "re-export or remove it", "corrupt-image") from None


def frame_paths(source: str | tuple[str, ...], root: Path, allow_outside: bool) -> tuple[Path, ...] | None:
    """The frame files of a video given as a folder or a list; ``None`` for a video file."""
    if isinstance(source, tuple):
        return tuple(resolve(f, root, allow_outside) for f in source)
    path = resolve(source, root, allow_outside)
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise MediaError(f"video folder has no image frames: {path}", "put the frames (jpg/png) in it", "empty-media")
        return tuple(frames)
    return None


def probe_video(source: str | tuple[str, ...], root: Path, allow_outside: bool, fps, deep: bool = False) -> VideoInfo:
    """Header-read a video and choose its frames (``fps``: a ``video.VideoSampling`` or a rate)."""
    from qvltune.data.video import coerce, file_indices, list_indices

    sampling = coerce(fps)
    frames = frame_paths(source, root, allow_outside)
    if frames is not None:
        sizes = {(info.width, info.height) for info in (probe_image(f, deep) for f in frames)}
        if len(sizes) > 1:
            raise MediaError(f"video frames differ in size ({len(sizes)} sizes) in {source if isinstance(source, str) else frames[0].parent}", "resize the frames to one size", "frame-sizes")
        (width, height), = sizes
        chosen = list_indices(len(frames), sampling)
        return VideoInfo(len(chosen), width, height, sampling.fps, tuple(frames[i] for i in chosen), tuple(chosen), len(frames))
    path = resolve(source, root, allow_outside)
    _check_file(path, "video")
    try:
        import av  # optional: PyAV decodes video files
    except ImportError:
        raise MediaError(f"video file {path} needs PyAV to decode", "pip install av, or give the video as a folder of frames", "no-video-decoder") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or sampling.fps
            count = stream.frames or 0
            if not count or deep:
                count = sum(1 for _ in container.decode(stream))
            chosen = file_indices(count, rate, sampling)
            return VideoInfo(len(chosen), stream.codec_context.width, stream.codec_context.height, rate, (), tuple(chosen), count)
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}", "re-encode it (e.g. H.264 MP4) or give frames", "corrupt-video") from None


def load_video(info: VideoInfo, source: str | tuple[str, ...], root: Path, allow_outside: bool):
    """The frames of a video as a list of RGB images (all frames for folders/lists)."""
    if info.frame_paths:
        return [load_image(p) for p in info.frame_paths]
    import av

    path = resolve(source, root, allow_outside)
    wanted = set(info.indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = {i: frame.to_image().convert("RGB") for i, frame in enumerate(container.decode(stream)) if i in wanted}
    missing = [i for i in info.indices if i not in frames]
    if missing:
        raise MediaError(f"video {path} has fewer frames than its header said (frame {missing[0]} missing)", "re-encode it", "corrupt-video")
    return [frames[i] for i in info.indices]

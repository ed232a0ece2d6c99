"""Media files: resolve paths safely, read image sizes from headers, load images and video frames.

A video is a video file (decoded with PyAV when it is installed), a folder of frames, or a list of
frame paths. Which frames are used, and the timestamps they carry, is ``qvltune.data.video``'s
sampling: files are resampled to ``fps``; folders and lists are taken to be ``fps`` frames per
second apart and only thinned beyond ``max_frames``.

Every reader here turns whatever a hostile or broken file makes the decoder raise into a
``MediaError`` naming the file, so one bad file is one bad record, never a crash. The same
functions serve ``check-data``, token counting, training and inference, so an image is seen the
same way everywhere: EXIF orientation applied, 16-bit and palette images converted the same way,
the first frame of an animation.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}

# Pillow's own decompression-bomb limit: Image.open refuses images above 2 x Image.MAX_IMAGE_PIXELS
# (89,478,485 by default), i.e. 178,956,970 pixels. data.image_pixel_limit / --image-pixel-limit
# raise (or lower) it for datasets of genuine gigapixel scans.
DEFAULT_IMAGE_PIXEL_LIMIT = 2 * 89_478_485
LIMIT_KNOBS = "data.image_pixel_limit in the run config, --image-pixel-limit for check-data"
# Images with no side longer than this are almost always placeholders or tracking pixels.
TINY_IMAGE_SIDE = 16
# Qwen3-VL groups video frames in temporal patches of 2: a one-frame video cannot be encoded.
MIN_VIDEO_FRAMES = 2

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")  # C:\..., C:/..., \\server\share


class MediaError(Exception):
    """A media reference that cannot be used; ``code`` names the kind, ``fix`` the next step.

    ``message`` says what is wrong without naming the file, ``path`` names the file: records that
    share one problem (a wrong image root) then read as one group in ``check-data``'s output."""

    def __init__(self, message: str, fix: str = "", code: str = "bad-media", field: str = "", path: str | Path = ""):
        super().__init__(message)
        self.message, self.fix, self.code, self.field, self.path = message, fix, code, field, str(path)

    def describe(self) -> str:
        return f"{self.message}: {self.path}" if self.path else self.message

    def __str__(self) -> str:
        return self.describe()


@functools.lru_cache(maxsize=64)
def _real(path: str) -> str:
    return os.path.realpath(path)


def resolve(source: str, root: Path, allow_outside: bool = False) -> Path:
    """The real file a media path names.

    Relative paths resolve against ``root``. Symlinks and ``..`` are resolved before the path is
    compared with the (equally resolved) root, so neither a link inside the root pointing elsewhere
    nor ``../`` can reach outside it; a root that is itself a symlink is fine. ``file://`` URLs are
    local paths; other URLs are refused (nothing is ever downloaded). Windows separators are
    normalised (``imgs\\a.jpg`` reads as ``imgs/a.jpg`` unless a file of that literal name exists);
    Windows drive and UNC paths cannot be opened here and are refused.
    """
    text = source
    url = _URL.match(text) if "://" in text else None
    if url and url.group(1).lower() == "file":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file URL on another host ({parsed.netloc})", "copy the file here and give its local path", "remote-media", path=source)
        text = unquote(parsed.path)
    elif url or text.startswith("data:"):
        scheme = url.group(1) if url else "data"
        raise MediaError(
            f"a URL ({scheme}): qvltune never downloads media, so training cannot depend on the network",
            "download the files first and give their local paths (relative to the image root)",
            "remote-media",
            path=source,
        )
    if _WINDOWS_ABSOLUTE.match(text):
        raise MediaError("a Windows drive or network path, which cannot be opened here", "give the path relative to the image root, with / separators", "windows-path", path=source)
    # String functions rather than pathlib: this runs once per media item of every record.
    base = os.fspath(root)
    if text.startswith("~"):
        text = os.path.expanduser(text)
    if "\\" in text and not os.path.exists(os.path.join(base, text)):
        text = text.replace("\\", "/")
    joined = os.path.join(base, text)  # an absolute ``text`` replaces ``base``
    real = os.path.realpath(joined)
    if not allow_outside:
        real_root = _real(os.path.abspath(base))
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            linked = os.path.normpath(os.path.abspath(joined)) != real
            raise MediaError(
                f"outside the image root {root}" + (" (through a symlink)" if linked else ""),
                "move the file under the image root, pass --image-root, or allow it (data.allow_media_outside_root)",
                "outside-root",
                path=f"{source} -> {real}" if linked else source,
            )
    return Path(real)


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as the model sees it: after EXIF orientation
    height: int
    frames: int = 1  # > 1 for an animated GIF/WebP (only the first frame is used)


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
        raise MediaError(f"{what} not found", "fix the path or pass --image-root", "missing-media", path=path)
    if path.is_dir():
        raise MediaError(f"{what} is a directory", "point at a file", "media-is-dir", path=path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(f"cannot read the {what} ({e.strerror})", "check permissions", "unreadable-media", path=path) from None
    if size == 0:
        raise MediaError(f"{what} is empty (0 bytes)", "re-export the file", "empty-media", path=path)


@contextmanager
def _decoding(path: Path, pixel_limit: int):
    """Pillow with our pixel limit, every decoder failure turned into a ``MediaError``."""
    from PIL import Image, UnidentifiedImageError

    old = Image.MAX_IMAGE_PIXELS
    # Pillow checks its limit itself, in open and wherever a plugin learns a new size (GIF frames,
    # ICO entries...): scale its global so it refuses exactly above ``pixel_limit``.
    Image.MAX_IMAGE_PIXELS = pixel_limit / 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # between limit/2 and limit: fine
            yield
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than allowed"
        whose = "Pillow's decompression-bomb limit" if pixel_limit == DEFAULT_IMAGE_PIXEL_LIMIT else "the decompression-bomb limit set"
        raise MediaError(
            f"image of {count} is over {whose} of {pixel_limit:,} pixels",
            f"downscale it, or if it is a genuine large scan raise the limit ({LIMIT_KNOBS})",
            "image-too-large",
            path=path,
        ) from None
    except UnidentifiedImageError:
        raise MediaError("not an image (Pillow cannot identify it)", "convert it to JPEG or PNG", "not-image", path=path) from None
    except FileNotFoundError:
        raise MediaError("image not found", "fix the path or the image root", "missing-media", path=path) from None
    except PermissionError as e:
        raise MediaError(f"cannot read the image ({e.strerror})", "check permissions", "unreadable-media", path=path) from None
    except MemoryError:
        raise MediaError("image too large to decode in memory", "downscale it", "image-too-large", path=path) from None
    except Exception as e:  # noqa: BLE001 - a decoder fed hostile bytes raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise MediaError(f"corrupt image ({type(e).__name__}: {e})", "re-export or remove it", "corrupt-image", path=path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


_ORIENTATION_TAG = 0x0112


def _orientation(im) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable: a broken EXIF block must not refuse
    an image whose pixels are fine, and probe and load must agree on it. Read from what the file's
    header gives: Pillow's ``getexif`` on a PNG without an eXIf chunk before its pixels decodes the
    whole image to look behind them, which would make every header read a full decode (such late
    chunks are rare, and ignored alike when probing and loading)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF raises many types inside Pillow
        return 1
    return value if 1 <= value <= 8 else 1


def _transpose(im, orientation: int):
    """Apply an EXIF orientation: the table of ``PIL.ImageOps.exif_transpose``, driven by the
    tolerant ``_orientation`` above."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return im.transpose(method) if method is not None else im


def to_rgb(im):
    """An RGB copy of a decoded image.

    16-bit and 32-bit grey images are scaled to 8 bits first: Pillow's ``convert("RGB")`` clips them
    at 255, which turns a 16-bit PNG almost white. Transparency (RGBA, LA, palettes with a
    transparent colour) is composited onto white, the rule of transformers' ``convert_to_rgb``.
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(a).round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def probe_image(path: Path, deep: bool = False, pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT) -> ImageInfo:
    """An image's size as the model will see it, from its header (``deep`` decodes it fully to
    catch truncated files and headers that disagree with the pixel data).

    A file already read by this process, unchanged (same path, size, mtime and inode), is not read
    again: datasets often ask many questions about one image (a million records of ten thousand
    images: a stat instead of opening the file a hundred times)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return _probe_image(path, deep, pixel_limit)  # its error, named as usual
    return _probe_known(os.fspath(path), deep, pixel_limit, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=1 << 16)
def _probe_known(path: str, deep: bool, pixel_limit: int, size: int, mtime_ns: int, inode: int) -> ImageInfo:
    return _probe_image(Path(path), deep, pixel_limit)  # errors are raised, never cached


def _probe_image(path: Path, deep: bool, pixel_limit: int) -> ImageInfo:
    from PIL import Image

    _check_file(path, "image")
    with _decoding(path, pixel_limit):
        with Image.open(path) as im:
            width, height = im.size
            orientation = _orientation(im)
            # PNG (APNG) and WebP state their frame count in the header; GIF and the others must seek.
            frames = getattr(im, "n_frames", 1) if im.format in ("PNG", "WEBP", "JPEG") else None
            if deep:
                im.seek(0)
                im.load()
                if im.size != (width, height):
                    raise MediaError(f"the header says {width}x{height} but the pixels decode to {im.size[0]}x{im.size[1]}", "re-export the image", "size-mismatch", path=path)
                to_rgb(im)
    if width < 1 or height < 1:
        raise MediaError(f"image has no pixels ({width}x{height})", "re-export it", "corrupt-image", path=path)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the model sees it the other way up
        width, height = height, width
    return ImageInfo(width, height, frames if frames is not None else _frame_count(path, pixel_limit))


def _frame_count(path: Path, pixel_limit: int) -> int:
    """Frames of an animation (1 for a still image). Only the first frame is used, so broken later
    frames do not refuse the image: counting them stops where they break (on its own file handle,
    leaving the first frame's decoder untouched)."""
    from PIL import Image

    try:
        with _decoding(path, pixel_limit), Image.open(path) as im:
            if not getattr(im, "is_animated", False):
                return 1
            try:
                return im.n_frames
            except Exception:  # noqa: BLE001 - a truncated later frame: at least two frames
                return 2
    except MediaError:
        return 2  # is_animated itself read a broken second frame



def load_image(path: Path, pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT):
    """Decode an image as the model sees it: first frame, EXIF orientation applied, RGB (raises
    ``MediaError`` naming the file on any failure)."""
    from PIL import Image

    with _decoding(path, pixel_limit):
        with Image.open(path) as im:
            header = im.size
            orientation = _orientation(im)
            im.seek(0)
            im.load()
            if im.size != header:
                raise MediaError(f"the header says {header[0]}x{header[1]} but the pixels decode to {im.size[0]}x{im.size[1]}", "re-export the image", "size-mismatch", path=path)
            return _transpose(to_rgb(im), orientation)


def frame_order(path: Path) -> list:
    """A frame's place in its folder: names in natural order, numbers by value (``ffmpeg -i v.mp4
    %d.jpg`` writes 1.jpg ... 10.jpg, which a plain sort reads 1, 10, 2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_paths(source: str | tuple[str, ...], root: Path, allow_outside: bool) -> tuple[Path, ...] | None:
    """The frame files of a video given as a folder or a list; ``None`` for a video file."""
    if isinstance(source, tuple):
        return tuple(resolve(f, root, allow_outside) for f in source)
    path = resolve(source, root, allow_outside)
    if path.is_dir():
        # Each frame is checked like any path: a symlinked frame must not reach outside the root.
        frames = [resolve(str(p), root, allow_outside) for p in sorted(path.iterdir(), key=frame_order) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not frames:
            raise MediaError("video folder has no image frames", "put the frames (jpg/png) in it", "empty-media", path=path)
        return tuple(frames)
    return None


def _too_few_frames(count: int, path) -> MediaError:
    if count == 0:
        return MediaError("video has no frames", "re-encode it, or remove it", "corrupt-video", path=path)
    return MediaError(
        f"video has {count} frame; Qwen3-VL needs at least {MIN_VIDEO_FRAMES} (one temporal patch)",
        "give a single frame as an image (<image>) instead, or add frames",
        "too-few-frames",
        path=path,
    )


def probe_video(source: str | tuple[str, ...], root: Path, allow_outside: bool, fps, deep: bool = False, pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT) -> VideoInfo:
    """Header-read a video and choose its frames (``fps``: a ``video.VideoSampling`` or a rate)."""
    from qvltune.data.video import coerce, file_indices, list_indices

    sampling = coerce(fps)
    frames = frame_paths(source, root, allow_outside)
    if frames is not None:
        where = frames[0].parent if isinstance(source, tuple) else resolve(source, root, allow_outside)
        if len(frames) < MIN_VIDEO_FRAMES:
            raise _too_few_frames(len(frames), where)
        sizes: dict[tuple[int, int], Path] = {}
        for f in frames:
            info = probe_image(f, deep, pixel_limit)
            sizes.setdefault((info.width, info.height), f)
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h} ({p.name})" for (w, h), p in list(sizes.items())[:3])
            raise MediaError(f"video frames differ in size ({len(sizes)} sizes: {listed})", "resize the frames to one size", "frame-sizes", path=where)
        (width, height), = sizes
        chosen = list_indices(len(frames), sampling)
        return VideoInfo(len(chosen), width, height, sampling.fps, tuple(frames[i] for i in chosen), tuple(chosen), len(frames))
    path = resolve(source, root, allow_outside)
    _check_file(path, "video")
    try:
        import av  # optional: PyAV decodes video files
    except ImportError:
        raise MediaError("video file needs PyAV to decode", "pip install av, or give the video as a folder of frames", "no-video-decoder", path=path) from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("file has no video stream", "re-encode it (e.g. H.264 MP4) or give frames", "corrupt-video", path=path)
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or sampling.fps
            count = stream.frames or 0
            if not count or deep:
                count = sum(1 for _ in container.decode(stream))
            width, height = stream.codec_context.width, stream.codec_context.height
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many error types for bad files
        raise MediaError(f"cannot decode the video ({type(e).__name__}: {e})", "re-encode it (e.g. H.264 MP4) or give frames", "corrupt-video", path=path) from None
    if count < MIN_VIDEO_FRAMES:
        raise _too_few_frames(count, path)
    if width < 1 or height < 1:
        raise MediaError(f"video has no pixels ({width}x{height})", "re-encode it", "corrupt-video", path=path)
    chosen = file_indices(count, rate, sampling)
    return VideoInfo(len(chosen), width, height, rate, (), tuple(chosen), count)


def load_video(info: VideoInfo, source: str | tuple[str, ...], root: Path, allow_outside: bool, pixel_limit: int = DEFAULT_IMAGE_PIXEL_LIMIT):
    """The frames of a video as a list of RGB images (all frames for folders/lists)."""
    if info.frame_paths:
        frames = [load_image(p, pixel_limit) for p in info.frame_paths]
        if len({f.size for f in frames}) > 1:
            raise MediaError("video frames differ in size", "resize the frames to one size", "frame-sizes", path=info.frame_paths[0].parent)
        return frames
    import av

    path = resolve(source, root, allow_outside)
    wanted = set(info.indices)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = {i: frame.to_image().convert("RGB") for i, frame in enumerate(container.decode(stream)) if i in wanted}
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many error types for bad files
        raise MediaError(f"cannot decode the video ({type(e).__name__}: {e})", "re-encode it (e.g. H.264 MP4) or give frames", "corrupt-video", path=path) from None
    missing = [i for i in info.indices if i not in frames]
    if missing:
        raise MediaError(f"video has fewer frames than its header said (frame {missing[0]} missing)", "re-encode it", "corrupt-video", path=path)
    if len(frames) < MIN_VIDEO_FRAMES:
        raise _too_few_frames(len(frames), path)
    return [frames[i] for i in info.indices]

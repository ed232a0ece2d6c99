"""Real hostile and odd media files, written byte for byte (shared by the tests and
benchmarks/check_data_speed.py)."""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from pathlib import Path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rows: bytes, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` around the (already filtered) ``rows``."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b"")


@lru_cache(maxsize=2)
def bomb_png(side: int = 20000) -> bytes:
    """A genuine decompression bomb: a side x side black 1-bit PNG, about 50 KB on disk for 20000."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    return png_bytes(side, side, row * side, bit_depth=1)


def write_bomb(path: Path, side: int = 20000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bomb_png(side))
    return path


def write_lying_png(path: Path, claimed=(400, 400), real=(10, 10)) -> Path:
    """A PNG whose header claims ``claimed`` pixels but whose data holds only ``real``."""
    w, h = real
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(*claimed, (b"\x00" + b"\x80" * w) * h))
    return path


def write_zero_pixel_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(0, 10, b""))
    return path


def write_truncated_jpeg(path: Path, keep: float = 0.6, size=(256, 256)) -> Path:
    """A noisy JPEG cut short: header intact, pixel data missing."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path

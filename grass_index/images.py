"""A dependency-free PNG writer for `query --png` and the `serve` page: image tiles and captions.

matplotlib/Pillow are not dependencies of grass-index, so this draws with numpy and a 3x5
pixel font and encodes the PNG with zlib (the format is simple: signature + IHDR + IDAT + IEND).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .fileio import atomic_write

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column)
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0),
    ".": (0, 0, 0, 0, 2), "e": (7, 5, 7, 4, 7), "#": (5, 7, 5, 7, 5), " ": (0, 0, 0, 0, 0),
    "Q": (7, 5, 5, 7, 1), "P": (7, 5, 7, 4, 4), "O": (7, 5, 5, 5, 7), ":": (0, 2, 0, 2, 0),
}
GREEN, RED, BLUE, WHITE, BLACK = (0, 150, 0), (200, 0, 0), (0, 0, 200), (255, 255, 255), (0, 0, 0)


def _text(canvas, x, y, s, scale, color):
    for ch in s:
        glyph = _FONT.get(ch, _FONT[" "])
        for r, bits in enumerate(glyph):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    canvas[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def tile_image(img, size):
    """Grayscale array -> size x size RGB (nearest-neighbour), dark ink on white."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].mean(-1)
    if a.ndim != 2:
        raise ValueError(f"image(item) must return a 2-D array, got shape {a.shape}")
    lo, hi = np.nanmin(a), np.nanmax(a)
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    ri = (np.arange(size) * a.shape[0] // size)
    ci = (np.arange(size) * a.shape[1] // size)
    g = (255 * (1 - a[np.ix_(ri, ci)])).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def render(rows, path, tile: int = 64, scale: int = 2) -> None:
    """rows: list of (row label, [(image, caption, colour)]) -> PNG at path (atomic)."""
    pad, cap_h = 6, 5 * scale + 4
    label_w = 4 * scale * 3 + pad
    ncol = max(len(items) for _, items in rows)
    w = label_w + ncol * (tile + pad) + pad
    h = pad + len(rows) * (tile + cap_h + pad)
    canvas = np.full((h, w, 3), 255, dtype=np.uint8)
    for r, (label, items) in enumerate(rows):
        y = pad + r * (tile + cap_h + pad)
        _text(canvas, 2, y + tile // 2, label, scale, BLACK)
        for c, (img, caption, color) in enumerate(items):
            x = label_w + c * (tile + pad)
            canvas[y - 2:y + tile + 2, x - 2:x + tile + 2] = color  # coloured frame
            canvas[y:y + tile, x:x + tile] = tile_image(img, tile)
            _text(canvas, x, y + tile + 3, caption[: tile // (4 * scale)], scale, color)
    write_png(canvas, path)


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array [h, w, 3] as the bytes of a PNG file (also used for inline images)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(rgb: np.ndarray, path) -> None:
    atomic_write(Path(path), encode_png(rgb))


def fmt_score(s: float) -> str:
    """At most 8 characters (the width of a 64-px tile): +12.345, +8.2e-3."""
    if s == 0 or 1e-2 <= abs(s) < 1e3:
        return f"{s:+.3f}"[:8]
    mant, exp = f"{s:+.1e}".split("e")
    return f"{mant}e{int(exp)}"

"""Small in-memory images for tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png(
    width: int = 64, height: int = 64, color: str | tuple[int, int, int] = (30, 120, 200), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else None).save(buffer, "PNG")
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48) -> bytes:
    """An RGB PNG with a gradient, so that a kept pixel is told apart from a repainted one."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    channels = [x + 0 * y, y + 0 * x, (x + y) / 2]
    buffer = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def mask(
    width: int = 64, height: int = 48, box: tuple[int, int, int, int] = (16, 16, 48, 32), alpha: bool = True
) -> bytes:
    """OpenAI's mask: opaque, transparent inside `box` (left, top, right, bottom); without alpha, an L image
    white inside it."""
    buffer = io.BytesIO()
    if alpha:
        image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
        image.paste((0, 0, 0, 0), box)
    else:
        image = Image.new("L", (width, height), 0)
        image.paste(255, box)
    image.save(buffer, "PNG")
    return buffer.getvalue()

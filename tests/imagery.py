"""Small in-memory images for tests."""

from __future__ import annotations

import io

from PIL import Image


def png(
    width: int = 64, height: int = 64, color: str | tuple[int, int, int] = (30, 120, 200), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else None).save(buffer, "PNG")
    return buffer.getvalue()

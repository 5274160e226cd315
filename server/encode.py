"""Raw RGB pixels -> PNG, JPEG, WebP, AVIF or GIF with Pillow; called in a thread, off the event loop."""

from __future__ import annotations

import io

from PIL import Image

from pipelines.messages import RenderedImage

CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
}
LOSSY = frozenset({"jpeg", "webp", "avif"})
DEFAULT_QUALITY = 90


def encode(image: RenderedImage, fmt: str, compression: int | None = None) -> bytes:
    """`compression` is the OpenAI 0-100 level for lossy formats (100 = best), Pillow's `quality`."""
    picture = Image.frombytes("RGB", (image.width, image.height), image.pixels)
    buffer = io.BytesIO()
    if fmt in LOSSY:
        picture.save(buffer, fmt.upper(), quality=DEFAULT_QUALITY if compression is None else compression)
    elif fmt == "gif":
        picture.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "GIF")
    else:
        picture.save(buffer, "PNG")
    return buffer.getvalue()

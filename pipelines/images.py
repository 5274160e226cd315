"""Decoding untrusted input images with Pillow. No torch: the HTTP front validates uploads with it too."""

from __future__ import annotations

import io
import math
import re
import warnings

from PIL import Image, ImageOps, ImageStat

from pipelines.errors import InvalidParameter
from pipelines.specs import MAX_REFERENCE_PIXELS

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # past this an upload is refused outright, not resized


def sniff_format(data: bytes) -> str | None:
    """The format from magic bytes: filenames and content types sent by clients cannot be trusted."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, param: str = "image") -> Image.Image:
    """Decode and fully load an RGB image, or raise InvalidParameter naming `param`."""
    if not data:
        raise InvalidParameter(param, f"'{param}' is an empty file.")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidParameter(param, f"'{param}' is not a PNG, JPEG or WebP image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InvalidParameter(
                    param,
                    f"'{param}' is {image.width}x{image.height}: images over {MAX_INPUT_PIXELS // 2**20} MP "
                    "are refused.",
                )
            image.load()
    except InvalidParameter:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParameter(param, f"'{param}' is too large to decode safely.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow names the buffer it read from ("<_io.BytesIO object at 0x...>"): nothing for a client.
        reason = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(exc)) or "truncated or corrupt"
        raise InvalidParameter(param, f"'{param}' could not be decoded ({fmt.lower()}): {reason}") from None
    return image.convert("RGB")


def fit_reference(
    image: Image.Image,
    min_side: int = 1,
    max_aspect: float = math.inf,
    max_pixels: int = MAX_REFERENCE_PIXELS,
) -> Image.Image:
    """A reference of any size brought into what the pipeline takes (its sides and ratio), never refused.

    In order: an image more elongated than `max_aspect` is padded, centred, on its short side up to that
    ratio with its own mean colour (padding, not cropping: nothing the client sent is cut away, and the
    model is given a plain border rather than half a subject); one whose short side is under `min_side` is
    scaled up to it, aspect kept; one over `max_pixels` is scaled down to it, aspect kept (the hosted
    gateways resize references over 4 MP to 4 MP). An image that needs none of this comes back as it is.
    """
    width, height = image.size
    if max(width, height) > max_aspect * min(width, height):
        padding = math.ceil(max(width, height) / max_aspect) - min(width, height)
        before, after = padding // 2, padding - padding // 2
        border = (0, before, 0, after) if width > height else (before, 0, after, 0)
        fill = tuple(round(channel) for channel in ImageStat.Stat(image).mean)
        image = ImageOps.expand(image, border, fill)
    if min(image.size) < min_side:
        scale = min_side / min(image.size)
        size = (max(min_side, round(image.width * scale)), max(min_side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = (max_pixels / pixels) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)

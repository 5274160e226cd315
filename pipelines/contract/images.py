"""Decoding untrusted input images with Pillow. No torch: the HTTP front validates uploads with it too."""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import ExifTags, Image, ImageOps, ImageStat

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.specs import MAX_REFERENCE_PIXELS

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
WITH_GIF = {**ACCEPTED_FORMATS, "GIF": "gif"}  # image_prompt's formats: its first frame is what is read
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # past this an upload is refused outright, not resized
MAX_REQUEST_PIXELS = MAX_INPUT_PIXELS  # all the images of one request together


def sniff_format(data: bytes) -> str | None:
    """The format from magic bytes: filenames and content types sent by clients cannot be trusted."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def format_names(accepted: dict[str, str]) -> str:
    """'PNG, JPEG or WebP', as messages name the formats a parameter takes."""
    names = [{"WEBP": "WebP"}.get(fmt, fmt) for fmt in accepted]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _open(data: bytes, param: str, accepted: dict[str, str] = ACCEPTED_FORMATS) -> Image.Image:
    """Read the header only: the format from the bytes, the size, and the pixel-bomb bound."""
    if not data:
        raise InvalidParameter(param, f"'{param}' is an empty file.")
    fmt = sniff_format(data)
    if fmt not in accepted:
        raise InvalidParameter(param, f"'{param}' is not a {format_names(accepted)} image.")
    with _decode_errors(param, fmt), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=[fmt])
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise InvalidParameter(
            param,
            f"'{param}' is {image.width}x{image.height}: "
            f"images over {MAX_INPUT_PIXELS // 2**20} MP are refused.",
        )
    return image


@contextmanager
def _decode_errors(param: str, fmt: str) -> Iterator[None]:
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParameter(param, f"'{param}' is too large to decode safely.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow names the buffer it read from ("<_io.BytesIO object at 0x...>"): nothing for a client.
        reason = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(exc)) or "truncated or corrupt"
        raise InvalidParameter(param, f"'{param}' could not be decoded ({fmt.lower()}): {reason}") from None


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """The size once EXIF orientation is applied: orientations 5-8 turn the picture a quarter."""
    width, height = image.size
    return (
        (height, width)
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        else (width, height)
    )


def reference_sizes(
    images: list[bytes], param: str = "image", accepted: dict[str, str] = ACCEPTED_FORMATS
) -> list[tuple[int, int]]:
    """Each image's upright size, for the HTTP front: every header is read and the whole request held to one
    pixel budget before anything is decoded; then each image is decoded once, one at a time and in its own
    mode, only to refuse corrupt bytes before the request is queued (the worker decodes for the model)."""
    opened = [_open(data, param, accepted) for data in images]
    total = sum(image.width * image.height for image in opened)
    if total > MAX_REQUEST_PIXELS:
        raise InvalidParameter(
            param,
            f"The images of one request hold {total / 2**20:.0f} MP; "
            f"at most {MAX_REQUEST_PIXELS // 2**20} MP in all are accepted.",
        )
    sizes = []
    for image in opened:
        with image, _decode_errors(param, image.format or "image"):
            image.load()
            sizes.append(_upright_size(image))
    return sizes


def decode_image(
    data: bytes, param: str = "image", accepted: dict[str, str] = ACCEPTED_FORMATS
) -> Image.Image:
    """Decode an upright RGB image (EXIF orientation applied), or raise InvalidParameter naming `param`."""
    image = _open(data, param, accepted)
    with _decode_errors(param, image.format or "image"):
        image.load()
    upright = ImageOps.exif_transpose(image)
    return upright if upright.mode == "RGB" else upright.convert("RGB")


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

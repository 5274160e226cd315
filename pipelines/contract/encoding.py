"""Pixels -> PNG, JPEG, WebP, AVIF or GIF with Pillow, where the pixels are: the worker process and the Ray
engine replica encode each image in the format its request asked for, and the HTTP front only forwards the
bytes (one front serves every GPU behind it, so its CPU per image is the whole cluster's ceiling).

Torch-free: the front imports the format table and sends the request's choice along with it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from pipelines.contract.messages import Failure, Progress, RenderedImage, RenderRequest, RenderResult
from pipelines.contract.wire import Message

logger = logging.getLogger(__name__)

CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
}
RAW_RGB = "application/x-fluxd-rgb"  # height x width x 3 uint8, inside the worker until it is encoded
LOSSY = frozenset({"jpeg", "webp", "avif"})
DEFAULT_QUALITY = 90
# zlib's fastest level, chosen by `fluxd bench front`'s PNG table (README: "PNG: speed against size"):
# 5-6x faster than Pillow's default 6 for files about 17% larger. PNG stays lossless at every level.
PNG_COMPRESS_LEVEL = 1

Format = tuple[str, int | None]  # output_format, output_compression
Send = Callable[[Message], None]


def encode(pixels: bytes, width: int, height: int, fmt: str, compression: int | None = None) -> bytes:
    """`compression` is the OpenAI 0-100 level for lossy formats (100 = best), Pillow's `quality`."""
    picture = Image.frombytes("RGB", (width, height), pixels)
    buffer = io.BytesIO()
    if fmt in LOSSY:
        picture.save(buffer, fmt.upper(), quality=DEFAULT_QUALITY if compression is None else compression)
    elif fmt == "gif":
        picture.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "GIF")
    else:
        picture.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encoded(image: RenderedImage, fmt: Format) -> RenderedImage:
    """The image in `fmt`; one already encoded stays as it is."""
    if image.content_type != RAW_RGB:
        return image
    data = encode(image.data, image.width, image.height, *fmt)
    return dataclasses.replace(image, data=data, content_type=CONTENT_TYPES[fmt[0]])


def with_encoded_images(message: Message, formats: Mapping[str, Format]) -> Message:
    """A worker's message with each of its images (a result's, a preview) in its request's format."""
    if isinstance(message, RenderResult):
        fmt = formats[message.id]
        return dataclasses.replace(message, images=[encoded(image, fmt) for image in message.images])
    if isinstance(message, Progress) and message.preview is not None:
        return dataclasses.replace(message, preview=encoded(message.preview, formats[message.id]))
    return message


class Encoder:
    """One thread that encodes a worker's images and sends its messages in the order they were given: the
    loop that renders goes on (the next preview's steps, the next batch) while the last images encode."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fluxd-encode")

    def sender(self, batch: list[RenderRequest]) -> Send:
        """What a batch's messages are sent with: each is encoded and sent from the thread."""
        formats = {request.id: (request.output_format, request.output_compression) for request in batch}
        return lambda message: self.then(lambda: self._deliver(message, formats))

    def then(self, action: Callable[[], object]) -> None:
        """Run `action` on the thread once everything given before it is sent."""
        self._thread.submit(self._logged, action)

    def close(self, wait: bool = True) -> None:
        """No more messages; what was given is still sent (before this returns, with `wait`)."""
        self._thread.shutdown(wait=wait)

    def _deliver(self, message: Message, formats: Mapping[str, Format]) -> None:
        try:
            message = with_encoded_images(message, formats)
        except Exception:  # every request still gets its one answer
            logger.exception("encoding the images of %s failed", getattr(message, "id", message))
            if isinstance(message, RenderResult):
                message = Failure([message.id], "server_error", "The server failed to encode the image.")
            else:
                return  # a preview: the final image follows
        self._send(message)

    @staticmethod
    def _logged(action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            # A sender whose other end is gone: the loop finds out on its own next send, or its parent's exit.
            logger.exception("sending from the encoder thread failed")

"""Untrusted uploads: format from magic bytes, bombs, truncation, empties and text are InvalidParameter."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.errors import InvalidParameter
from pipelines.images import decode_image, limit_reference, sniff_format


def encode(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    data = encode(fmt)
    assert sniff_format(data) == fmt
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_rgba_and_palette_pngs_become_rgb() -> None:
    assert decode_image(encode("PNG", mode="RGBA")).mode == "RGB"
    assert decode_image(encode("PNG", mode="P")).mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, not an image",
        encode("GIF"),
        encode("BMP"),
        encode("PNG")[:60],
        encode("JPEG")[:50],
    ],
    ids=["empty", "text", "gif", "bmp", "truncated-png", "truncated-jpeg"],
)
def test_refused_uploads_name_the_parameter(data: bytes) -> None:
    with pytest.raises(InvalidParameter) as info:
        decode_image(data, "image")
    assert info.value.param == "image"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A 1-bit PNG of 20000x20000 is small on disk and 400 MP when decoded.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    with pytest.raises(InvalidParameter) as info:
        decode_image(buffer.getvalue(), "image")
    assert info.value.param == "image"


def test_references_over_4mp_are_resized_to_4mp() -> None:
    image = Image.new("RGB", (4000, 2000))
    resized = limit_reference(image)
    assert resized.width * resized.height <= 4 * 1024 * 1024
    assert abs(resized.width / resized.height - 2) < 0.01
    small = Image.new("RGB", (100, 100))
    assert limit_reference(small) is small

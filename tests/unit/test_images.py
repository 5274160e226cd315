"""Untrusted uploads: format from magic bytes, bombs, truncation, empties and text are InvalidParameter."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.images import decode_image, fit_reference, sniff_format


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
    resized = fit_reference(image)
    assert resized.width * resized.height <= 4 * 1024 * 1024
    assert abs(resized.width / resized.height - 2) < 0.01
    small = Image.new("RGB", (100, 100))
    assert fit_reference(small, 64, 8.0) is small


# FLUX.2's limits (diffusers' Flux2ImageProcessor.check_image_input): >= 64 px a side, at most 8:1.
@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((40, 40), (64, 64)),  # scaled up, aspect kept
        ((80, 48), (107, 64)),
        ((48, 300), (64, 400)),
        ((48, 500), (64, 508)),  # padded to 63x500 (7.9:1), then scaled up
        ((900, 60), (900, 113)),  # 15:1, padded to 8:1 (900 / 113 = 7.96)
        ((60, 900), (113, 900)),
        ((1000, 4), (1000, 125)),
        ((100, 5), (492, 64)),  # padded to 100x13, then scaled up
        ((512, 64), (512, 64)),  # already within: untouched
    ],
)
def test_references_are_fitted_into_the_pipelines_range(
    size: tuple[int, int], fitted: tuple[int, int]
) -> None:
    result = fit_reference(Image.new("RGB", size, (200, 40, 40)), 64, 8.0)
    assert result.size == fitted
    assert min(result.size) >= 64 and max(result.size) / min(result.size) <= 8.0


def test_an_elongated_reference_is_padded_not_cropped() -> None:
    image = Image.new("RGB", (900, 60), (10, 10, 10))
    image.paste((250, 250, 250), (0, 0, 900, 30))  # top half light, bottom half dark
    fitted = fit_reference(image, 64, 8.0)
    assert fitted.size == (900, 113)
    # The whole image, centred between two borders of its mean colour.
    assert fitted.crop((0, 26, 900, 86)).tobytes() == image.tobytes()
    mean = (130, 130, 130)
    assert fitted.getpixel((0, 0)) == mean and fitted.getpixel((899, 112)) == mean

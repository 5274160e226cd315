"""Inpainting masks: reading one as OpenAI and the diffusers pipelines do, and putting the kept pixels back.

No torch: the HTTP front refuses a bad mask with it before the request queues, and the worker composites
with it after decoding, so that what the client kept never goes through the VAE.

Readings. A mask with an alpha channel is OpenAI's: "fully transparent areas (e.g. where alpha is zero)
indicate where image should be edited" (OpenAI Images API reference, `mask`). A mask without one (L, RGB,
1-bit) is read as fal, replicate and diffusers' inpainting pipelines read it: white is edited, black kept.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.images import _decode_errors, _open

PARAM = "mask"
FEATHER_PX = 3  # the blur radius, in output pixels, with which an edit fades in at the mask's border


def edit_weights(data: bytes) -> np.ndarray:
    """The mask as floats in [0, 1] (height x width), 1 where the image is to be edited."""
    image = _open(data, PARAM)
    with image, _decode_errors(PARAM, image.format or "image"):
        image.load()
        upright = ImageOps.exif_transpose(image)
    has_alpha = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
    if has_alpha:
        alpha = np.asarray(upright.convert("RGBA").getchannel("A"), dtype=np.float32)
        return 1.0 - alpha / 255.0
    return np.asarray(upright.convert("L"), dtype=np.float32) / 255.0


def check_mask(data: bytes, size: tuple[int, int]) -> None:
    """Refuse, naming `mask`, a mask that cannot be read, is not `size` (width, height: the first image's
    upright size) or marks nothing to edit. The header's size is compared before any pixel is decoded (either
    way round: EXIF may turn the mask a quarter), since the mask is outside the request's pixel budget."""
    with _open(data, PARAM) as header:
        stored = header.size
    if stored not in (size, size[::-1]):
        _wrong_size(stored, size)
    weights = edit_weights(data)
    if weights.shape[::-1] != size:
        _wrong_size(weights.shape[::-1], size)
    if not weights.any():
        raise InvalidParameter(
            PARAM,
            "'mask' marks nothing to edit: transparent pixels (or, in a mask without alpha, white ones) "
            "are edited.",
        )


def _wrong_size(found: tuple[int, ...], size: tuple[int, int]) -> NoReturn:
    raise InvalidParameter(
        PARAM, f"'mask' is {found[0]}x{found[1]}; it must have the first image's size, {size[0]}x{size[1]}."
    )


def mask_image(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The mask as an L image of `size` (width, height) for the pipelines: white (255) is edited."""
    weights = Image.fromarray(np.round(edit_weights(data) * 255).astype(np.uint8), "L")
    return weights if weights.size == size else weights.resize(size, Image.Resampling.BILINEAR)


def composite(original: np.ndarray, rendered: np.ndarray, mask: Image.Image) -> np.ndarray:
    """`rendered` where `mask` edits, `original` elsewhere (both height x width x 3 uint8), the edit fading in
    over FEATHER_PX inside the mask's border. The weight is the mask times its own blur: zero wherever the
    mask is, so every kept pixel is the original's, byte for byte."""
    soft = np.asarray(mask, dtype=np.float32) / 255.0
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(FEATHER_PX)), dtype=np.float32) / 255.0
    weight = (soft * blurred)[..., None]
    kept = original.astype(np.float32)
    mixed = kept + weight * (rendered.astype(np.float32) - kept)
    return np.round(mixed).clip(0, 255).astype(np.uint8)

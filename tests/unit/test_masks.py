"""Masks as the front reads them (OpenAI's alpha reading, fal's white-is-edit one), the 400s naming `mask`,
the kept pixels of a composite, and the request fields a mask brings."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.contract.arguments import PASSTHROUGH
from pipelines.contract.errors import InvalidParameter
from pipelines.contract.masks import FEATHER_PX, check_mask, composite, edit_weights, mask_image
from pipelines.contract.specs import SPECS
from server.declarations.protocol import ImageEditRequest
from server.dispatch.scheduler import batch_key
from server.front.normalize import build_request
from tests.imagery import mask, photo, png


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_transparent_pixels_are_edited_in_a_mask_with_alpha() -> None:
    weights = edit_weights(mask(64, 48, box=(16, 16, 48, 32)))
    assert weights[20, 20] == 1 and weights[0, 0] == 0 and weights.sum() == 32 * 16


@pytest.mark.parametrize("mode", ["L", "RGB", "1"])
def test_white_pixels_are_edited_in_a_mask_without_alpha(mode: str) -> None:
    image = Image.new("L", (64, 48), 0)
    image.paste(255, (0, 0, 8, 8))
    weights = edit_weights(encoded(image.convert(mode)))
    assert weights[4, 4] == 1 and weights[20, 20] == 0 and weights.sum() == 64


def test_a_palette_mask_with_a_transparent_index_is_read_by_its_alpha() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 255, 255, 0, 0, 0])
    image.paste(1, (0, 0, 4, 8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=1)
    weights = edit_weights(buffer.getvalue())
    assert weights[:, :4].min() == 1 and weights[:, 4:].max() == 0


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (mask(32, 48), "must have the first image's size, 64x48"),
        (b"not an image", "is not a PNG, JPEG or WebP"),
        (png(64, 48)[:60], "could not be decoded"),
        (encoded(Image.new("RGBA", (64, 48), (0, 0, 0, 255))), "marks nothing to edit"),
        (encoded(Image.new("L", (64, 48), 0)), "marks nothing to edit"),
    ],
)
def test_a_bad_mask_is_refused_naming_mask(data: bytes, words: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        check_mask(data, (64, 48))
    assert info.value.param == "mask" and words in info.value.message


def test_the_composite_keeps_every_unmasked_pixel_and_feathers_inside_the_mask() -> None:
    original = np.asarray(Image.open(io.BytesIO(photo(64, 48))).convert("RGB"))
    rendered = np.full_like(original, 255)
    edit = mask_image(mask(64, 48, box=(16, 16, 48, 32)), (64, 48))
    out = composite(original, rendered, edit).astype(int)
    kept = edit_weights(mask(64, 48, box=(16, 16, 48, 32))) == 0
    assert np.array_equal(out[kept], original[kept].astype(int))
    assert (out[24, 32] == 255).all()  # deep inside: the render
    border = out[16, 32] - original[16, 32]  # on the border: part way
    assert (border > 0).all() and (out[16, 32] < 255).any()
    assert FEATHER_PX < 8


def edit_request(model: str, **fields: object) -> ImageEditRequest:
    return ImageEditRequest.model_validate({"prompt": "a hat", "model": model, **fields})


def test_a_mask_gives_the_first_images_own_size_and_strength_1() -> None:
    spec = SPECS["flux.1-dev"]
    body = edit_request(spec.id, mask=mask(80, 48, box=(0, 0, 8, 8)))
    render, _ = build_request(body, spec, PASSTHROUGH[spec.pipeline_class], [photo(80, 48)], (80, 48))
    assert (render.width, render.height, render.strength) == (80, 48, 1.0)
    assert render.mask == body.mask


def test_strength_without_a_mask_is_a_400() -> None:
    spec = SPECS["flux.2-dev"]
    with pytest.raises(InvalidParameter) as info:
        build_request(
            edit_request(spec.id, strength="0.5"), spec, PASSTHROUGH[spec.pipeline_class], [photo()], (64, 48)
        )
    assert info.value.param == "strength"


def test_a_strength_that_runs_no_step_is_a_400() -> None:
    spec = SPECS["flux.2-dev"]
    body = edit_request(spec.id, mask=mask(), strength="0.05", num_inference_steps="4")
    with pytest.raises(InvalidParameter) as info:
        build_request(body, spec, PASSTHROUGH[spec.pipeline_class], [photo()], (64, 48))
    assert info.value.param == "strength"


def test_flux1_dev_edits_only_with_a_mask() -> None:
    spec = SPECS["flux.1-dev"]
    spec.check_references(1, masked=True)
    with pytest.raises(InvalidParameter, match="send a mask to inpaint"):
        spec.check_references(1)
    with pytest.raises(InvalidParameter):
        spec.check_references(2, masked=True)


def test_masked_requests_batch_apart_from_plain_ones_and_by_strength() -> None:
    spec = SPECS["flux.2-dev"]
    passthrough = PASSTHROUGH[spec.pipeline_class]

    def key(**fields: object) -> tuple:
        render, _ = build_request(
            edit_request(spec.id, seed="1", **fields), spec, passthrough, [photo()], (64, 48)
        )
        return batch_key(render)

    assert key(mask=mask()) == key(mask=mask(box=(0, 0, 8, 8)))  # each keeps its own mask
    assert key(mask=mask()) != key()
    assert key(mask=mask()) != key(mask=mask(), strength="0.5")


def test_a_mask_of_another_size_is_refused_from_its_header_before_decoding() -> None:
    truncated = encoded(Image.new("L", (4000, 3000), 255))[:200]  # the header holds, the pixels do not
    with pytest.raises(InvalidParameter, match="is 4000x3000; it must have the first image's size"):
        check_mask(truncated, (64, 48))

"""The seeds' size rules, table-driven: every row of their 1K tables, the 7:1 example, precedence, limits."""

from __future__ import annotations

import pytest

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.sizes import fit, resolve_size, snap
from pipelines.contract.specs import SIZES_1K_KONTEXT, SPECS

FLUX2 = SPECS["flux.2-dev"]
KONTEXT = SPECS["flux.1-kontext-dev"]


def snapped(size: tuple[int, int]) -> tuple[int, int]:
    return snap(size[0]), snap(size[1])


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.2-dev-turbo", "flux1.1-pro"])
def test_nine_sizes_of_the_seed_tables(model: str) -> None:
    spec = SPECS[model]
    assert len(spec.sizes_1k) == 9
    for ratio, size in spec.sizes_1k.items():
        expected = snapped(size)
        assert resolve_size(spec, aspect_ratio=ratio) == expected
        assert resolve_size(spec, aspect_ratio=ratio, resolution="1K") == expected
        assert resolve_size(spec, size=ratio) == expected  # "W:H" in size means aspect_ratio
        assert resolve_size(spec, size=f"{size[0]}x{size[1]}") == expected


def test_kontext_has_eleven_sizes_with_21_9() -> None:
    assert len(KONTEXT.sizes_1k) == 11
    assert resolve_size(KONTEXT, aspect_ratio="21:9") == snapped(SIZES_1K_KONTEXT["21:9"]) == (1568, 672)
    assert resolve_size(KONTEXT, aspect_ratio="9:21") == (672, 1568)
    assert "21:9" not in FLUX2.sizes_1k


def test_any_ratio_maps_to_the_nearest_supported_one() -> None:
    # The seeds' example, "7:1 on a model with 4:1 and 8:1 gives 8:1", on a model that has those two.
    spec = FLUX2.with_overrides(sizes_1k={"4:1": (2048, 512), "8:1": (2048, 256), "1:1": (1024, 1024)})
    assert resolve_size(spec, aspect_ratio="7:1") == (2048, 256)
    assert resolve_size(FLUX2, aspect_ratio="17:9") == resolve_size(FLUX2, aspect_ratio="16:9")
    assert resolve_size(FLUX2, aspect_ratio="1:100") == resolve_size(FLUX2, aspect_ratio="9:16")
    assert resolve_size(KONTEXT, aspect_ratio="7:3") == resolve_size(KONTEXT, aspect_ratio="21:9")


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [
        ("1K", (1024, 1024)),
        ("0.5K", (512, 512)),
        ("2K", (2048, 2048)),
        ("4K", (2048, 2048)),
        ("1", (1024, 1024)),
        ("0.25", (512, 512)),
        ("4MP", (2048, 2048)),
        ("0.3K", (512, 512)),
        ("auto", (1024, 1024)),
    ],
)
def test_resolution_tiers_take_the_nearest_available(resolution: str, expected: tuple[int, int]) -> None:
    assert resolve_size(FLUX2, aspect_ratio="1:1", resolution=resolution) == expected


def test_resolution_keeps_the_ratio_shape_and_respects_the_model_tiers() -> None:
    assert resolve_size(FLUX2, aspect_ratio="16:9", resolution="0.5K") == (688, 384)
    assert resolve_size(FLUX2, resolution="2K") == (2048, 2048)
    # FLUX.1 [dev] stops at 1440 px: 2K is not one of its tiers, so the nearest (1K) is used.
    assert "2K" not in SPECS["flux.1-dev"].tiers
    assert resolve_size(SPECS["flux.1-dev"], aspect_ratio="1:1", resolution="2K") == (1024, 1024)


def test_size_wins_over_aspect_ratio_and_resolution() -> None:
    assert resolve_size(FLUX2, size="640x480", aspect_ratio="9:16", resolution="2K") == (640, 480)


def test_pixels_are_snapped_to_16() -> None:
    assert resolve_size(FLUX2, size="1000x1000") == (1008, 1008)
    assert resolve_size(FLUX2, size="1x1") == (16, 16)
    assert resolve_size(FLUX2, size=" 1920 X 1080 ") == (1920, 1088)


def test_oversized_requests_are_scaled_down_keeping_aspect() -> None:
    assert resolve_size(FLUX2, size="14142x14142") == (2048, 2048)
    width, height = resolve_size(FLUX2, size="4000x1000")
    assert width <= 2048 and width * height <= 2048 * 2048 and abs(width / height - 4) < 0.1
    assert resolve_size(SPECS["flux.1-dev"], size="2880x1440") == (1440, 720)
    assert fit(5000, 5000, KONTEXT)[0] * fit(5000, 5000, KONTEXT)[1] <= KONTEXT.limits.max_pixels


def test_auto() -> None:
    assert resolve_size(FLUX2) == resolve_size(FLUX2, size="auto") == (1024, 1024)
    demo = FLUX2.with_overrides(default_size=(256, 256))
    assert resolve_size(demo, size=None) == (256, 256)
    # Edits follow their first input: the nearest table size, or the input's own size (snapped).
    assert resolve_size(FLUX2, size="auto", input_size=(1600, 900)) == (1360, 768)
    assert resolve_size(FLUX2, size="auto", input_size=(1600, 900), resolution="0.5K") == (688, 384)
    assert resolve_size(FLUX2, input_size=(1000, 700), resolution_mode="match_input") == (1008, 704)
    assert resolve_size(FLUX2, input_size=(5000, 5000), resolution_mode="match_input") == (2048, 2048)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "big"}, "size"),
        ({"size": "0x512"}, "size"),
        ({"size": "14143x512"}, "size"),
        ({"size": "-5x5"}, "size"),
        ({"size": "512x"}, "size"),
        ({"size": "0:9"}, "size"),
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"aspect_ratio": "16:0"}, "aspect_ratio"),
        ({"aspect_ratio": "1000:1"}, "aspect_ratio"),
        ({"resolution": "huge"}, "resolution"),
        ({"resolution": "0K"}, "resolution"),
        ({"resolution": "-1"}, "resolution"),
    ],
)
def test_garbage_names_its_parameter(fields: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        resolve_size(FLUX2, **fields)
    assert info.value.param == param

"""The Lumenfall model pages' size rules as pure functions:
(size, aspect_ratio, resolution, input size) -> (width, height).

- `size` "WxH" is exact pixels (snapped, scaled down to the model's limit); "W:H" means `aspect_ratio`.
- `aspect_ratio` picks the nearest ratio of the model's 1K table; `resolution` the nearest available tier.
- `size` always wins over `aspect_ratio` + `resolution`.
- `size` "auto": text-to-image takes the model's default; an edit follows its first input image.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.specs import MAX_INPUT_SIDE, SIZE_MULTIPLE, ModelSpec

ResolutionMode = Literal["auto", "match_input"]

# Numbers are bounded in digits before they are converted: Python refuses ints past 4300 digits and a long
# decimal becomes an infinite float.
_NUMBER = r"(\d{1,6}(?:\.\d{1,6})?)"
_PIXELS = re.compile(r"^\s*(\d{1,9})\s*[xX×]\s*(\d{1,9})\s*$")
_RATIO = re.compile(rf"^\s*{_NUMBER}\s*:\s*{_NUMBER}\s*$")
_TIER = re.compile(rf"^\s*{_NUMBER}\s*([kK]|[mM][pP])?\s*$")


def _shown(value: str) -> str:
    """A value echoed in an error, cut short: a 400 must not carry a megabyte back."""
    return value if len(value) <= 40 else f"{value[:37]}..."


def snap(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def fit(width: float, height: float, spec: ModelSpec) -> tuple[int, int]:
    """Snap to the model's multiple; scale down, aspect kept, where the model's limit is exceeded."""
    scale = min(
        1.0,
        spec.limits.max_side / max(width, height),
        math.sqrt(spec.limits.max_pixels / (width * height)),
    )
    if scale < 1.0:
        return _floor_multiple(width * scale), _floor_multiple(height * scale)
    return snap(width), snap(height)


def _floor_multiple(value: float) -> int:
    """Floor, not round, so a scaled-down size never lands above the limit again (with float slack)."""
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 1e-9) * SIZE_MULTIPLE)


def parse_pixels(value: str, param: str = "size") -> tuple[int, int] | None:
    match = _PIXELS.match(value)
    if not match:
        return None
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_INPUT_SIDE and 1 <= height <= MAX_INPUT_SIDE):
        raise InvalidParameter(
            param, f"Each side of '{param}' must be between 1 and {MAX_INPUT_SIDE} pixels."
        )
    return width, height


def parse_ratio(value: str, param: str = "aspect_ratio") -> float:
    match = _RATIO.match(value)
    if not match or float(match[1]) <= 0 or float(match[2]) <= 0:
        raise InvalidParameter(
            param, f"Invalid {param} '{_shown(value)}': expected 'W:H' with positive numbers, e.g. '16:9'."
        )
    ratio = float(match[1]) / float(match[2])
    if not (1 / 100 <= ratio <= 100):
        raise InvalidParameter(
            param, f"{param} '{_shown(value)}' is too extreme: ratios from 1:100 to 100:1 are accepted."
        )
    return ratio


def nearest_ratio(ratio: float, spec: ModelSpec) -> str:
    """The model's supported ratio closest to `ratio` on a log scale, so 2:1 and 1:2 are treated alike."""
    return min(spec.sizes_1k, key=lambda name: abs(math.log(_ratio_value(spec.sizes_1k[name]) / ratio)))


def _ratio_value(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def parse_tier(value: str, spec: ModelSpec) -> float:
    """A tier name ("1K", "0.5K") or a megapixel count ("1", "0.25", "4MP") -> the nearest available scale."""
    match = _TIER.match(value)
    if not match or float(match[1]) <= 0:
        raise InvalidParameter(
            "resolution",
            f"Invalid resolution '{_shown(value)}': expected a tier such as {', '.join(spec.tiers)} "
            "or megapixels such as 1.",
        )
    number, unit = float(match[1]), (match[2] or "").lower()
    wanted = number if unit == "k" else math.sqrt(number)
    return min(spec.tiers.values(), key=lambda scale: abs(math.log(scale / wanted)))


def resolve_size(
    spec: ModelSpec,
    *,
    size: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    input_size: tuple[int, int] | None = None,
    resolution_mode: ResolutionMode = "auto",
) -> tuple[int, int]:
    """The exact (width, height) a request will be generated at.

    Every given field is validated even when precedence makes it moot: garbage is never silently ignored.
    """
    ratio = None if _is_auto(aspect_ratio) else parse_ratio(aspect_ratio or "", "aspect_ratio")
    scale = 1.0 if _is_auto(resolution) else parse_tier(resolution or "", spec)
    if not _is_auto(size):
        assert size is not None
        pixels = parse_pixels(size)
        if pixels is not None:
            return fit(*pixels, spec)
        if not _RATIO.match(size):
            raise InvalidParameter("size", f"Invalid size '{_shown(size)}': expected 'auto', 'WxH' or 'W:H'.")
        ratio = parse_ratio(size, "size")

    if ratio is not None:
        width, height = spec.sizes_1k[nearest_ratio(ratio, spec)]
    elif input_size is not None:
        if resolution_mode == "match_input":
            return fit(*input_size, spec)
        width, height = spec.sizes_1k[nearest_ratio(_ratio_value(input_size), spec)]
    elif not _is_auto(resolution):
        width, height = spec.sizes_1k["1:1"]
    else:
        return spec.default_size
    return fit(width * scale, height * scale, spec)


def _is_auto(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("", "auto")

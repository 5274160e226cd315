"""Image prompts (`image_prompt`, FLUX.1 Redux): where their weights live, and reading one sent as a
`data:` URI.

No torch: the HTTP front refuses a bad image prompt, or one the server has no Redux weights for, before the
request queues. The worker runs diffusers' FluxPriorReduxPipeline (pipelines/engine/image_prompts.py).
"""

from __future__ import annotations

import base64
import binascii
import re

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.images import WITH_GIF, format_names, reference_sizes

PARAM = "image_prompt"
FOLDER = "redux"  # under the weights folder, as `fluxd weights pull redux` writes it
REPO_ID = "black-forest-labs/FLUX.1-Redux-dev"
PULL = "fluxd weights pull redux"
NOT_PULLED = (
    f"'{PARAM}' needs the FLUX.1 Redux weights ({REPO_ID}), which this server does not have: "
    f"run `{PULL}` where it serves."
)

_DATA_URI = re.compile(
    r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL
)
# Lumenfall's FLUX1.1 [pro] page (replicate): "Must be jpeg, png, gif, or webp".
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
FORMATS = WITH_GIF


def data_uri_bytes(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI of a PNG, JPEG, WebP or GIF image, or a 400 naming `image_prompt`."""
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise InvalidParameter(PARAM, f"'{PARAM}' must be a base64 data: URI (data:image/png;base64,...).")
    media_type = (match["type"] or "").lower()
    if media_type not in _IMAGE_TYPES:
        raise InvalidParameter(
            PARAM,
            f"'{PARAM}' is a data: URI of '{media_type or 'no type'}'; a {format_names(FORMATS)} is taken.",
        )
    encoded = re.sub(r"\s+", "", match["data"])
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(PARAM, f"'{PARAM}' is not valid base64.") from None


def check_image_prompt(data: bytes) -> None:
    """Refuse, naming `image_prompt`, bytes that are not a PNG, JPEG, WebP or GIF within the pixel bound, or
    that do not decode (the hostile-input-safe reading of pipelines.contract.images)."""
    reference_sizes([data], PARAM, FORMATS)

"""Where a request's `image_prompt` comes from: the one function that turns its value into checked image
bytes.

A value is a base64 `data:` URI, or the URL of an image this server stored for a `response_format=url` answer
(`<base>/v1/files/images/<id>.<ext>`, read from the store, never over HTTP). Any other http(s) URL would be
fetched from elsewhere, which only URLs under `--fetch-allow` may be. Runs in a thread: it reads files and
decodes the image.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import PARAM, check_image_prompt, data_uri_bytes
from server.front.store import ImageStore

FILES_PATH = "/v1/files/images/"
_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-]{32})(\.(?P<ext>[a-z]+))?")


def resolve_image_prompt(value: str, store: ImageStore, base: str | None) -> bytes:
    """The image `value` names, checked (a PNG, JPEG or WebP that decodes within the pixel bound), or a 400
    naming `image_prompt`. `base` is the address this server answers the request under (public_base)."""
    if value.startswith("data:"):
        data = data_uri_bytes(value)
    elif urlsplit(value).scheme.lower() in ("http", "https"):
        data = _stored(value, store, base)
    else:
        raise InvalidParameter(
            PARAM, f"'{PARAM}' must be a data: URI (data:image/png;base64,...) or an http(s) URL."
        )
    check_image_prompt(data)
    return data


def _stored(url: str, store: ImageStore, base: str | None) -> bytes:
    parts, own = urlsplit(url), urlsplit(base or "")
    prefix = own.path.rstrip("/") + FILES_PATH
    same_origin = (parts.scheme.lower(), parts.netloc.lower()) == (own.scheme.lower(), own.netloc.lower())
    if base is None or not same_origin or not parts.path.startswith(prefix) or parts.query or parts.fragment:
        # The URL itself is not repeated: it may carry credentials.
        raise InvalidParameter(
            PARAM,
            f"'{PARAM}' is a URL of another server, and this one fetches only URLs under its --fetch-allow "
            "prefixes (none match): send the image as a data: URI, or a URL this server gave.",
        )
    name = _NAME.fullmatch(parts.path[len(prefix) :])
    stored = None if name is None else store.get(name["id"])
    if name is None or stored is None or name["ext"] not in (None, stored.extension):
        raise InvalidParameter(PARAM, f"'{PARAM}' names no image of this server, or one that has expired.")
    try:
        return stored.path.read_bytes()
    except OSError:
        raise InvalidParameter(PARAM, f"'{PARAM}' names an image this server can no longer read.") from None

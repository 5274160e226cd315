"""Where a request's `image_prompt` comes from: the one function that turns its value into checked image
bytes.

A value is a base64 `data:` URI, or the URL of an image this server stored for a `response_format=url` answer
(`<base>/v1/files/images/<id>.<ext>`, read from the store, never over HTTP). Any other http(s) URL is fetched
only when it is under `--fetch-allow` (server/front/remote_inputs.py), up to the size of a request body. Runs
in a thread: it reads files, may fetch, and decodes the image.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import PARAM, check_image_prompt, data_uri_bytes
from server.declarations.settings import Settings
from server.front.remote_inputs import fetch_allowed
from server.front.store import ImageStore

FILES_PATH = "/v1/files/images/"
_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-]{32})(\.(?P<ext>[a-z]+))?")


def resolve_image_prompt(value: str, store: ImageStore, base: str | None, settings: Settings) -> bytes:
    """The image `value` names, checked (a PNG, JPEG, WebP or GIF that decodes within the pixel bound), or a
    400 naming `image_prompt`. `base` is the address this server answers the request under (public_base)."""
    if value.startswith("data:"):
        data = data_uri_bytes(value)
    elif urlsplit(value).scheme.lower() in ("http", "https"):
        data = _stored(value, store, base, settings)
    else:
        raise InvalidParameter(
            PARAM, f"'{PARAM}' must be a data: URI (data:image/png;base64,...) or an http(s) URL."
        )
    check_image_prompt(data)
    return data


def _stored(url: str, store: ImageStore, base: str | None, settings: Settings) -> bytes:
    parts, own = urlsplit(url), urlsplit(base or "")
    prefix = own.path.rstrip("/") + FILES_PATH
    same_origin = (parts.scheme.lower(), parts.netloc.lower()) == (own.scheme.lower(), own.netloc.lower())
    if base is None or not same_origin or not parts.path.startswith(prefix) or parts.query or parts.fragment:
        # An image of another server: as large as an uploaded one may be, and only from the operator's list.
        return fetch_allowed(url, PARAM, settings, max_bytes=int(settings.max_body_mb * 2**20))
    name = _NAME.fullmatch(parts.path[len(prefix) :])
    stored = None if name is None else store.get(name["id"])
    if name is None or stored is None or name["ext"] not in (None, stored.extension):
        raise InvalidParameter(PARAM, f"'{PARAM}' names no image of this server, or one that has expired.")
    try:
        return stored.path.read_bytes()
    except OSError:
        raise InvalidParameter(PARAM, f"'{PARAM}' names an image this server can no longer read.") from None

"""LoRA files damaged at the byte level: a valid file written by safetensors, then its header or its bytes
changed as a careless tool or a hostile upload would. Shared by the unit and the end-to-end tests."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

KEY = "transformer.x.lora_A.weight"


def valid_lora() -> bytes:
    """A valid (if tiny) diffusers-layout LoRA file, as bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        save_file({KEY: np.zeros((4, 8), np.float32)}, str(path), metadata={"format": "pt"})
        return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(text: bytes, rest: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + rest


def _edited(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        header, rest = _split(data)
        change(header)
        return _with_header(json.dumps(header).encode(), rest)

    return damage


def _raw_shape(text: str) -> Callable[[bytes], bytes]:
    """The shape written as raw JSON text (json.dumps could not write 10**400 as a JSON number it reads)."""

    def damage(data: bytes) -> bytes:
        header, rest = _split(data)
        header[KEY]["shape"] = "SHAPE"
        return _with_header(json.dumps(header).encode().replace(b'"SHAPE"', text.encode()), rest)

    return damage


def _deep(data: bytes) -> bytes:
    _, rest = _split(data)
    return _with_header(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", rest)


def _set(tensor_field: str, value: object) -> Callable[[bytes], bytes]:
    return _edited(lambda header: header[KEY].__setitem__(tensor_field, value))


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "huge-shape": _raw_shape("[" + "1" + "0" * 400 + ", 8]"),
    "null-shape": _set("shape", None),
    "integer-shape": _set("shape", 32),
    "float-dims": _set("shape", [4.0, 8]),
    "negative-dim": _set("shape", [-4, -8]),
    "string-metadata": _edited(lambda header: header.__setitem__("__metadata__", "pt")),
    "nested-metadata": _edited(lambda header: header.__setitem__("__metadata__", {"format": {"a": 1}})),
    "unknown-dtype": _set("dtype", "F33"),
    "offsets-past-the-end": _set("data_offsets", [0, 10**9]),
    "offsets-short": _set("data_offsets", [0, 4]),
    "tensor-a-list": _edited(lambda header: header.__setitem__(KEY, [1, 2])),
    "header-a-list": lambda data: _with_header(b"[1, 2, 3]", _split(data)[1]),
    "nested-100000-deep": _deep,
    "length-past-the-end": lambda data: struct.pack("<Q", 2**40) + data[8:],
    "truncated": lambda data: data[: len(data) // 2],
    "not-utf8": lambda data: _with_header(b'{"\xff\xfe": 1}', _split(data)[1]),
    "empty": lambda data: b"",
}


def write_damaged(folder: Path) -> dict[str, Path]:
    """One damaged file per kind of damage in `folder`, named after it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = valid_lora()
    written = {}
    for name, damage in DAMAGES.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(damage(good))
        written[name] = path
    return written

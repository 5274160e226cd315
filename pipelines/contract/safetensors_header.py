"""A safetensors file's JSON header, read and checked against the format, no tensor loaded (torch-free).

The format (huggingface/safetensors, README "Format"): 8 bytes of little-endian header length, then a JSON
object mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the bytes
after the header), plus an optional `"__metadata__"` object of strings. Anything else is `HeaderError`: a
file from the LoRA folder or the Hugging Face cache is untrusted input, and a header that is not this shape
must not reach code that assumes it is.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# A valid header nests three deep ({ -> {tensor} -> [shape]); deeper JSON is refused before it is parsed,
# so that nesting cannot exhaust json's recursion.
MAX_DEPTH = 3
MAX_DIMS = 8
MAX_DIM = 2**40  # far past any real tensor, small enough that a shape's product stays a plain size

# Bits per element of each dtype safetensors writes (its `Dtype` enum).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
Dtype = Literal[
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
    "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]  # fmt: skip
Offset = Annotated[StrictInt, Field(ge=0)]


class TensorEntry(BaseModel):
    """One tensor of the header."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Dtype
    shape: list[Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]] = Field(max_length=MAX_DIMS)
    data_offsets: tuple[Offset, Offset]

    def nbytes(self) -> int:
        return (math.prod(self.shape) * DTYPE_BITS[self.dtype] + 7) // 8


_TENSORS = TypeAdapter(dict[str, TensorEntry])
_METADATA = TypeAdapter(dict[StrictStr, StrictStr])
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


class HeaderError(ValueError):
    """Why a file is not a valid safetensors file."""


def _nesting_within(text: bytes, depth: int) -> bool:
    """Whether JSON `text` nests at most `depth` deep: each pass removes the innermost brackets (strings
    first, as they may hold brackets); whatever bracket is left after `depth` passes is deeper."""
    text = _STRINGS.sub(b'""', text)
    for _ in range(depth):
        text = _INNERMOST.sub(b"", text)
    return not any(bracket in text for bracket in (b"[", b"]", b"{", b"}"))


def _reason(error: ValidationError, what: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part)[:80] for part in first["loc"])
    return f"{what} {where}: {first['msg']}" if where else f"{what}: {first['msg']}"


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, or HeaderError (OSError when it cannot be read)."""
    with path.open("rb") as file:
        size = path.stat().st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise HeaderError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise HeaderError(f"header length {length} is past the file's end or safetensors' 100 MB limit")
        text = file.read(length)
    if not _nesting_within(text, MAX_DEPTH):
        raise HeaderError(f"header JSON nests deeper than {MAX_DEPTH}")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, an int of 4300+ digits
        raise HeaderError(f"header is not JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    try:
        metadata = _METADATA.validate_python(header.pop("__metadata__", None) or {})
    except ValidationError as exc:
        raise HeaderError(_reason(exc, "__metadata__")) from None
    try:
        tensors = _TENSORS.validate_python(header)
    except ValidationError as exc:
        raise HeaderError(_reason(exc, "tensor")) from None
    data_bytes = size - 8 - length
    for name, tensor in tensors.items():
        begin, end = tensor.data_offsets
        if not begin <= end <= data_bytes:
            raise HeaderError(f"tensor {name[:80]}: data_offsets {begin}, {end} are outside the file")
        if end - begin != tensor.nbytes():
            raise HeaderError(
                f"tensor {name[:80]}: {end - begin} bytes for a {tensor.dtype} tensor of shape {tensor.shape}"
            )
    return tensors, metadata

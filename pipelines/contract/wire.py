"""The one serialiser of what crosses the process boundary, msgspec, for the types of
pipelines/contract/messages.py.

A batch and the worker's answers travel as MessagePack over a worker's pipe and through Ray Serve: bytes stay
bytes (pixels, references), where JSON would base64 them. A stored async job is JSON, in the job table. Both
are read back into the declared dataclasses, checked against their annotations, so a field added to one of
them crosses without an edit here or at either end. Pure Python: no torch.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from pipelines.contract.messages import (
    Assigned,
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Rendered,
    RenderRequest,
    RenderResult,
)

Message = Ready | Heartbeat | Progress | Rendered | RenderResult | Failure | Assigned
"""What a worker (or an engine replica) sends back."""

T = TypeVar("T")

_MESSAGES: dict[str, type[Any]] = {kind.__name__: kind for kind in Message.__args__}  # type: ignore[attr-defined]
_encoder = msgspec.msgpack.Encoder()
_canonical = msgspec.msgpack.Encoder(order="deterministic")
_envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
_decoders = {name: msgspec.msgpack.Decoder(kind) for name, kind in _MESSAGES.items()}
_batch = msgspec.msgpack.Decoder(list[RenderRequest])


def encode_message(message: Message) -> bytes:
    """A message with its type's name, which `decode_message` reads first."""
    return _encoder.encode((type(message).__name__, message))


def decode_message(data: bytes) -> Message:
    name, body = _envelope.decode(data)
    result: Message = _decoders[name].decode(body)
    return result


def encode_batch(batch: list[RenderRequest]) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> list[RenderRequest]:
    return _batch.decode(data)


def canonical(value: object) -> bytes:
    """`value` as bytes that are equal exactly when the values are (dict keys sorted): for hashing."""
    return _canonical.encode(value)


def to_json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def from_json(text: str | bytes, kind: type[T]) -> T:
    return msgspec.json.decode(text, type=kind)


def from_builtins(value: object, kind: type[T]) -> T:
    """`value` (dicts, lists and strings, as JSON gives them) checked and built into `kind`, as from_json."""
    return msgspec.convert(value, type=kind)

"""The process boundary's contract: each RenderRequest field declares whether it separates batches, and one
serialiser carries every field. A new field needs no edit to the scheduler, the job table or the pools."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Annotated, Any

import pytest

from pipelines.contract.errors import ErrorCode
from pipelines.contract.lora_catalog import LoraChoice
from pipelines.contract.messages import (
    BatchKey,
    Failure,
    Progress,
    Ready,
    RenderedImage,
    RenderRequest,
    RenderResult,
    batch_fields,
)
from pipelines.contract.specs import SPECS
from pipelines.contract.wire import (
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
    from_json,
    to_json,
)
from server.declarations.errors import KINDS, APIError, to_api_error
from server.dispatch.pool import WorkerFailure
from server.dispatch.scheduler import batch_key
from server.front.normalize import Reply
from server.front.service import Prepared
from server.jobs.service import _dump, _load

BASE = RenderRequest("r", "flux.2-dev", "a lighthouse", 64, 64, 4, 4.0, [7])


def other(value: Any, declared: str = "") -> Any:
    """A value of `value`'s type (`declared`, the field's annotation, where `value` is None) that differs."""
    if value is None:
        return b"\x01mask" if "bytes" in declared else 0.5 if "float" in declared else 50
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, value[0]] if value else [b"\x00\x01"]
    if isinstance(value, dict):
        return {**value, "max_sequence_length": 256}
    raise AssertionError(f"no other value for {value!r}: extend `other`")


def every_field_set(request_type: type[RenderRequest] = RenderRequest) -> RenderRequest:
    """A request whose every field, enumerated from the declaration, differs from its default."""
    base = request_type(**dataclasses.asdict(BASE))
    values = {f.name: other(getattr(base, f.name), str(f.type)) for f in dataclasses.fields(request_type)}
    values["model"] = "flux.2-dev-turbo"  # another model the job table can resolve
    values["images"] = [b"\x89PNG\x00\xff", b"\x00"]
    values["seeds"] = [1, 2**32 - 1]
    values["loras"] = [LoraChoice("style", "/w/loras/style.safetensors", 0.8, "abc123")]
    values["extra"] = {"max_sequence_length": 256, "nested": [1, "x"]}
    return request_type(**values)


def test_every_field_flagged_batch_key_separates_batches_and_no_other_does() -> None:
    flagged = set(batch_fields(RenderRequest))
    assert {"model", "width", "height", "steps", "images", "loras", "acceleration"} <= flagged
    for f in dataclasses.fields(RenderRequest):
        if f.name == "loras":
            changed = dataclasses.replace(BASE, loras=[LoraChoice("s", "/s.safetensors", 1.0, "k")])
        else:
            changed = dataclasses.replace(BASE, **{f.name: other(getattr(BASE, f.name), str(f.type))})
        separates = batch_key(changed) != batch_key(BASE)
        assert separates == (f.name in flagged), f.name


def test_a_lora_at_another_scale_and_dict_order_are_told_apart_rightly() -> None:
    lora = LoraChoice("s", "/s.safetensors", 1.0, "k")
    one = dataclasses.replace(BASE, loras=[lora], extra={"a": 1, "b": 2})
    assert batch_key(one) == batch_key(
        dataclasses.replace(one, extra={"b": 2, "a": 1}, prompt="x", seeds=[9])
    )
    assert batch_key(one) != batch_key(dataclasses.replace(one, loras=[dataclasses.replace(lora, scale=0.5)]))


def test_image_prompted_requests_share_a_call_each_with_its_own_image_and_strength() -> None:
    prompted = dataclasses.replace(BASE, image_prompt=b"one image", image_prompt_strength=1.0)
    other_image = dataclasses.replace(prompted, image_prompt=b"another image", image_prompt_strength=0.3)
    assert batch_key(other_image) == batch_key(prompted)
    assert batch_key(prompted) != batch_key(BASE)


def test_masked_requests_share_a_call_each_with_its_own_mask() -> None:
    masked = dataclasses.replace(BASE, mask=b"one mask", strength=0.8)
    assert batch_key(dataclasses.replace(masked, mask=b"another mask")) == batch_key(masked)
    assert batch_key(masked) != batch_key(dataclasses.replace(masked, mask=None, strength=None))


@dataclass
class WithPromptStrength(RenderRequest):
    """A render field added as the next issues add theirs: declared once, nowhere else."""

    image_prompt_strength: Annotated[float, BatchKey] = 1.0
    caption: str = ""


def test_a_new_batch_separating_field_needs_no_edit_elsewhere() -> None:
    assert batch_fields(WithPromptStrength)[-1] == "image_prompt_strength"
    base = WithPromptStrength(**dataclasses.asdict(BASE))
    assert batch_key(dataclasses.replace(base, image_prompt_strength=0.5)) != batch_key(base)
    assert batch_key(dataclasses.replace(base, caption="x")) == batch_key(base)
    full = every_field_set(WithPromptStrength)
    assert from_json(to_json(full), WithPromptStrength) == full


def test_the_serialiser_keeps_every_field_over_the_pipe_and_in_the_job_table() -> None:
    request = every_field_set()
    assert all(getattr(request, f.name) != f.default for f in dataclasses.fields(RenderRequest))
    assert decode_batch(encode_batch([request, BASE])) == [request, BASE]
    reply = Reply("png", None, "b64_json", False, None, "opaque", False)
    loaded, base_url = _load(_dump(Prepared(request, reply, SPECS["flux.2-dev"]), "http://x"), SPECS)
    assert (loaded.render, loaded.reply, base_url) == (request, reply, "http://x")


@pytest.mark.parametrize(
    "message",
    [
        RenderResult(
            "r",
            [RenderedImage(bytes(range(256)) * 3, "image/png", 16, 16, 1, False, None)],
            "rev",
            {"run": 1.5},
        ),
        Progress("r", 2, 4, RenderedImage(b"\x00" * 12, "image/png", 2, 2, 5)),
        Failure(["a", "b"], "invalid_value", "bad", "size"),
        Ready("cpu", ["flux.2-dev"], {"flux.2-dev": {"mode": "resident"}}),
    ],
)
def test_each_message_crosses_whole(message: object) -> None:
    assert decode_message(encode_message(message)) == message  # type: ignore[arg-type]


def test_every_error_code_has_one_kind_and_a_worker_failure_keeps_its_code() -> None:
    assert set(KINDS) == set(typing.get_args(ErrorCode))
    error = to_api_error(WorkerFailure(Failure(["a"], "model_unavailable", "no weights", "model")))
    assert (error.status, error.code, error.param) == (503, "model_unavailable", "model")
    assert isinstance(to_api_error(RuntimeError()), APIError)


def test_a_worker_setting_has_its_default_only_in_the_settings() -> None:
    from pipelines.contract.messages import WorkerConfig

    defaulted = [f.name for f in dataclasses.fields(WorkerConfig) if f.default is not dataclasses.MISSING]
    assert defaulted == [], "declare the default on the setting in server.declarations.settings.Settings"
    assert not [f for f in dataclasses.fields(WorkerConfig) if f.default_factory is not dataclasses.MISSING]


def test_a_job_row_stored_before_the_serialiser_loads() -> None:
    """The layout the hand-written dump wrote (images as base64, LoRAs as objects) is msgspec's own JSON."""
    import base64
    import json

    request = every_field_set()
    reply = Reply("webp", 80, None, True, "high", "opaque", False)
    render = dataclasses.asdict(request)
    render["images"] = [base64.b64encode(image).decode() for image in request.images]
    render["mask"] = base64.b64encode(request.mask or b"").decode()
    render["image_prompt"] = base64.b64encode(request.image_prompt or b"").decode()
    stored = json.dumps({"render": render, "reply": dataclasses.asdict(reply), "base_url": "http://x"})
    loaded, base_url = _load(stored, SPECS)
    assert (loaded.render, loaded.reply, base_url) == (request, reply, "http://x")

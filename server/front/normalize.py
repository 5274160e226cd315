"""A parsed request + its model's spec -> one fully resolved RenderRequest, or an InvalidParameter.

Every parameter the gateways' model pages promise is decided here, in the HTTP process, before anything
reaches a worker. Which parameters exist and how each is handled is declared once, in
server/declarations/protocol.py."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from pipelines.contract.arguments import SET_BY_FLUXD
from pipelines.contract.encoding import LOSSY
from pipelines.contract.errors import InvalidParameter
from pipelines.contract.image_prompts import NOT_PULLED
from pipelines.contract.image_prompts import PARAM as IMAGE_PROMPT
from pipelines.contract.lora_catalog import MAX_NAME_CHARS, LoraChoice, check_entries
from pipelines.contract.lora_catalog import resolve as resolve_loras
from pipelines.contract.messages import RenderRequest
from pipelines.contract.presence import redux_present
from pipelines.contract.sizes import resolve_size
from pipelines.contract.specs import PASSTHROUGH_BOUNDS, ModelSpec
from server.declarations.protocol import DECLARATIONS, MAX_PROMPT_CHARS, MAX_SEED, OutputFormat, _ImageFields
from server.front.remote_inputs import is_url

EchoQuality = Literal["low", "medium", "high"]
# The qualities the SDK's response types know: `auto` and the DALL-E names are not echoed.
_ECHO_QUALITY: dict[str, EchoQuality] = {"low": "low", "medium": "medium", "high": "high"}
STREAM_FORMATS = frozenset({"png", "jpeg", "webp"})
ENHANCE_FIELDS = ("prompt_enhancement", "enhance_prompt", "enable_prompt_expansion", "prompt_upsampling")


@dataclass(frozen=True)
class Reply:
    """How the answer is shaped, decided with the request."""

    output_format: OutputFormat
    compression: int | None
    # None: the client named none, and clients disagree about which field to read (gpt-image-era ones read
    # b64_json, DALL-E-era ones url), so the answer carries both.
    response_format: Literal["url", "b64_json"] | None
    sync_mode: bool
    quality: EchoQuality | None
    background: Literal["opaque"]
    stream: bool


def _enhancement(body: _ImageFields, spec: ModelSpec) -> bool:
    given = {
        name: getattr(body, name) in (True, "on")
        for name in ENHANCE_FIELDS
        if getattr(body, name) is not None
    }
    if len(set(given.values())) > 1:
        raise InvalidParameter(
            next(reversed(given)), f"{' and '.join(given)} disagree: they are one switch, give one of them."
        )
    for name, on in given.items():
        if on and not spec.enhances_prompt:
            raise InvalidParameter(name, f"'{spec.id}' has no language model to enhance prompts with.")
    return any(given.values())


def _safety_check(body: _ImageFields, default: bool) -> bool:
    enable, disable = body.enable_safety_checker, body.disable_safety_checker
    if enable is not None and disable is not None and enable == disable:
        raise InvalidParameter(
            "disable_safety_checker",
            "enable_safety_checker and disable_safety_checker disagree: they are one switch; give one.",
        )
    if enable is not None:
        return enable
    return default if disable is None else not disable


def _acceleration(body: _ImageFields, spec: ModelSpec) -> str:
    """The step caching level: acceleration, or go_fast under replicate's name (true is 'regular')."""
    fast = None if body.go_fast is None else ("regular" if body.go_fast else "none")
    given = body.acceleration
    if given is not None and fast is not None and (given == "none") != (fast == "none"):
        raise InvalidParameter(
            "go_fast", "go_fast and acceleration disagree: go_fast true is acceleration 'regular'; give one."
        )
    level = body.acceleration or fast or spec.default_acceleration
    if level != "none" and not spec.accelerates:
        name = "acceleration" if body.acceleration is not None else "go_fast"
        raise InvalidParameter(
            name,
            f"'{spec.id}' runs {spec.default_steps} steps, too few to skip: acceleration must be 'none'.",
        )
    return level


# A passthrough argument that does nothing unless another one is set past a threshold (diffusers' FluxPipeline
# runs true CFG only when true_cfg_scale > 1): without it the request would silently lose what it asked for.
NEEDS = {"negative_prompt": ("true_cfg_scale", 1.0), "negative_prompt_2": ("true_cfg_scale", 1.0)}
# A pipeline argument's scalar type by its name in the annotation: its validator (built once, not per request)
# and how a 400 names it.
_SCALARS: dict[str, tuple[TypeAdapter[Any], str]] = {
    "bool": (TypeAdapter(bool), "boolean"),
    "int": (TypeAdapter(int), "whole number"),
    "float": (TypeAdapter(float), "number"),
    "str": (TypeAdapter(str), "string"),
}


def _passthrough(body: _ImageFields, signature: Mapping[str, str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    strict = bool(body.model_config.get("strict"))
    for name, value in (body.model_extra or {}).items():
        if name not in signature:
            instead = f" fluxd sets it: use '{SET_BY_FLUXD[name]}'." if SET_BY_FLUXD.get(name) else ""
            raise InvalidParameter(
                name, f"Unrecognized request argument supplied: {name}.{instead}", "unknown_parameter"
            )
        if value is None:
            continue
        extra[name] = _argument(name, value, signature[name], strict)
        if isinstance(extra[name], str) and len(extra[name]) > MAX_PROMPT_CHARS:
            raise InvalidParameter(
                name, f"'{name}' is longer than {MAX_PROMPT_CHARS} characters, as prompt may be."
            )
        bounds = PASSTHROUGH_BOUNDS.get(name)
        if bounds is not None and not bounds[0] <= extra[name] <= bounds[1]:
            raise InvalidParameter(
                name, f"'{name}' must be a number between {bounds[0]:g} and {bounds[1]:g}."
            )
    for name, (needed, threshold) in NEEDS.items():
        if name in extra and name in signature and not extra.get(needed, threshold) > threshold:
            raise InvalidParameter(
                name, f"'{name}' has no effect unless '{needed}' is above {threshold:g}: send both."
            )
    return extra


def _argument(name: str, value: Any, annotation: str, strict: bool) -> Any:
    """A passthrough value as the pipeline argument's scalar type (the annotation arrives as text, e.g.
    "<class 'int'>" or "str | list[str] | None"); JSON values must already have it, form text is parsed."""
    match = re.search(r"\b(bool|int|float|str)\b", annotation)
    adapter, kind = _SCALARS[match.group(1) if match else "str"]
    try:
        return adapter.validate_python(value, strict=strict)
    except ValidationError:
        raise InvalidParameter(name, f"'{name}' must be a {kind}.") from None


def _size(
    body: _ImageFields, spec: ModelSpec, input_size: tuple[int, int] | None, masked: bool = False
) -> tuple[int, int]:
    """The output size. A masked edit keeps its first image's own size unless told otherwise: what the mask
    keeps comes back as sent only at that size."""
    size = body.size
    if (body.width is None) != (body.height is None):
        missing = "width" if body.width is None else "height"
        raise InvalidParameter(
            missing, "width and height must be given together.", "missing_required_parameter"
        )
    if size is None and body.width is not None:
        size = f"{body.width}x{body.height}"
    return resolve_size(
        spec,
        size=size,
        aspect_ratio=body.aspect_ratio,
        resolution=body.resolution,
        input_size=input_size,
        resolution_mode=body.resolution_mode or ("match_input" if masked else "auto"),
    )


def _reply(body: _ImageFields) -> Reply:
    fmt = body.output_format or "png"
    compression = body.output_compression
    if compression is not None and fmt not in LOSSY:
        raise InvalidParameter(
            "output_compression", f"output_compression applies to jpeg, webp and avif, not {fmt}."
        )
    if body.output_quality is not None:
        if compression is not None and compression != body.output_quality:
            raise InvalidParameter(
                "output_quality", "output_quality is output_compression under another name: give one of them."
            )
        if fmt in LOSSY:
            compression = body.output_quality
    if body.background == "transparent":
        raise InvalidParameter("background", "FLUX images have no alpha channel: use 'opaque' or 'auto'.")
    if body.stream and (body.n or 1) > 1:
        raise InvalidParameter("n", "Streaming returns one image: n must be 1 with stream=true.")
    if body.stream and fmt not in STREAM_FORMATS:
        raise InvalidParameter(
            "output_format",
            f"Streamed images can be {', '.join(sorted(STREAM_FORMATS))} (the SDK's event types).",
        )
    if body.stream and body.response_format == "url":
        raise InvalidParameter(
            "response_format", "Streamed images arrive as b64_json in the events: leave response_format out."
        )
    if body.partial_images and not body.stream:
        raise InvalidParameter("partial_images", "partial_images needs stream=true.")
    return Reply(
        output_format=fmt,
        compression=compression,
        response_format=body.response_format,
        sync_mode=bool(body.sync_mode),
        quality=_ECHO_QUALITY.get(body.quality or ""),
        background="opaque",
        stream=bool(body.stream),
    )


def _check_loras(body: _ImageFields, weights_dir: Path | None) -> None:
    """The request's `loras` as far as they can be checked before a URL among them is fetched."""
    if body.loras:
        if weights_dir is None:
            raise InvalidParameter("loras", "This server has no LoRA folder.")
        check_entries([(lora.path, lora.scale) for lora in body.loras])
        if any(len(lora.path) > MAX_NAME_CHARS and not is_url(lora.path) for lora in body.loras):
            raise InvalidParameter("loras", f"A LoRA's name is at most {MAX_NAME_CHARS} characters.")


def _loras(
    body: _ImageFields, spec: ModelSpec, weights_dir: Path | None, fetched: Mapping[str, tuple[str, Path]]
) -> list[LoraChoice]:
    """The request's LoRAs; one given by URL goes by the name its fetch shows, with the file it fetched."""
    entries = [
        (fetched[lora.path][0] if lora.path in fetched else lora.path, lora.scale)
        for lora in body.loras or []
    ]
    if not entries or weights_dir is None:  # _check_loras refused LoRAs without a folder
        return []
    files = dict(fetched.values())
    return resolve_loras(entries, spec.family, spec.id, weights_dir, files)


def _strength(body: _ImageFields, masked: bool, steps: int) -> float | None:
    """How far a masked area may move: 1 unless given; without a mask there is nothing for it to do."""
    given: float | None = getattr(body, "strength", None)
    if not masked:
        if given is not None:
            raise InvalidParameter("strength", "strength applies to a masked edit: send a mask with it.")
        return None
    strength = 1.0 if given is None else given
    if int(steps * strength) < 1:  # the denoising runs the last steps x strength steps of the schedule
        raise InvalidParameter(
            "strength", f"strength {strength:g} of {steps} steps runs no step: raise one of them."
        )
    return strength


def check_taken(body: _ImageFields, spec: ModelSpec) -> None:
    """Refuse a declared parameter that `spec` does not take, naming it."""
    for name in body.model_fields_set:
        declared = DECLARATIONS.parameters.get(name)
        if declared is not None and not declared.takes(spec):
            raise InvalidParameter(name, f"'{spec.id}' does not take '{name}'.", "unknown_parameter")


def check_image_prompt_served(weights_dir: Path | None) -> None:
    """Before an image prompt is read (build_request has checked that the model takes one): the Redux weights
    are here. Reads the disk."""
    if weights_dir is None or not redux_present(weights_dir):
        raise InvalidParameter(IMAGE_PROMPT, NOT_PULLED)


def _declared_value(body: _ImageFields, name: str) -> Any:
    """A field of the body's own route, never a passthrough of the same name (edits keep unknown fields)."""
    return getattr(body, name) if name in type(body).model_fields else None


def _image_prompt_strength(body: _ImageFields) -> float | None:
    given: float | None = _declared_value(body, "image_prompt_strength")
    if _declared_value(body, IMAGE_PROMPT) is None:
        if given is not None:
            raise InvalidParameter(
                "image_prompt_strength", "image_prompt_strength applies to an image_prompt: send one with it."
            )
        return None
    return 1.0 if given is None else given


@dataclass(frozen=True)
class RemoteInputs:
    """What a request names by URL: its LoRAs (URL -> (name, file), fetched into the cache) and its
    image_prompt, read (server/front/image_prompts.py, server/front/remote_inputs.py)."""

    loras: Mapping[str, tuple[str, Path]] = field(default_factory=dict)
    image_prompt: bytes | None = None


def build_request(
    body: _ImageFields,
    spec: ModelSpec,
    signature: Mapping[str, str],
    images: list[bytes] | None = None,
    input_size: tuple[int, int] | None = None,
    enhance_temperature: float = 0.15,
    prompt_required: bool = True,
    safety_default: bool = False,
    weights_dir: Path | None = None,
    fetch: Callable[[], RemoteInputs] = RemoteInputs,
) -> tuple[RenderRequest, Reply]:
    """Validate everything and apply every default; raise InvalidParameter naming the first bad field.
    Only variations go without a prompt. `fetch` reads what the body names by URL (a download of gigabytes,
    perhaps), and is called once every other field has passed. LoRAs are then looked up under
    `weights_dir` (and the Hugging Face cache) or among the fetched ones: their headers are read here, so a
    LoRA the model cannot take is refused before it queues."""
    if prompt_required and not body.prompt.strip():
        raise InvalidParameter("prompt", "prompt must not be empty.", "missing_required_parameter")
    check_taken(body, spec)
    reply = _reply(body)
    mask = getattr(body, "mask", None)
    width, height = _size(body, spec, input_size, mask is not None)

    steps = spec.default_steps if body.num_inference_steps is None else body.num_inference_steps
    if not 1 <= steps <= spec.max_steps:
        raise InvalidParameter(
            "num_inference_steps", f"num_inference_steps must be between 1 and {spec.max_steps}."
        )
    guidance = spec.default_guidance if body.cfg_scale is None else body.cfg_scale
    low, high = spec.guidance_range
    if not low <= guidance <= high:
        raise InvalidParameter("cfg_scale", f"cfg_scale must be between {low:g} and {high:g}.")

    n = body.n or 1
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed
    extra = _passthrough(body, signature)
    enhance_prompt = _enhancement(body, spec)
    acceleration = _acceleration(body, spec)
    safety_check = _safety_check(body, safety_default)
    strength = _strength(body, mask is not None, steps)
    image_prompt_strength = _image_prompt_strength(body)
    _check_loras(body, weights_dir)
    remote = fetch()
    if _declared_value(body, IMAGE_PROMPT) is not None and remote.image_prompt is None:
        raise ValueError("the image_prompt of the body must be fetched (server/front/image_prompts.py)")
    request = RenderRequest(
        id=uuid.uuid4().hex,
        model=spec.id,
        prompt=body.prompt,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seeds=[(seed + i) % (MAX_SEED + 1) for i in range(n)],
        images=images or [],
        extra=extra,
        enhance_prompt=enhance_prompt,
        enhance_temperature=enhance_temperature,
        partial_images=body.partial_images or 0,
        acceleration=acceleration,
        safety_check=safety_check,
        loras=_loras(body, spec, weights_dir, remote.loras),
        output_format=reply.output_format,
        output_compression=reply.compression,
        mask=mask,
        strength=strength,
        image_prompt=remote.image_prompt,
        image_prompt_strength=image_prompt_strength,
    )
    return request, reply

"""Pydantic models of the OpenAI Images API as the official SDKs send and parse it, plus the parameters the
hosted gateways' model pages (Lumenfall's, fal's and replicate's) add.

Each request field is the one declaration of that parameter (server/declarations/parameters.py): its type and
bounds, how fluxd handles it and where it comes from. Fields follow the OpenAI spec's order; the gateways'
come after. `None` everywhere means "use the default", because the SDKs send Python None as JSON null."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from pipelines.contract.lora_catalog import MAX_LORAS, MAX_NAME_CHARS
from pipelines.contract.specs import Acceleration
from server.declarations.parameters import LUMENFALL, OPENAI, Declarations, declare

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 32_000
# A LoRA's URL: signed ones (S3, GCS, Azure SAS) run to a few thousand characters. A name is shorter
# (MAX_NAME_CHARS, server/front/normalize.py).
MAX_URL_CHARS = 8192

OutputFormat = Literal["png", "jpeg", "webp", "avif", "gif"]
Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
Background = Literal["transparent", "opaque", "auto"]
Text = Annotated[str, Field(min_length=1)]  # "" is neither a value nor "use the default": that is null
SAFETY = (
    "BFL's moderation level; fluxd's checker (enable_safety_checker) has one threshold, --safety-threshold"
)
ENHANCE = "prompt_enhancement (one switch under the gateways' several names)"
WebhookEvent = Literal["started", "preview", "succeeded", "failed", "cancelled", "expired"]


class LoraWeight(BaseModel):
    """One entry of `loras`, in fal's shape."""

    model_config = ConfigDict(extra="forbid")

    path: Text = Field(max_length=MAX_URL_CHARS)
    scale: float = 1.0


class _ImageFields(BaseModel):
    """Fields shared by generations and edits; unknown fields are kept for passthrough or a 400."""

    model_config = ConfigDict(extra="allow")

    prompt: str = declare(
        "native", "the pipeline's prompt", OPENAI, required=True, max_length=MAX_PROMPT_CHARS
    )
    model: Text | None = declare(
        "converted",
        "model id or alias -> the checkpoint (and adapter) that serves it",
        OPENAI,
        default="--default-model",
    )
    n: int | None = declare(
        "emulated",
        "one batched pipeline call with one generator per image; image i uses seed + i",
        OPENAI,
        default=1,
        ge=1,
        le=10,
    )
    size: Text | None = declare(
        "converted",
        "'WxH' snapped to multiples of 16 and scaled down (aspect kept) to the model's limit; 'W:H' is "
        "aspect_ratio; 'auto': the model's default, or an edit's first image",
        OPENAI,
        default="auto",
    )
    quality: Quality | None = declare(
        "accepted", "echoed where the SDK allows; steps are set by num_inference_steps", OPENAI
    )
    background: Background | None = declare(
        "accepted",
        "opaque and auto; transparent is a 400 (FLUX has no alpha channel)",
        OPENAI,
        default="auto",
    )
    output_format: OutputFormat | None = declare(
        "converted", "png, jpeg, webp, avif, gif, encoded with Pillow", OPENAI, default="png"
    )
    output_compression: int | None = declare(
        "native", "quality of jpeg/webp/avif, 0-100 (Pillow's default when absent)", OPENAI, ge=0, le=100
    )
    partial_images: int | None = declare(
        "native", "previews decoded from intermediate latents, with stream", OPENAI, default=0, ge=0, le=3
    )
    stream: bool | None = declare(
        "native", "server-sent events of partial and completed images", OPENAI, default=False
    )
    response_format: Literal["url", "b64_json"] | None = declare(
        "emulated",
        "url: stored locally with a TTL; b64_json: inline; absent: both, since clients that send none "
        "disagree about which they read",
        OPENAI,
    )
    user: str | None = declare("accepted", "logged with the request id only", OPENAI)
    seed: int | None = declare(
        "native",
        "CPU torch generator per image; random when absent, always reported back",
        LUMENFALL,
        ge=0,
        le=MAX_SEED,
    )
    aspect_ratio: Text | None = declare(
        "converted", "nearest ratio of the model's 1K table (Kontext adds 21:9 and 9:21)", LUMENFALL
    )
    resolution: Text | None = declare(
        "converted",
        "nearest available tier (0.5K/1K/2K/4K or megapixels) scaling the ratio's size",
        LUMENFALL,
        default="1K",
    )
    resolution_mode: Literal["auto", "match_input"] | None = declare(
        "converted",
        "edits with size auto: 'auto' = nearest table size, 'match_input' = the input's size",
        f"{LUMENFALL}: FLUX.1 Kontext [dev] (fal)",
        default="auto",
    )
    width: int | None = declare(
        "converted",
        "with height, the same as size 'WxH' when size is not given",
        f"{LUMENFALL}: FLUX.2 [dev], FLUX1.1 [pro] (replicate)",
        ge=1,
        le=14142,
    )
    height: int | None = declare(
        "converted",
        "with width, the same as size 'WxH' when size is not given",
        f"{LUMENFALL}: FLUX.2 [dev], FLUX1.1 [pro] (replicate)",
        ge=1,
        le=14142,
    )
    cfg_scale: float | None = declare(
        "renamed", "guidance_scale", LUMENFALL, model_default="default_guidance"
    )
    num_inference_steps: int | None = declare(
        "native",
        "denoising steps",
        f"{LUMENFALL}: FLUX.2 [dev] (fal), FLUX.1 Kontext [dev]",
        model_default="default_steps",
    )
    output_quality: int | None = declare(
        "renamed",
        "output_compression (ignored for png and gif, as replicate documents)",
        f"{LUMENFALL} (replicate)",
        ge=0,
        le=100,
    )
    sync_mode: bool | None = declare(
        "emulated", "returns a data: URI in url", f"{LUMENFALL} (fal)", default=False
    )
    prompt_enhancement: Literal["off", "on"] | bool | None = declare(
        "converted",
        "'on': FLUX.2 rewrites the prompt with its own Mistral encoder (returned as revised_prompt); "
        "other models have no language model, so 'on' is a 400 there",
        f"{LUMENFALL}: FLUX.2 [dev]",
        default="off",
    )
    enhance_prompt: bool | None = declare(
        "renamed", ENHANCE, f"{LUMENFALL}: FLUX.1 Kontext [dev], FLUX1.1 [pro] (fal)"
    )
    enable_prompt_expansion: bool | None = declare(
        "renamed", ENHANCE, f"{LUMENFALL}: FLUX.2 [dev], FLUX.2 [dev] Turbo (fal)"
    )
    prompt_upsampling: bool | None = declare("renamed", ENHANCE, f"{LUMENFALL}: FLUX1.1 [pro] (replicate)")
    acceleration: Acceleration | None = declare(
        "emulated",
        "step caching for this request: diffusers' TaylorSeer cache hook on the transformer forecasts its "
        "output on the steps it skips (TaylorSeer, arXiv 2503.06923, lite form). At 28 steps the transformer "
        "runs 16 times at 'regular' (1.75x fewer: every 2nd step after 3 warm-up steps, the last 2 always) "
        "and 13 at 'high' (2.15x fewer: every 3rd), where published step caches reach 1.7-1.8x on FLUX.1 and "
        "1.69-1.83x on FLUX.2 [dev] (vLLM-Omni: Cache-DiT, TeaCache); 'none' runs every step, pixels as "
        "without any hook. The answer's `acceleration` says what ran. Turbo's 8 steps leave little to skip: "
        "it takes only 'none' (anything else is a 400)",
        f"{LUMENFALL}: FLUX.2 [dev], FLUX.1 Kontext [dev] (fal); default 'regular' as fal's FLUX.2 [dev] "
        "endpoint documents it; fal's Kontext [dev] default could not be verified from a public page: 'none'",
        model_default="default_acceleration",
    )
    go_fast: bool | None = declare(
        "converted",
        "true: acceleration 'regular', false: 'none'; given with acceleration, the two must agree (a 400 "
        "otherwise); a 400 on Turbo, which takes only 'none'",
        f"{LUMENFALL}: FLUX.2 [dev] (replicate)",
    )
    loras: list[LoraWeight] | None = declare(
        "native",
        f"up to {MAX_LORAS} of the server's LoRAs, [{{path, scale}}]: a name under weights/loras/, a "
        "Hugging Face repo pulled with `fluxd weights pull --lora`, or an http(s) URL under the server's "
        "--fetch-allow (else a 400), fetched once into a cache "
        f"(a name at most {MAX_NAME_CHARS} characters, a URL {MAX_URL_CHARS}); "
        "scale -4 to 4 (default 1); applied "
        "unfused on the shared base (diffusers/PEFT, kohya, BFL/ai-toolkit layouts), stacking on Turbo; "
        "multipart: a JSON text field",
        "fal's FLUX LoRA endpoints (fal-ai/flux-lora, fal-ai/flux-2/lora)",
    )
    enable_safety_checker: bool | None = declare(
        "emulated",
        "true: each image is classified by an open NSFW classifier (Falconsai/nsfw_image_detection, a ViT, "
        "through transformers) after decode; a flagged image is black, and each reports has_nsfw_concepts, "
        "as on fal. On a server without the classifier (`fluxd weights pull safety-checker`) each image "
        "comes back unchecked with a safety_note saying so",
        f"{LUMENFALL} (fal)",
        default="--safety-checker (off)",
    )
    disable_safety_checker: bool | None = declare(
        "renamed",
        "enable_safety_checker negated (replicate's name); given with it, the two must agree",
        f"{LUMENFALL} (replicate)",
    )
    safety_tolerance: int | None = declare("accepted", SAFETY, f"{LUMENFALL}: FLUX1.1 [pro]", ge=1, le=6)
    webhook_url: Text | None = declare(
        "emulated",
        "with Prefer: respond-async, POSTed when the job ends, signed as the Standard Webhooks spec says; "
        "only to URLs under the server's --webhook-allow (else a 400), and a 400 without the header",
        "BFL API reference (webhook_url)",
        max_length=2048,
    )
    webhook_events: list[WebhookEvent] | None = declare(
        "emulated",
        "with webhook_url, the events POSTed, in the order they happen: started, preview (each partial "
        "image), succeeded, failed, cancelled, expired (not started by its Cancel-After)",
        "replicate (webhook_events_filter)",
        default="succeeded, failed, cancelled, expired",
        min_length=1,
        max_length=6,
    )
    job_ttl_s: float | None = declare(
        "emulated",
        "with Prefer: respond-async, seconds the ended job and its result stay fetchable (its expires_at); "
        "shorter than the server's --job-ttl-s, never longer (else a 400)",
        "OpenAI video jobs (expires_at)",
        gt=0,
    )


class ImageGenerationRequest(_ImageFields):
    """Body of POST /v1/images/generations. JSON carries types, so none is converted: `"n": true` or
    `"stream": "yes"` is a 400, not 1 image or a stream. Multipart edits arrive as text and are parsed."""

    model_config = ConfigDict(extra="allow", strict=True)

    moderation: Literal["low", "auto"] | None = declare("accepted", "no local moderation", OPENAI)
    style: Literal["vivid", "natural"] | None = declare("accepted", "no effect on FLUX", OPENAI)
    image_prompt: Text | None = declare(
        "native",
        "FLUX.1 Redux: an image whose SigLIP/Redux tokens follow the prompt's, guiding the composition "
        "(diffusers' FluxPriorReduxPipeline; the weights come with `fluxd weights pull redux`, without "
        "which it is a 400 saying so); a base64 data: URI of a PNG, JPEG, WebP or GIF (its first frame), the "
        "url of an image this server returned, or a URL under the server's --fetch-allow (else a 400)",
        f"{LUMENFALL}: FLUX1.1 [pro] (replicate)",
        families=("flux1",),
    )
    image_prompt_strength: float | None = declare(
        "emulated",
        "with image_prompt, how much it weighs against the prompt: Redux's image tokens are multiplied by "
        "it (0: the prompt alone guides; 1: Redux as BFL ships it); a 400 without image_prompt",
        "BFL API reference: FLUX1.1 [pro] Ultra (image_prompt_strength, 0 to 1)",
        default=1,
        families=("flux1",),
        ge=0,
        le=1,
    )


class ImageEditRequest(_ImageFields):
    """Text fields of POST /v1/images/edits (the files, `image` and `mask`, are read from the form apart)."""

    input_fidelity: Literal["low", "high"] | None = declare(
        "accepted", "no effect: references are always used at full fidelity", OPENAI
    )
    image: list[bytes] | None = declare(
        "native",
        "reference image(s), multipart `image` or `image[]`: PNG, JPEG or WebP, detected from the bytes",
        OPENAI,
    )
    mask: bytes | None = declare(
        "native",
        "multipart file: a PNG (or JPEG, WebP) of the first image's size; the first image is edited where "
        "the mask is transparent, or, in a mask without alpha, white; everything else comes back as sent. "
        "Other images still condition the edit as references (FLUX.2)",
        OPENAI,
    )
    strength: float | None = declare(
        "native",
        "with a mask: how far the masked area may move from the original, 1 (the default) repainting it "
        "from noise; a 400 without a mask",
        "fal FLUX inpainting and image-to-image endpoints (strength)",
        default=1,
        gt=0,
        le=1,
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        """Multipart carries `loras` as one JSON text field (the SDK's `loras[][path]` fields arrive as a
        list already, gathered by the route)."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError('loras must be a JSON list such as [{"path": "style", "scale": 0.8}]') from None


DECLARATIONS = Declarations({"generations": ImageGenerationRequest, "edits": ImageEditRequest})


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int
    has_nsfw_concepts: bool | None = None  # fal's: the safety checker's verdict, when it ran
    safety_note: str | None = None  # why an image the request asked to check was not


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class ImagesResponse(BaseModel):
    """The SDK's ImagesResponse; echo fields are left out where the SDK's types would not know the value."""

    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"] | None = None
    output_format: Literal["png", "webp", "jpeg", "gif"] | None = None
    quality: Literal["low", "medium", "high"] | None = None
    size: str | None = None
    usage: Usage | None = None
    model: str | None = None
    acceleration: str | None = None  # fluxd's: the step caching that ran (an extra field to the SDK)


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    model_config = ConfigDict(extra="allow")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    """The error envelope's body, with its four keys always there (null ones too), as in every error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None

    @model_serializer
    def _every_key(self) -> dict[str, str | None]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class _StreamImage(BaseModel):
    """What every image event of a stream (`stream: true`) carries; `type` repeats the SSE `event:` name."""

    model_config = ConfigDict(extra="forbid")

    type: str
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str | None
    output_format: OutputFormat


class StreamPartialImage(_StreamImage):
    """Event `image_generation.partial_image` (edits: `image_edit.partial_image`): a preview decoded from
    the latents mid-run, up to `partial_images` of them, as OpenAI's ImageGenPartialImageEvent."""

    partial_image_index: int


class StreamCompleted(_StreamImage):
    """Event `image_generation.completed` (edits: `image_edit.completed`): the final image, exactly once, as
    OpenAI's ImageGenCompletedEvent, with fluxd's reproduction fields."""

    usage: Usage
    seed: int
    revised_prompt: str | None
    acceleration: str | None
    has_nsfw_concepts: bool | None
    safety_note: str | None


class StreamError(BaseModel):
    """Event `error`: the stream had begun as a 200 when the render failed; the error envelope."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["error"]
    error: ErrorBody

"""What each served model is: ids, aliases, defaults, size tables, limits and accepted parameters.

Pure data, importable without torch: the HTTP process validates every request against these specs before
anything reaches a worker. Sources are cited next to each value: mostly Lumenfall's public model pages
(lumenfall.ai, one per model), which define what users of these models expect from a hosted gateway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.contract.errors import InvalidParameter, ModelNotFound

Family = Literal["flux2", "flux1", "flux1-kontext"]
# A loaded diffusers pipeline. DiffusionPipeline's subclasses set their components (transformer, vae, ...) as
# attributes at run time, which no static type of diffusers declares.
Pipeline = Any
Mode = Literal["generate", "edit", "inpaint"]  # inpaint: an edit of the first image inside a mask
Acceleration = Literal["none", "regular", "high"]  # step caching per request (pipelines.engine.acceleration)

SIZE_MULTIPLE = 16  # VAE downsampling (8) x latent patch size (2), the same for FLUX.1 and FLUX.2.
# Lumenfall model pages: "Custom 1-14142px per side" accepted as input before clamping to the model.
MAX_INPUT_SIDE = 14142
MAX_REFERENCE_PIXELS = (
    4 * 1024 * 1024
)  # Lumenfall FLUX.2 [dev] page (pricing notes): references over 4 MP are resized to 4 MP.

# The Lumenfall model pages' "1K" tables (ratio -> output size). FLUX.2 [dev], Turbo and FLUX1.1 [pro]
# list nine; Kontext adds 21:9 and 9:21. Sizes are the gateway's own numbers; fluxd snaps them to
# SIZE_MULTIPLE when it runs.
SIZES_1K: dict[str, tuple[int, int]] = {
    "4:3": (1183, 887),
    "4:5": (916, 1145),
    "5:4": (1145, 916),
    "1:1": (1024, 1024),
    "3:4": (887, 1182),
    "2:3": (836, 1254),
    "3:2": (1254, 836),
    "9:16": (768, 1365),
    "16:9": (1365, 768),
}
SIZES_1K_KONTEXT: dict[str, tuple[int, int]] = {**SIZES_1K, "9:21": (670, 1564), "21:9": (1563, 670)}

# Resolution tiers as a linear scale of the 1K table; the Lumenfall model pages name "0.5K 1K 2K 4K" and
# megapixel tiers.
TIERS: dict[str, float] = {"0.5K": 0.5, "1K": 1.0, "2K": 2.0, "4K": 4.0}

# Bounds on pipeline arguments that clients may pass through, where an unbounded value would let one
# request occupy a GPU for minutes (FLUX.2's pipeline pads to whatever max_sequence_length it is given).
PASSTHROUGH_BOUNDS: dict[str, tuple[float, float]] = {
    "max_sequence_length": (1, 512),
    "true_cfg_scale": (0, 20),
}


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA switched on per batch over a base model's transformer (never a second copy of the base)."""

    name: str
    repo_id: str
    weight_name: str
    folder: str  # weights/<folder>/ holds the file, whichever id (or alias) serves the adapter
    sigmas: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Limits:
    """Largest output a model is run at; requests above are scaled down keeping their aspect ratio."""

    max_side: int
    max_pixels: int
    source: str


@dataclass(frozen=True)
class ModelSpec:
    """One servable model id."""

    id: str
    family: Family
    title: str
    repo_id: str | None
    pipeline_class: str
    modes: frozenset[Mode]
    default_steps: int
    default_guidance: float
    defaults_source: str
    limits: Limits
    sizes_1k: Mapping[str, tuple[int, int]]
    default_size: tuple[int, int] = (1024, 1024)
    max_references: int = 0
    enhances_prompt: bool = False
    adapter: LoraAdapter | None = None
    base: str | None = None  # the model whose weights this id runs on (an adapter's base or an alias's root)
    alias: bool = False
    checkpoint_path: str | None = None  # an explicit diffusers folder (a model added in the TOML registry)
    max_steps: int = 100
    guidance_range: tuple[float, float] = (0.0, 20.0)
    # What the pipeline takes as a reference; the worker fits every reference into it, none is refused.
    min_reference_side: int = 1
    max_reference_aspect: float = 100.0
    default_acceleration: Acceleration = "none"
    accelerates: bool = True  # False: any level but "none" is a 400 (Turbo: its 8 steps leave little to skip)

    @property
    def weights_id(self) -> str:
        """The folder under weights/ that holds this model's diffusers checkpoint."""
        return self.base or self.id

    @property
    def tiers(self) -> dict[str, float]:
        """Resolution tiers whose square size fits this model's limits."""
        return {
            name: scale
            for name, scale in TIERS.items()
            if 1024 * scale <= self.limits.max_side and (1024 * scale) ** 2 <= self.limits.max_pixels
        }

    def check_edits(self, masked: bool, param: str) -> None:
        """Refuse an edit this model does not make, naming `param`: one that only inpaints needs a mask."""
        if "edit" in self.modes or (masked and "inpaint" in self.modes):
            return
        instead = "; send a mask to inpaint" if "inpaint" in self.modes else ""
        raise InvalidParameter(
            param, f"'{self.id}' does not edit images; use /v1/images/generations{instead}."
        )

    def check_references(self, count: int, masked: bool = False) -> None:
        """Refuse a number of reference images this model cannot take, naming `image`, before any is read.
        Their sizes are never refused: the worker fits each into `min_reference_side` and
        `max_reference_aspect` (pipelines.contract.images.fit_reference). With a mask the first image is the
        one edited, which a model that only inpaints takes too."""
        self.check_edits(masked, "image")
        if not count:
            raise InvalidParameter("image", "At least one image is required.", "missing_required_parameter")
        allowed = max(self.max_references, 1) if masked else self.max_references
        if count > allowed:
            raise InvalidParameter(
                "image", f"'{self.id}' takes at most {allowed} image(s); {count} were sent."
            )

    def with_overrides(self, **changes: object) -> ModelSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


FLUX2_LIMITS = Limits(2048, 2048 * 2048, "Lumenfall FLUX.2 [dev] model page (FAQ): images up to 2048x2048")
FLUX1_LIMITS = Limits(
    1440,
    1440 * 1440,
    "BFL API limits for FLUX.1 [dev] / FLUX1.1 [pro]: at most 1440 px per side (their 256 px minimum is not "
    "applied: smaller sizes run, as on the FLUX.2 models)",
)
KONTEXT_LIMITS = Limits(
    1568, 1568 * 672, "largest of diffusers' PREFERRED_KONTEXT_RESOLUTIONS; Kontext is trained around 1 MP"
)

TURBO_SIGMAS = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)

# diffusers' Flux2ImageProcessor.check_image_input refuses references under 64 px a side or past 8:1; gateways
# take any size, so the worker fits references into that range first
# (pipelines.contract.images.fit_reference).
_FLUX2_REFERENCES: dict[str, Any] = {
    "max_references": 4,
    "min_reference_side": 64,
    "max_reference_aspect": 8.0,
}

SPECS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="flux.2-dev",
            family="flux2",
            title="FLUX.2 [dev]",
            repo_id="black-forest-labs/FLUX.2-dev",
            pipeline_class="Flux2Pipeline",
            modes=frozenset({"generate", "edit", "inpaint"}),
            default_steps=28,
            default_guidance=4.0,
            defaults_source="28 steps and acceleration 'regular': fal's FLUX.2 [dev] endpoint (the provider "
            "behind its Lumenfall page); guidance 4.0: diffusers Flux2Pipeline default and BFL's reference "
            "sampling",
            default_acceleration="regular",
            limits=FLUX2_LIMITS,
            sizes_1k=SIZES_1K,
            enhances_prompt=True,
            **_FLUX2_REFERENCES,  # Lumenfall FLUX.2 [dev] page (edit): "Up to 4 images per request"
        ),
        ModelSpec(
            id="flux.2-dev-turbo",
            family="flux2",
            title="FLUX.2 [dev] Turbo",
            repo_id="black-forest-labs/FLUX.2-dev",
            pipeline_class="Flux2Pipeline",
            modes=frozenset({"generate", "edit", "inpaint"}),
            default_steps=8,
            default_guidance=2.5,
            defaults_source="fal/FLUX.2-dev-Turbo model card: 8 steps, guidance 2.5, its 8 custom sigmas",
            limits=FLUX2_LIMITS,
            sizes_1k=SIZES_1K,
            enhances_prompt=True,
            **_FLUX2_REFERENCES,
            adapter=LoraAdapter(
                name="turbo",
                repo_id="fal/FLUX.2-dev-Turbo",
                weight_name="flux.2-turbo-lora.safetensors",
                folder="flux.2-dev-turbo",
                sigmas=TURBO_SIGMAS,
            ),
            base="flux.2-dev",
            accelerates=False,
        ),
        ModelSpec(
            id="flux.1-kontext-dev",
            family="flux1-kontext",
            title="FLUX.1 Kontext [dev]",
            repo_id="black-forest-labs/FLUX.1-Kontext-dev",
            pipeline_class="FluxKontextPipeline",
            modes=frozenset({"generate", "edit", "inpaint"}),
            default_steps=28,
            default_guidance=2.5,
            defaults_source="28 steps: diffusers FluxKontextPipeline default; "
            "guidance 2.5: the FLUX.1 Kontext [dev] model card example",
            limits=KONTEXT_LIMITS,
            sizes_1k=SIZES_1K_KONTEXT,
            max_references=1,
        ),
        ModelSpec(
            id="flux.1-dev",
            family="flux1",
            title="FLUX.1 [dev]",
            repo_id="black-forest-labs/FLUX.1-dev",
            pipeline_class="FluxPipeline",
            modes=frozenset({"generate", "inpaint"}),
            default_steps=28,
            default_guidance=3.5,
            defaults_source="diffusers FluxPipeline defaults (28 steps, guidance 3.5)",
            limits=FLUX1_LIMITS,
            sizes_1k=SIZES_1K,
        ),
        ModelSpec(
            id="flux1.1-pro",
            family="flux1",
            title="FLUX1.1 [pro] (served by FLUX.1 [dev]: the pro weights are closed)",
            repo_id=None,
            pipeline_class="FluxPipeline",
            modes=frozenset({"generate", "inpaint"}),
            default_steps=28,
            default_guidance=3.5,
            defaults_source="alias of flux.1-dev: its defaults",
            limits=FLUX1_LIMITS,
            sizes_1k=SIZES_1K,
            base="flux.1-dev",
            alias=True,
        ),
    )
}

DEFAULT_MODEL = "flux.2-dev"


def get_spec(model_id: str, specs: Mapping[str, ModelSpec] = SPECS) -> ModelSpec:
    try:
        return specs[model_id]
    except KeyError:
        raise ModelNotFound(model_id, list(specs)) from None


def weights_ids(specs: Mapping[str, ModelSpec] = SPECS) -> list[str]:
    """The distinct checkpoints the given specs need (Turbo and the pro alias add none)."""
    return sorted({spec.weights_id for spec in specs.values()})

"""GET /v1/models and /v1/models/{id}: each model with its sizes, defaults, limits and parameters."""

from __future__ import annotations

from fastapi import APIRouter, Request

from pipelines.contract.sizes import fit
from pipelines.contract.specs import ModelSpec, get_spec
from server.declarations.protocol import DECLARATIONS, Model, ModelList
from server.declarations.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])


def describe(
    spec: ModelSpec, created: int, settings: Settings, run_modes: list[dict], detail: bool = False
) -> Model:
    info: dict = {
        "title": spec.title,
        "family": spec.family,
        "root": spec.weights_id,
        "alias_of": spec.base if spec.alias else None,
        "adapter": spec.adapter.name if spec.adapter else None,
        "modes": sorted(spec.modes),
        "default_size": f"{spec.default_size[0]}x{spec.default_size[1]}",
        # What is really generated: the model page's 1K table, snapped to multiples of 16 and fitted.
        "sizes_1k": {ratio: "{}x{}".format(*fit(w, h, spec)) for ratio, (w, h) in spec.sizes_1k.items()},
        "resolutions": sorted(spec.tiers, key=spec.tiers.__getitem__),
        "size_multiple": 16,
        "defaults": {
            "num_inference_steps": spec.default_steps,
            "cfg_scale": spec.default_guidance,
            "source": spec.defaults_source,
        },
        "limits": {
            "max_side": spec.limits.max_side,
            "max_pixels": spec.limits.max_pixels,
            "max_steps": spec.max_steps,
            "cfg_scale": list(spec.guidance_range),
            "max_reference_images": spec.max_references,
            "source": spec.limits.source,
        },
        "parameters": DECLARATIONS.taken_by(spec),
        "prompt_enhancement": spec.enhances_prompt,
        # Per worker: resident / fast / lowvram / offload / cpu, the weights' storage and why; empty until the
        # workers have started.
        "run_modes": run_modes,
        "random_weights": settings.demo or settings.synthetic_weights,
    }
    if settings.demo:
        info["note"] = "demo: tiny random weights, images are noise; small default size"
    elif settings.synthetic_weights:
        info["note"] = "synthetic: full-size random weights for benchmarks, images are noise"
    if detail:
        info["normalisation"] = DECLARATIONS.normalisation(spec)
    owner = "black-forest-labs" if spec.adapter is None else "fal"
    return Model(id=spec.id, created=created, owned_by=owner, **info)


def _run_modes(request: Request, spec: ModelSpec) -> list[dict]:
    pool = getattr(request.app.state, "pool", None)
    return [] if pool is None else pool.modes(spec.weights_id)


@router.get("", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The models this server serves (those whose weights are present)."""
    state = request.app.state
    return ModelList(
        data=[
            describe(s, state.started, state.settings, _run_modes(request, s)) for s in state.specs.values()
        ]
    )


@router.get("/{model_id:path}", response_model=Model)
async def retrieve_model(model_id: str, request: Request) -> Model:
    """One model, with the parameter normalisation table."""
    state = request.app.state
    spec = get_spec(model_id, state.specs)
    return describe(spec, state.started, state.settings, _run_modes(request, spec), detail=True)

"""How a request parameter is declared, and what is derived from the declarations.

A parameter is declared once, as a field of the request models in server/declarations/protocol.py, through
`declare`: its type and bounds (pydantic), how fluxd handles it, what it does, its default (per model where
the model decides), the public page it comes from, and, where not every model takes it, the rule for which do.
From those fields come request validation, the "does this model take it" check of build_request, `/v1/models`
(`parameters`, `normalisation`) and README's parameter table (a test keeps README equal to `markdown_table`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipelines.contract.specs import Family, ModelSpec

Handling = Literal["native", "renamed", "converted", "emulated", "accepted", "passthrough"]
Route = Literal["generations", "edits"]

OPENAI = "OpenAI Images API reference"
LUMENFALL = "Lumenfall model pages"


def declare(
    handling: Handling,
    detail: str,
    source: str,
    *,
    default: object = None,
    model_default: str | None = None,
    families: tuple[Family, ...] | None = None,
    required: bool = False,
    **bounds: Any,
) -> Any:
    """A request field's declaration. `model_default` names the ModelSpec attribute holding the default
    where each model has its own; `families` limits the models that take it (edit-only fields are taken by
    edit models only); `bounds` are pydantic's (ge, le, max_length, ...)."""
    extra: dict[str, Any] = {"x-handling": handling, "x-source": source}
    if families is not None:
        extra["x-families"] = list(families)
    if default is not None:
        extra["x-default"] = default
    if model_default is not None:
        extra["x-model-default"] = model_default
    return Field(... if required else None, description=detail, json_schema_extra=extra, **bounds)


@dataclass(frozen=True)
class Parameter:
    """One declared parameter, as read back from the request models."""

    name: str
    handling: Handling
    detail: str
    source: str
    routes: tuple[Route, ...]
    families: tuple[Family, ...] | None = None
    default: object = None
    model_default: str | None = None

    def takes(self, spec: ModelSpec) -> bool:
        if self.routes == ("edits",) and not spec.modes & {"edit", "inpaint"}:
            return False
        return self.families is None or spec.family in self.families

    def default_for(self, spec: ModelSpec) -> object:
        return getattr(spec, self.model_default) if self.model_default else self.default


# Passthrough has no field: it is every other argument the pipeline's __call__ takes.
PASSTHROUGH = Parameter(
    "*",
    "passthrough",
    "any other argument the pipeline's __call__ takes, as that argument's type (e.g. max_sequence_length; "
    "on FLUX.1 and Kontext negative_prompt with true_cfg_scale > 1, without which it would do nothing and "
    "is a 400); texts are bounded as prompt is; arguments fluxd sets itself (guidance_scale, "
    "num_images_per_prompt, sigmas, ...) are refused with the name of the parameter to use",
    "diffusers pipeline documentation (Flux2Pipeline, FluxPipeline, FluxKontextPipeline)",
    ("generations", "edits"),
)


def _read(models: dict[Route, type[BaseModel]]) -> Iterator[Parameter]:
    seen: dict[str, Parameter] = {}
    for route, model in models.items():
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra
            if not isinstance(extra, dict):
                raise TypeError(f"{model.__name__}.{name} is not declared with {__name__}.declare")
            if name in seen:
                seen[name] = Parameter(**{**seen[name].__dict__, "routes": (*seen[name].routes, route)})
                continue
            seen[name] = Parameter(
                name=name,
                handling=extra["x-handling"],  # type: ignore[arg-type]
                detail=info.description or "",
                source=str(extra["x-source"]),
                routes=(route,),
                families=tuple(extra["x-families"]) if "x-families" in extra else None,  # type: ignore[arg-type]
                default=extra.get("x-default"),
                model_default=extra.get("x-model-default"),  # type: ignore[arg-type]
            )
    yield from seen.values()
    yield PASSTHROUGH


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


class Declarations:
    """Every declared parameter of the request models, in declaration order."""

    def __init__(self, models: dict[Route, type[BaseModel]]) -> None:
        self.parameters = {parameter.name: parameter for parameter in _read(models)}

    def taken_by(self, spec: ModelSpec) -> list[str]:
        return [name for name, p in self.parameters.items() if p is not PASSTHROUGH and p.takes(spec)]

    def normalisation(self, spec: ModelSpec) -> dict[str, dict[str, Any]]:
        """What `/v1/models/{id}` publishes per parameter this model takes."""
        return {
            name: {
                "behaviour": p.handling,
                "detail": p.detail,
                "source": p.source,
                "routes": list(p.routes),
                "default": p.default_for(spec),
            }
            for name, p in self.parameters.items()
            if p.takes(spec)
        }

    def markdown_table(self, specs: dict[str, ModelSpec]) -> str:
        """README's parameter table."""
        rows = [
            "| parameter | routes | behaviour | default | what fluxd does | source |",
            "|---|---|---|---|---|---|",
        ]
        for name, p in self.parameters.items():
            if p.model_default:
                values = {spec.id: getattr(spec, p.model_default) for spec in specs.values()}
                default = ", ".join(f"{model} {_value(value)}" for model, value in values.items())
            else:
                default = "" if p.default is None else json.dumps(p.default).strip('"')
            routes: str = "both" if len(p.routes) == 2 else p.routes[0]
            if p.families is not None:
                routes += f" ({', '.join(p.families)})"
            rows.append(f"| `{name}` | {routes} | {p.handling} | {default} | {p.detail} | {p.source} |")
        return "\n".join(rows) + "\n"

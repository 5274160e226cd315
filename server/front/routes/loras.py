"""GET /v1/loras: the LoRAs a request may name in `loras`, with the models each one fits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from pipelines.contract.lora_catalog import LoraInfo, catalog, family_of
from pipelines.contract.specs import ModelSpec

router = APIRouter(prefix="/v1/loras", tags=["loras"])


class Lora(BaseModel):
    id: str  # what `loras[].path` takes
    object: Literal["lora"] = "lora"
    family: str | None  # flux2 or flux1 (FLUX.1 [dev] and Kontext); None when its header cannot tell
    layout: str
    rank: int
    bytes: int
    models: list[str]


class Unreadable(BaseModel):
    id: str
    error: str


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Lora]
    unreadable: list[Unreadable]


def listing(weights_dir: Path, specs: dict[str, ModelSpec]) -> LoraList:
    data, unreadable = [], []
    for entry in catalog(weights_dir):
        if not isinstance(entry, LoraInfo):
            unreadable.append(Unreadable(id=entry[0], error=entry[1]))
            continue
        info: dict[str, Any] = entry.describe()
        info["models"] = [
            spec.id
            for spec in specs.values()
            if entry.family is None or family_of(spec.family) == entry.family
        ]
        data.append(Lora(**info))
    return LoraList(data=data, unreadable=unreadable)


@router.get("", response_model=LoraList)
async def list_loras(request: Request) -> LoraList:
    """Files under weights/loras/ and LoRA repos in the Hugging Face cache, read from their headers."""
    state = request.app.state
    return await asyncio.to_thread(listing, state.settings.weights_dir, state.specs)

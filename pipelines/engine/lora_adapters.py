"""LoRAs on a worker's loaded checkpoints: loaded unfused into the shared base transformer as PEFT adapters,
kept least recently used first under a byte budget, and switched per batch with `set_adapters`.

A built-in adapter (Turbo, from its model's spec) and the user's LoRAs of a request
(pipelines/contract/lora_catalog.py) are the same thing here: an `Adapter` with a name, a scale and a way to
load it. No base weight is ever copied or changed: PEFT wraps each targeted Linear and adds `scale * B(A(x))`
beside it, so a request without LoRAs runs the base's own weights (`disable_lora`) and a scale of 0 adds
exactly nothing."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.lora_catalog import PARAM, LoraChoice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    """One adapter of a batch: its name in the transformer, its scale, and how to load it when absent."""

    key: str
    scale: float
    load: Callable[[Any, str], None]  # (pipe, key): puts the adapter into the pipeline's transformer
    label: str  # how logs name it


def adapter_bytes(transformer: Any, key: str) -> int:
    """Bytes of one adapter's LoRA matrices in a transformer (PEFT names them `lora_A.<key>.weight`)."""
    marker = f".{key}."
    return sum(
        param.numel() * param.element_size()
        for name, param in transformer.named_parameters()
        if marker in name
    )


def _components_holding(pipe: Any, key: str) -> list[str]:
    return [component for component, keys in pipe.get_list_adapters().items() if key in keys]


def load_user_lora(choice: LoraChoice) -> Callable[[Any, str], None]:
    """The loader of a request's LoRA: diffusers' own converters take each published key layout; any failure
    (wrong family, bad keys, unreadable file) is a 400 naming `loras`."""

    def load(pipe: Any, key: str) -> None:
        try:
            pipe.load_lora_weights(choice.path, adapter_name=key)
        except Exception as exc:  # a client's file may fail in any of diffusers' converters
            if key in {k for keys in pipe.get_list_adapters().values() for k in keys}:
                pipe.delete_adapters(key)
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise InvalidParameter(PARAM, f"LoRA '{choice.name}' does not load on this model: {why}") from exc
        holders = _components_holding(pipe, key)
        if holders != ["transformer"]:
            if holders:
                pipe.delete_adapters(key)
            # Text-encoder LoRAs would change prompt embeddings, which the prompt cache shares per checkpoint.
            why = (
                "none of its keys name a module of this model" if not holders else "it adapts a text encoder"
            )
            raise InvalidParameter(PARAM, f"LoRA '{choice.name}' does not load on this model: {why}.")

    return load


def user_adapters(choices: list[LoraChoice]) -> list[Adapter]:
    return [Adapter(c.key, c.scale, load_user_lora(c), f"'{c.name}'") for c in choices]


class AdapterCache:
    """Adapters loaded per checkpoint, least recently used first; one per worker, beside its Engine."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()  # -> (pipe, bytes)
        self._active: dict[str, tuple[tuple[str, float], ...]] = {}
        self.loads = 0
        self.hits = 0
        self.load_ms = 0.0

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size in self._loaded.values())

    def loaded(self, weights_id: str) -> list[str]:
        return [key for (owner, key) in self._loaded if owner == weights_id]

    def activate(self, pipe: Any, weights_id: str, adapters: list[Adapter]) -> None:
        """Switch `pipe` to exactly `adapters` at their scales (none: the base alone), loading absent ones."""
        for adapter in adapters:
            entry = (weights_id, adapter.key)
            if entry in self._loaded:
                self._loaded.move_to_end(entry)
                self.hits += 1
                continue
            self._active.pop(weights_id, None)  # diffusers activates what it just loaded, alone
            started = time.perf_counter()
            adapter.load(pipe, adapter.key)
            self.load_ms += (time.perf_counter() - started) * 1000
            self.loads += 1
            self._loaded[entry] = (pipe, adapter_bytes(pipe.transformer, adapter.key))
            logger.info(
                "loaded LoRA %s into %s (%d bytes)", adapter.label, weights_id, self._loaded[entry][1]
            )
        self._evict(keep={(weights_id, adapter.key) for adapter in adapters})
        wanted = tuple((adapter.key, adapter.scale) for adapter in adapters)
        if self._active.get(weights_id) == wanted:  # None: unknown, after a load or an eviction
            return
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([key for key, _ in wanted], [scale for _, scale in wanted])
        elif self.loaded(weights_id):
            pipe.disable_lora()
        self._active[weights_id] = wanted

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        """Least recently used adapters leave until the rest fit the budget; those of this batch never do."""
        for entry in list(self._loaded):
            if self.held_bytes <= self.budget_bytes:
                return
            if entry in keep:
                continue
            pipe, size = self._loaded.pop(entry)
            weights_id, key = entry
            pipe.delete_adapters(key)
            self._active.pop(weights_id, None)  # set_adapters runs again: the active list named it
            logger.info(
                "unloaded LoRA %s from %s (%d bytes) to stay within the budget", key, weights_id, size
            )

    def drop(self, weights_id: str) -> None:
        """Forget a checkpoint's adapters: the engine unloaded the checkpoint, and they went with it."""
        for entry in [entry for entry in self._loaded if entry[0] == weights_id]:
            del self._loaded[entry]
        self._active.pop(weights_id, None)

    def counts(self) -> tuple[int, int, float]:
        return self.loads, self.hits, self.load_ms

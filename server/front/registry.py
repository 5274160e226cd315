"""The models one server serves: the built-in specs, the TOML registry's additions, demo overrides, and only
those whose weights are actually present. Torch-free: presence is checked on disk."""

from __future__ import annotations

import logging

from pipelines.contract.presence import adapter_present, checkpoint_present
from pipelines.contract.sizes import parse_pixels
from pipelines.contract.specs import SPECS, ModelSpec
from server.declarations.settings import Settings

logger = logging.getLogger(__name__)


def _pixels(value: str, name: str) -> tuple[int, int]:
    size = parse_pixels(value, name)
    if size is None:
        raise ValueError(f"{name}: expected 'WxH', got '{value}'")
    return size


def configured_specs(settings: Settings) -> dict[str, ModelSpec]:
    """Built-in specs plus the TOML registry's models and aliases, with the demo's small default size."""
    specs = dict(SPECS)
    for model_id, entry in settings.models.items():
        base = specs.get(entry.base or model_id)
        if base is None:
            raise ValueError(f"models.{model_id}: unknown base '{entry.base}'")
        changes: dict[str, object] = {}
        if model_id != base.id:
            changes.update(
                id=model_id, title=f"{model_id} ({base.title})", alias=entry.alias or entry.path is None
            )
            if entry.path:
                changes.update(base=None, checkpoint_path=entry.path)
            else:
                changes["base"] = base.weights_id
        if entry.mode is not None and model_id != base.weights_id and not entry.path:
            raise ValueError(
                f"models.{model_id}.mode: {model_id} runs on the weights of {base.weights_id}; "
                f'set the mode on models."{base.weights_id}"'
            )
        if entry.default_steps is not None:
            changes["default_steps"] = entry.default_steps
        if entry.default_guidance is not None:
            changes["default_guidance"] = entry.default_guidance
        if entry.default_size is not None:
            changes["default_size"] = _pixels(entry.default_size, f"models.{model_id}.default_size")
        specs[model_id] = base.with_overrides(**changes)
    if settings.demo:
        size = _pixels(settings.demo_size, "demo_size")
        specs = {model_id: spec.with_overrides(default_size=size) for model_id, spec in specs.items()}
    return specs


def served_specs(settings: Settings) -> dict[str, ModelSpec]:
    """The configured models whose checkpoint (and adapter) are present."""
    served = {}
    if settings.synthetic_weights:
        # Built from the family's published configs; a registry folder of the user's has no such config here.
        return {m: s for m, s in configured_specs(settings).items() if s.checkpoint_path is None}
    for model_id, spec in configured_specs(settings).items():
        if checkpoint_present(spec, settings.weights_dir) and adapter_present(spec, settings.weights_dir):
            served[model_id] = spec
        else:
            logger.info("not serving %s: its weights are not in %s", model_id, settings.weights_dir)
    return served


def requested_modes(settings: Settings, specs: dict[str, ModelSpec]) -> dict[str, str]:
    """The mode asked of each checkpoint: its own registry entry's, else the server-wide setting."""
    modes: dict[str, str] = {}
    for spec in specs.values():
        entry = settings.models.get(spec.weights_id)
        modes[spec.weights_id] = entry.mode if entry is not None and entry.mode else settings.mode
    return modes

"""How each model runs on the device at hand: resident, fast, low-VRAM, offloaded, or on the CPU.

Pure Python, no torch: the HTTP process reports each model's mode and `fluxd bench gpu` plans with it. The
memory arithmetic uses the parameter counts of the published diffusers configs (measured from the real configs
by tests/integration/test_synthetic.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

from pipelines.contract.specs import SPECS, ModelSpec, get_spec

logger = logging.getLogger(__name__)

Mode = Literal["resident", "fast", "lowvram", "offload", "auto"]
RunMode = Literal["resident", "fast", "lowvram", "offload", "cpu"]
Precision = Literal["bfloat16", "float8", "nf4", "float32"]
Offload = Literal["none", "model", "encoder", "group"]
"""none: every component stays on the GPU. model: one whole component on the GPU at a time (diffusers'
model CPU offload). encoder: the transformer and VAE stay on the GPU while the text encoders stream from CPU
RAM block by block (paid only on a prompt-cache miss). group: every component streams (diffusers' group
offload)."""

MODES: tuple[Mode, ...] = get_args(Mode)
GB = 1e9

# nf4 stores 4 bits per weight plus a 32-bit absmax per block of 64: 4.5 bits.
BYTES_PER_PARAM: dict[Precision, float] = {"bfloat16": 2.0, "float8": 1.0, "nf4": 0.5625, "float32": 4.0}

# Activations at 1024x1024, batch 1 (the VAE decode is the peak, about 2 GB in bf16) plus the CUDA context.
HEADROOM_BYTES = 3 * GB


@dataclass(frozen=True)
class Footprint:
    """Parameter counts of one family's components. `streamed`: what is on the GPU at once when every
    component streams (group offload): the largest component's weights outside its repeated blocks plus
    two blocks, the one running and the one prefetched."""

    transformer: float
    encoders: float
    vae: float
    streamed: float


FOOTPRINTS: dict[str, Footprint] = {
    # 32.2 B transformer, Mistral-Small-3.1 24.0 B (lm_head and vision tower included), 84 M VAE. Streamed:
    # the transformer's 0.80 B outside its blocks + two 0.98 B double blocks (Mistral's comes to 2.49 B).
    "flux2": Footprint(transformer=32.2e9, encoders=24.0e9, vae=0.084e9, streamed=2.78e9),
    # 11.9 B transformer, T5-XXL encoder 4.76 B + CLIP-L text 0.123 B, 84 M VAE. Streamed: the transformer's
    # 0.06 B outside its blocks + two 0.34 B double blocks (T5's comes to 0.52 B).
    "flux1": Footprint(transformer=11.9e9, encoders=4.76e9 + 0.123e9, vae=0.084e9, streamed=0.744e9),
}
FOOTPRINTS["flux1-kontext"] = FOOTPRINTS["flux1"]


@dataclass(frozen=True)
class ResolvedMode:
    """What a model runs as: its mode, the storage of its transformer and text encoders, whether its repeated
    blocks are compiled, the GPU memory that is estimated to take, and why it was chosen."""

    mode: RunMode
    transformer: Precision
    encoder: Precision
    offload: Offload
    compile: bool
    gpu_bytes: int
    reason: str

    def streamed(self, slot: str) -> bool:
        """Whether a component's weights live in CPU memory, moved to the GPU only to run."""
        if self.offload in ("model", "group"):
            return True
        return self.offload == "encoder" and slot.startswith("text_encoder")

    def precision(self, slot: str) -> Precision:
        """The storage of a pipeline component by its slot; the VAE and the rest keep bf16."""
        if slot == "transformer":
            return self.transformer
        return self.encoder if slot.startswith("text_encoder") else "bfloat16"

    def describe(self) -> str:
        return f"{self.mode} (transformer {self.transformer}, encoder {self.encoder}, offload {self.offload})"


@dataclass(frozen=True)
class _Plan:
    mode: RunMode
    transformer: Precision
    encoder: Precision
    offload: Offload = "none"
    compile: bool = False

    @property
    def label(self) -> str:
        offload = "" if self.offload == "none" else f", {self.offload} offload"
        return f"{self.mode} {self.transformer}/{self.encoder}{offload}"

    def gpu_bytes(self, footprint: Footprint) -> int:
        transformer = footprint.transformer * BYTES_PER_PARAM[self.transformer]
        encoders = footprint.encoders * BYTES_PER_PARAM[self.encoder]
        vae = footprint.vae * BYTES_PER_PARAM["bfloat16"]
        if self.offload == "none":
            weights = transformer + encoders
        elif self.offload == "model":
            weights = max(transformer, encoders)
        elif self.offload == "encoder":
            weights = transformer
        else:
            weights = footprint.streamed * BYTES_PER_PARAM[self.transformer]
        return int(weights + vae + HEADROOM_BYTES)

    def resolve(self, footprint: Footprint, reason: str) -> ResolvedMode:
        return ResolvedMode(**dataclasses.asdict(self), gpu_bytes=self.gpu_bytes(footprint), reason=reason)


def _fits(plan: _Plan, footprint: Footprint, gpu_memory_bytes: int) -> bool:
    return plan.gpu_bytes(footprint) <= gpu_memory_bytes


def _gb(value: float) -> str:
    return f"{value / GB:.1f} GB"


def _candidates(requested: Mode, footprint: Footprint, gpu_memory_bytes: int) -> list[_Plan]:
    resident = [_Plan("resident", "bfloat16", "bfloat16"), _Plan("resident", "float8", "float8")]
    fitting_encoder: Precision = next(
        (p.encoder for p in resident if _fits(p, footprint, gpu_memory_bytes)), "float8"
    )
    plans: dict[Mode, list[_Plan]] = {
        "resident": resident,
        "fast": [_Plan("fast", "float8", fitting_encoder, compile=True)],
        "lowvram": [_Plan("lowvram", "nf4", "nf4", offload="model")],
        # Stream only the encoders when the bf16 transformer fits (FLUX.2 on 80 GB), else everything.
        "offload": [
            _Plan("offload", "bfloat16", "bfloat16", offload="encoder"),
            _Plan("offload", "bfloat16", "bfloat16", offload="group"),
        ],
    }
    if requested == "auto":
        return [*plans["resident"], *plans["lowvram"], *plans["offload"]]
    return plans[requested]


def choose_mode(
    model_id: str, gpu_memory_bytes: int | None, requested: str, specs: Mapping[str, ModelSpec] = SPECS
) -> ResolvedMode:
    """Resolve `requested` for `model_id` (in `specs`: the registry's own checkpoints count by their family)
    on a GPU with `gpu_memory_bytes` the process may use (None: no GPU).

    `auto` takes the first that fits of: resident bf16, resident fp8, lowvram, offload. An explicit mode that
    cannot fit is refused rather than silently swapped for another.
    """
    if requested not in MODES:
        raise ValueError(f"mode: unknown value {requested!r}; expected one of {', '.join(MODES)}.")
    spec = get_spec(model_id, specs)
    footprint = FOOTPRINTS[spec.family]
    if gpu_memory_bytes is None:
        asked = "" if requested == "auto" else f" ({requested!r} needs a CUDA GPU)"
        return ResolvedMode(
            "cpu", "float32", "float32", "none", False, 0, f"no CUDA GPU: runs on the CPU{asked}"
        )
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes: must be positive, got {gpu_memory_bytes}.")
    plans = _candidates(cast(Mode, requested), footprint, gpu_memory_bytes)
    for index, plan in enumerate(plans):
        if _fits(plan, footprint, gpu_memory_bytes):
            too_big = "; ".join(f"{p.label} needs {_gb(p.gpu_bytes(footprint))}" for p in plans[:index])
            reason = f"{requested} on {_gb(gpu_memory_bytes)}: {plan.label}, {_gb(plan.gpu_bytes(footprint))}"
            reason += f" ({too_big}: too much)" if too_big else ""
            logger.debug("%s: %s", spec.id, reason)
            return plan.resolve(footprint, reason)
    needed = min(p.gpu_bytes(footprint) for p in plans)
    hint = "" if requested == "auto" else " Use 'auto' to pick the mode that fits."
    raise ValueError(
        f"mode: {requested!r} needs about {_gb(needed)} of GPU memory for {spec.id}; this GPU has "
        f"{_gb(gpu_memory_bytes)}.{hint}"
    )

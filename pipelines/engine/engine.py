"""The worker's model owner: loads checkpoints on first use, switches adapters, runs batches of requests."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.contract.encoding import RAW_RGB
from pipelines.contract.errors import Cancelled, InvalidParameter, ModeUnfit
from pipelines.contract.images import decode_image, fit_reference
from pipelines.contract.lora_catalog import DEFAULT_CACHE_MB, LoraChoice
from pipelines.contract.messages import RenderedImage, RenderRequest, RenderResult
from pipelines.contract.modes import HEADROOM_BYTES, ResolvedMode, choose_mode
from pipelines.contract.specs import SIZE_MULTIPLE, LoraAdapter, ModelSpec
from pipelines.engine import inpaint, loading
from pipelines.engine.acceleration import accelerated
from pipelines.engine.families import Family, flux1, flux2
from pipelines.engine.image_prompts import ImagePrompts
from pipelines.engine.inpaint import Masked
from pipelines.engine.lora_adapters import Adapter, AdapterCache, user_adapters
from pipelines.engine.prompt_cache import PromptCache
from pipelines.engine.safety import FOLDER as SAFETY_FOLDER
from pipelines.engine.safety import SafetyChecker

if TYPE_CHECKING:
    from pipelines.tools.synthetic import Overrides
from pipelines.engine.memory import pipeline_bytes
from pipelines.engine.step_reports import StepHook, StepReports, to_uint8

logger = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {"flux2": flux2, "flux1": flux1, "flux1-kontext": flux1}


@dataclass(frozen=True)
class SyntheticWeights:
    """Serve full-size random weights built from the published configs (pipelines.tools.synthetic) instead of
    checkpoints: for timing and sizing on a GPU that has no real weights."""

    tokenizers: Path  # a folder per weights id holding tokenizer/ (and tokenizer_2/), e.g. the tiny ones
    overrides: Overrides | None = None  # shrunk configs, for tests
    lora_rank: int | None = None  # the synthetic Turbo LoRA's rank; None: pipelines.tools.synthetic.LORA_RANK


def warm_up_shapes(default_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(width, height, images) of the compile warm-up. The first call compiles for the default size; a
    second size makes dynamo recompile with the sequence length dynamic, and a batch of two does the same
    for the batch dimension (dynamo specialises sizes of 1), after which no other size, `n` or reference
    image compiles again (tests/integration/test_run_modes.py counts the graphs)."""
    width, height = default_size
    narrow = max(4 * SIZE_MULTIPLE, width // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return [(width, height, 1), (narrow, height, 1), (narrow, height, 2)]


class Engine:
    """Owns every loaded pipeline of one device. Not thread-safe: one worker loop calls it."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        weights_dir: Path,
        device: str = "cpu",
        memory_budget_bytes: int | None = None,
        prompt_cache_bytes: int = 0,
        modes: Mapping[str, str] | None = None,
        synthetic: SyntheticWeights | None = None,
        safety: SafetyChecker | None = None,
        lora_cache_bytes: int = DEFAULT_CACHE_MB * 2**20,
    ) -> None:
        self.specs = specs
        self.weights_dir = weights_dir
        self.device = device
        self.memory_budget_bytes = memory_budget_bytes
        self._pipelines: dict[str, Any] = {}  # insertion order = least recently used first
        self.adapters = AdapterCache(lora_cache_bytes)
        self.prompts = PromptCache(prompt_cache_bytes)
        self.gpu_bytes = self._gpu_bytes()
        self.modes = self._resolve_modes(modes or {})
        self.synthetic = synthetic
        # Checks the images of requests that ask for it after decode (a note says so where it is absent).
        self.safety = safety or SafetyChecker(weights_dir / SAFETY_FOLDER, device=device)
        self.image_prompts = ImagePrompts(weights_dir, device)  # FLUX.1 Redux, loaded on first use

    def _gpu_bytes(self) -> int | None:
        """GPU memory this worker may use for models: the device's, or less when a memory budget says so,
        less what the prompt cache may hold (it keeps its embeddings on the device)."""
        if not self.device.startswith("cuda"):
            return None
        total = int(torch.cuda.get_device_properties(torch.device(self.device)).total_memory)
        available = min(total, self.memory_budget_bytes) if self.memory_budget_bytes else total
        return available - self.prompts.budget_bytes

    def _resolve_modes(self, requested: Mapping[str, str]) -> dict[str, ResolvedMode | ModeUnfit]:
        """Each checkpoint's mode on this device (`auto` unless `requested` names one), or why none fits."""
        modes: dict[str, ResolvedMode | ModeUnfit] = {}
        for weights_id in sorted({spec.weights_id for spec in self.specs.values()}):
            try:
                asked = requested.get(weights_id, "auto")
                modes[weights_id] = choose_mode(weights_id, self.gpu_bytes, asked, self.specs)
            except ValueError as exc:
                modes[weights_id] = ModeUnfit(weights_id, str(exc))
            resolved = modes[weights_id]
            logger.info("%s on %s: %s", weights_id, self.device, getattr(resolved, "reason", resolved))
        return modes

    def mode(self, weights_id: str) -> ResolvedMode:
        resolved = self.modes[weights_id]
        if isinstance(resolved, ModeUnfit):
            raise resolved
        return resolved

    def warm_up(self) -> None:
        """Run two steps of every model whose transformer is compiled, each adapter on its own, at the shapes
        of `warm_up_shapes`: compilation happens here, at start-up, and never on a client's request. Adapters
        are all loaded first: injecting a LoRA changes the modules the compiled graphs were traced on."""
        specs = [
            spec
            for spec in self.specs.values()
            if not spec.alias and getattr(self.modes[spec.weights_id], "compile", False)
        ]
        for spec in specs:
            self.pipeline(spec)
        for spec in specs:
            pipe = self.pipeline(spec)
            started = time.perf_counter()
            for width, height, n in warm_up_shapes(spec.default_size):
                pipe(
                    prompt=["warm-up"] * n,
                    width=width,
                    height=height,
                    num_inference_steps=2,
                    output_type="latent",
                )
            logger.info("warmed up %s in %.1f s", spec.id, time.perf_counter() - started)

    def pipeline(self, spec: ModelSpec, loras: list[LoraChoice] | None = None) -> Any:
        """The loaded pipeline for `spec`, with its own adapter (Turbo) and the request's LoRAs, and only
        those, switched on."""
        pipe = self._pipelines.get(spec.weights_id)
        if pipe is None:
            base = self.specs.get(spec.weights_id, spec)
            self._make_room(spec.weights_id)
            pipe = self._load(base)
            self._pipelines[spec.weights_id] = pipe
            # Adapters fluxd loads (Turbo, the users': pipelines/engine/lora_adapters.py refuses text-encoder
            # LoRAs) touch only the transformer, so a LoRA'd model shares its base's encoder outputs: the
            # scope is the checkpoint.
            self.prompts.install(pipe, spec.weights_id, FAMILIES[base.family].EMBEDS)
            self._evict_beyond_budget(keep=spec.weights_id)
        else:
            self._pipelines[spec.weights_id] = self._pipelines.pop(spec.weights_id)
        builtin = spec.adapter
        own = [] if builtin is None else [self._builtin_adapter(spec, builtin)]
        self.adapters.activate(pipe, spec.weights_id, own + user_adapters(loras or []))
        return pipe

    def _builtin_adapter(self, spec: ModelSpec, adapter: LoraAdapter) -> Adapter:
        return Adapter(
            adapter.name,
            1.0,
            lambda pipe, _key: self._load_adapter(pipe, spec, adapter),
            spec.id,
        )

    def _load(self, base: ModelSpec) -> Any:
        mode = self.mode(base.weights_id)
        if self.synthetic is not None:
            from pipelines.tools.synthetic import synthetic_pipeline

            tokenizers = self.synthetic.tokenizers / base.weights_id
            return synthetic_pipeline(base.id, mode, self.device, tokenizers, self.synthetic.overrides)
        return loading.load_pipeline(loading.locate_checkpoint(base, self.weights_dir), self.device, mode)

    def _load_adapter(self, pipe: Any, spec: ModelSpec, adapter: LoraAdapter) -> None:
        if self.synthetic is not None:
            from pipelines.tools.synthetic import LORA_RANK, add_random_lora

            add_random_lora(pipe, adapter.name, self.synthetic.lora_rank or LORA_RANK)
            return
        folder = loading.locate_adapter(spec, adapter, self.weights_dir)
        pipe.load_lora_weights(folder, weight_name=adapter.weight_name, adapter_name=adapter.name)

    def _adapter_timings(self, before: tuple[int, int, float]) -> dict[str, float]:
        loads, hits, load_ms = (now - then for now, then in zip(self.adapters.counts(), before, strict=True))
        return {"lora_loads": loads, "lora_cache_hits": hits, "lora_load": load_ms}

    def describe_modes(self) -> dict[str, dict[str, Any]]:
        """Per checkpoint, what it runs as on this device (or why it cannot run), for /v1/models."""
        return {
            weights_id: dataclasses.asdict(resolved)
            if isinstance(resolved, ResolvedMode)
            else {"mode": None, "error": resolved.message}
            for weights_id, resolved in self.modes.items()
        }

    def loaded(self) -> list[str]:
        return sorted(self._pipelines)

    def _make_room(self, incoming: str) -> None:
        """On a GPU, unload least recently used checkpoints until the incoming one's estimated memory fits
        beside the others' weights: loaded first, it would run out of memory before anything could go."""
        budget = self.gpu_bytes
        if budget is None:
            return
        need = self.mode(incoming).gpu_bytes  # its weights and the activation headroom of one call
        self._unload_while(
            lambda: need + sum(self.mode(w).gpu_bytes - HEADROOM_BYTES for w in self._pipelines) > budget,
            "to make room on the GPU for " + incoming,
        )

    def _evict_beyond_budget(self, keep: str) -> None:
        """After a load, on any device: the loaded weights' actual bytes stay within --memory-budget-gb."""
        budget = self.memory_budget_bytes
        if budget is None:
            return
        self._unload_while(
            lambda: sum(pipeline_bytes(pipe, self.device) for pipe in self._pipelines.values()) > budget,
            "to stay within the budget",
            keep,
        )

    def _unload_while(self, over: Callable[[], bool], why: str, keep: str | None = None) -> None:
        """Least recently used checkpoints leave first, never `keep`, until `over()` is false."""
        while over():
            victims = [weights_id for weights_id in self._pipelines if weights_id != keep]
            if not victims:
                return
            self._unload(victims[0], why)

    def _unload(self, weights_id: str, why: str) -> None:
        del self._pipelines[weights_id]
        self.adapters.drop(weights_id)
        self.prompts.drop(weights_id)
        logger.info("unloaded %s %s", weights_id, why)
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def device_memory(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.memory_allocated(torch.device(self.device)))
        return 0

    def render(self, batch: list[RenderRequest], on_step: StepHook | None = None) -> list[RenderResult]:
        """Run requests that share model, size, steps, guidance and references as one pipeline call.

        The front validated every request against its model's spec; what is checked here is what only this
        worker knows: its run mode, and what the pipeline itself makes of passed-through arguments."""
        first = batch[0]
        spec = self.specs[first.model]
        family = FAMILIES[spec.family]
        if any(request.enhance_prompt for request in batch):
            self._check_enhancement(spec)
        started = time.perf_counter()
        adapter_counts = self.adapters.counts()
        pipe = self.pipeline(spec, first.loras)
        references = [
            fit_reference(decode_image(data, "image"), spec.min_reference_side, spec.max_reference_aspect)
            for data in first.images
        ]
        timings: dict[str, float] = {"load": (time.perf_counter() - started) * 1000}
        hits, misses = self.prompts.hits, self.prompts.misses
        revised = [
            family.enhance(pipe, request.prompt, references, request.enhance_temperature, request.seeds[0])
            if request.enhance_prompt
            else None
            for request in batch
        ]
        prompts = [new or request.prompt for request, new in zip(batch, revised, strict=True)]
        masked = None if first.mask is None else Masked.of(batch, first.width, first.height)
        steps = StepReports(batch, family, on_step, masked)
        started = time.perf_counter()
        kwargs = {
            **_inputs(batch, prompts),
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "output_type": "np",
            "callback_on_step_end": steps,
            **family.call_kwargs(spec, pipe, references, first.width, first.height, first.steps),
        }
        extra = first.extra
        if first.image_prompt is not None:
            kwargs, extra = self.image_prompts.prepare(pipe, kwargs, batch, extra)
        if masked is not None:
            pipe, kwargs = inpaint.prepare(spec.family, pipe, kwargs, masked)
        with accelerated(pipe, first.acceleration, first.steps):
            images = _call(pipe, kwargs, extra)
        if masked is not None:
            images = masked.composite(images)
        timings.update(run=(time.perf_counter() - started) * 1000, previews=steps.preview_ms)
        timings["batch_images"] = len(images)
        logger.info(
            "rendered %d image(s) of %s at %dx%d, %d steps in %.0f ms",
            len(images),
            spec.id,
            first.width,
            first.height,
            first.steps,
            timings["run"],
        )
        lookups = (self.prompts.hits - hits, self.prompts.misses - misses)
        results = _results(batch, images, revised, timings, lookups)
        # Like the prompt cache's, the adapter counts go with the first result only.
        results[0].timings_ms.update(self._adapter_timings(adapter_counts))
        self.safety.apply(batch, results)
        return results

    def _check_enhancement(self, spec: ModelSpec) -> None:
        """Whether this worker can rewrite prompts with `spec`'s language model, before anything loads."""
        mode = self.mode(spec.weights_id)
        if mode.offload in ("encoder", "group"):
            # Streamed block by block, the encoder would cross PCIe once per generated token.
            raise InvalidParameter(
                "prompt_enhancement",
                f"'{spec.id}' runs with its text encoder streamed from CPU memory on this server "
                f"({mode.mode} mode), too slow to generate a prompt with.",
            )


def _inputs(batch: list[RenderRequest], prompts: list[str]) -> dict[str, list]:
    """One prompt and one generator per image: image i of a request gets its own seed."""
    rows = [(prompt, seed) for request, prompt in zip(batch, prompts, strict=True) for seed in request.seeds]
    return {
        "prompt": [prompt for prompt, _ in rows],
        # CPU generators: the same seed gives the same noise on every device.
        "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in rows],
    }


def _call(pipe: Any, kwargs: dict[str, Any], extra: dict[str, Any]) -> np.ndarray:
    """The pipeline call with the client's passed-through arguments, as uint8 pixels (images x H x W x 3)."""
    try:
        return to_uint8(pipe(**kwargs, **extra).images)
    except Cancelled:
        pipe.maybe_free_model_hooks()  # what the call would have done at its end: offload hooks reset
        raise
    except (ValueError, TypeError) as exc:
        if not extra:
            raise
        # With client-supplied pipeline arguments in the call, a ValueError is most likely theirs.
        raise InvalidParameter(next(iter(extra)), f"The pipeline rejected the arguments: {exc}") from exc


def _results(
    batch: list[RenderRequest],
    images: np.ndarray,
    revised: list[str | None],
    timings: dict[str, float],
    lookups: tuple[int, int],
) -> list[RenderResult]:
    """Each request's images, in the batch's order. The prompt cache works on the batch's prompts as a
    whole: its counts go with the first result only, so that a sum over results counts each lookup once."""
    results: list[RenderResult] = []
    offset = 0
    for index, (request, revised_prompt) in enumerate(zip(batch, revised, strict=True)):
        rendered = [
            RenderedImage(images[offset + i].tobytes(), RAW_RGB, images.shape[2], images.shape[1], seed)
            for i, seed in enumerate(request.seeds)
        ]
        offset += request.n
        hits, misses = lookups if index == 0 else (0, 0)
        timings = {**timings, "prompt_cache_hits": hits, "prompt_cache_misses": misses}
        results.append(
            RenderResult(request.id, rendered, revised_prompt, timings, acceleration=request.acceleration)
        )
    return results

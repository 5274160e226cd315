"""Per-request step caching (`acceleration`): diffusers' TaylorSeer cache hook on the whole transformer.

On a step the cache skips, no transformer block runs: the transformer's output is forecast from the last full
evaluations with a first-order Taylor expansion (TaylorSeer, arXiv 2503.06923; its "lite" form, which
caches only the transformer's output, as OpenVINO GenAI's diffusion caching does). The first
`WARM_UP_STEPS` and the last `FINAL_STEPS` steps always run in full; in between one step in
`cache_interval` does. At 28 steps that is 16 full evaluations at `regular` (1.75x fewer) and 13 at `high`
(2.15x fewer), in the range published step caches reach on these models: 1.7-1.8x on FLUX.1, and on FLUX.2
[dev] 1.83x (TeaCache) and 1.69x (Cache-DiT) in vLLM-Omni's measurements.

Why TaylorSeer, on the transformer's root, for every family (each checked on the tiny checkpoints with
diffusers 0.42.1): its schedule is fixed, so the saving does not depend on the prompt or on calibration;
FirstBlockCacheConfig fails on FLUX.2's blocks (a TypeError in its residual) and skips nothing on FLUX.1's
random tiny weights; MagCacheConfig needs per-model magnitude ratios (diffusers ships FLUX.1's only).
Hooking the transformer itself rather than its blocks (diffusers' `use_lite_mode` hooks every block) keeps
the hook outside the blocks `compile_repeated_blocks` compiles, so a compiled worker does not recompile.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import TaylorSeerCacheConfig
from diffusers.hooks import HookRegistry, ModelHook

WARM_UP_STEPS = 3  # full steps that seed the forecast (diffusers' default disable_cache_before_step)
FINAL_STEPS = 2  # the last steps, which set fine detail, always run in full (as OpenVINO GenAI's default)
# One step in `cache_interval` runs the transformer between the warm-up and the final steps.
INTERVALS: dict[str, int] = {"regular": 2, "high": 3}
_BLOCK = re.compile(r"^[^.]*blocks\.\d+$")  # transformer_blocks.i and single_transformer_blocks.i


def cache_config(level: str, steps: int) -> Any:
    """The diffusers cache config of `level` for a call of `steps` steps; None for "none"."""
    if level == "none":
        return None
    return TaylorSeerCacheConfig(
        cache_interval=INTERVALS[level],
        disable_cache_before_step=WARM_UP_STEPS,
        disable_cache_after_step=max(WARM_UP_STEPS, steps - FINAL_STEPS),
        cache_identifiers=["^$"],  # the transformer module itself (its name in named_modules is "")
        taylor_factors_dtype=torch.float32,
    )


def full_evaluations(level: str, steps: int) -> int:
    """How many of `steps` steps run the whole transformer at `level`, by TaylorSeer's own schedule."""
    config = cache_config(level, steps)
    if config is None:
        return steps
    before, after = config.disable_cache_before_step, config.disable_cache_after_step
    return sum(
        1 for s in range(steps) if s < before or s >= after or (s - before - 1) % config.cache_interval == 0
    )


@contextmanager
def accelerated(pipe: Any, level: str, steps: int) -> Iterator[None]:
    """Step caching at `level` on `pipe`'s transformer for the pipeline call made inside; nothing at "none".
    The hooks leave with the call, and their state with them: the next call, at any level, starts clean."""
    config = cache_config(level, steps)
    if config is None:
        yield
        return
    transformer = pipe.transformer
    transformer.enable_cache(config)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    # Registered last, so it wraps the cache hook: it runs first and returns last.
    registry.register_hook(Branches(lambda: pipe.current_timestep), _BRANCHES_HOOK)
    try:
        yield
    finally:
        registry.remove_hook(_BRANCHES_HOOK, recurse=False)
        transformer.disable_cache()


_BRANCHES_HOOK = "fluxd_branches"


class Branches(ModelHook):
    """Runs each transformer call in the cache context of its branch, and hands the pipeline a tuple.

    Context: diffusers' cache hooks keep one forecast per cache context, but only FluxPipeline opens them
    ("cond", "uncond"); Flux2Pipeline and FluxKontextPipeline call their transformer in none (which the hooks
    refuse), and Kontext's true CFG calls it twice a step, whose two outputs must not share one forecast. The
    i-th call at the same denoising step (the pipeline's `current_timestep`, compared by identity: no device
    sync) is branch i.

    Tuple: the pipelines call the transformer with return_dict=False and take `[0]` of its tuple; TaylorSeer
    returns its forecast of a one-element output as the bare tensor, whose `[0]` would be the batch's first
    image (a batch of n would get image 0's forecast n times)."""

    def __init__(self, current_timestep: Callable[[], object]) -> None:
        super().__init__()
        self.current_timestep = current_timestep
        self.step: object = None
        self.branch = 0

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.current_timestep()
        self.branch = self.branch + 1 if step is not None and step is self.step else 0
        self.step = step
        with module.cache_context(f"branch-{self.branch}"):  # type: ignore[operator]
            output = self.fn_ref.original_forward(*args, **kwargs)  # type: ignore[misc]
        return (output,) if isinstance(output, torch.Tensor) else output


class EvaluationCounter:
    """Counts the transformer's full evaluations: the calls of its blocks divided by their number.

    Forward hooks on the blocks (torch's, which fire on every call of a block) see what really ran: a step the
    cache forecasts calls no block."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        blocks = [module for name, module in transformer.named_modules() if _BLOCK.match(name)]
        self.blocks = len(blocks)
        self.calls = 0
        self._handles = [block.register_forward_hook(self._count) for block in blocks]

    def _count(self, *_: Any) -> None:
        self.calls += 1

    @property
    def evaluations(self) -> float:
        return self.calls / self.blocks if self.blocks else 0.0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def counting(transformer: torch.nn.Module) -> Iterator[EvaluationCounter]:
    counter = EvaluationCounter(transformer)
    try:
        yield counter
    finally:
        counter.close()

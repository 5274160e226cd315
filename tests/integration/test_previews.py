"""Partial images: decoded from the step latents by each family's own helpers, at evenly spaced steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.contract.messages import Progress, RenderRequest
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import FAMILIES, Engine
from pipelines.engine.step_reports import preview_steps, to_uint8
from tests.imagery import png

FAMILY_MODELS = ["flux.2-dev", "flux.1-dev", "flux.1-kontext-dev"]


def request(model: str, seed: int, partial_images: int, steps: int = 6, **fields) -> RenderRequest:
    return RenderRequest(
        id=f"{model}-{seed}",
        model=model,
        prompt="a red fox",
        width=fields.pop("width", 64),
        height=fields.pop("height", 48),
        steps=steps,
        guidance=SPECS[model].default_guidance,
        seeds=[seed],
        partial_images=partial_images,
        **fields,
    )


def render(engine: Engine, batch: list[RenderRequest]) -> tuple[list[Progress], dict[str, np.ndarray]]:
    reports: list[Progress] = []
    results = engine.render(batch, lambda progress, _pipe: reports.append(progress) or False)
    finals = {
        r.id: np.frombuffer(r.images[0].data, np.uint8).reshape(r.images[0].height, r.images[0].width, 3)
        for r in results
    }
    return reports, finals


def pixels(progress: Progress) -> np.ndarray:
    assert progress.preview is not None
    image = progress.preview
    return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)


@pytest.mark.parametrize(
    ("total", "count", "steps"),
    [(28, 3, {7, 14, 21}), (6, 2, {2, 4}), (4, 1, {2}), (2, 2, {1}), (1, 3, set()), (50, 0, set())],
)
def test_preview_steps_are_evenly_spaced_and_never_the_last(total: int, count: int, steps: set[int]) -> None:
    assert preview_steps(total, count) == steps


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_preview_of_the_last_latents_is_the_final_image(engine: Engine, model: str) -> None:
    # The decode a preview uses is the pipeline's own: applied to the final latents it gives the output.
    spec = SPECS[model]
    family = FAMILIES[spec.family]
    pipe = engine.pipeline(spec)
    references = [Image.new("RGB", (64, 64), (20, 90, 200))] if spec.family == "flux1-kontext" else []
    kwargs = {
        "prompt": "a red fox",
        "width": 64,
        "height": 48,
        "num_inference_steps": 2,
        "guidance_scale": spec.default_guidance,
        **family.call_kwargs(spec, pipe, references, 64, 48, 2),
    }
    final = pipe(**kwargs, generator=torch.Generator().manual_seed(4), output_type="np").images
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(4), output_type="latent").images
    with torch.no_grad():
        decoded = to_uint8(family.preview(pipe, latents, 64, 48))
    assert decoded.shape == (1, 48, 64, 3)
    assert np.abs(decoded.astype(int) - to_uint8(final).astype(int)).max() <= 1


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_partial_images_arrive_at_their_steps_with_the_final_size(engine: Engine, model: str) -> None:
    images = [] if model == "flux.1-dev" else [png(64, 64)]
    reports, finals = render(engine, [request(model, 3, 2, width=80, images=images)])
    assert [p.step for p in reports] == [1, 2, 3, 4, 5, 6]
    with_preview = [p for p in reports if p.preview is not None]
    assert [p.step for p in with_preview] == [2, 4]
    for progress in with_preview:
        image = pixels(progress)
        assert image.shape == (48, 80, 3) and image.std() > 0
    assert not np.array_equal(pixels(with_preview[-1]), finals[f"{model}-3"])


def test_each_request_of_a_batch_gets_its_own_preview(engine: Engine) -> None:
    a, b, quiet = request("flux.2-dev", 1, 1), request("flux.2-dev", 2, 1), request("flux.2-dev", 5, 0)
    reports, _ = render(engine, [a, b, quiet])
    previews = {p.id: pixels(p) for p in reports if p.preview is not None}
    assert set(previews) == {a.id, b.id}
    assert not np.array_equal(previews[a.id], previews[b.id])
    alone, _ = render(engine, [request("flux.2-dev", 2, 1)])
    [b_alone] = [pixels(p) for p in alone if p.preview is not None]
    assert np.abs(previews[b.id].astype(int) - b_alone.astype(int)).max() <= 1


def test_no_previews_unless_asked(engine: Engine) -> None:
    reports, _ = render(engine, [request("flux.1-dev", 1, 0)])
    assert len(reports) == 6 and all(p.preview is None for p in reports)


def cpu_ms(work: Callable[[], object]) -> float:
    """CPU time of one thread: other processes on a loaded machine inflate neither it nor spin-waits."""
    started = time.process_time()
    work()
    return (time.process_time() - started) * 1000


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.1-dev"])
def test_tiny_preview_cost_relative_to_a_step(engine: Engine, model: str) -> None:
    """Prints one preview's cost in denoising steps on the tiny checkpoints at the demo size. Their
    transformer is nearly free, so a preview costs several steps here; the full-size count is below."""
    spec = SPECS[model]
    pipe = engine.pipeline(spec)
    latents = torch.randn(1, (256 // 16) ** 2, pipe.transformer.config.in_channels)

    def render(steps: int) -> None:
        engine.render([request(model, 1, 0, steps, width=256, height=256)])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {steps: min(cpu_ms(partial(render, steps)) for _ in "ab") for steps in (10, 2)}
        with torch.no_grad():
            preview_ms = min(
                cpu_ms(lambda: to_uint8(FAMILIES[spec.family].preview(pipe, latents, 256, 256)))
                for _ in "abc"
            )
    finally:
        torch.set_num_threads(threads)
    # The difference of two runs leaves out prompt encoding and the final decode: steps only.
    step_ms = (runs[10] - runs[2]) / 8
    ratio = preview_ms / step_ms
    print(f"\n{model} tiny 256x256: preview {preview_ms:.0f} ms = {ratio:.1f} steps of {step_ms:.0f} ms")
    assert preview_ms > 0


@pytest.mark.parametrize(("family", "steps"), [("flux1", 28), ("flux2", 28)])
def test_at_full_size_a_preview_costs_a_fraction_of_a_step(family: str, steps: int) -> None:
    """Counted, not timed: the published architectures on the meta device, at 1024x1024 with 512 text
    tokens. Printed: one preview's VAE decode relative to one transformer step, and three previews
    relative to a default run."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.tools.synthetic import build_components

    models = build_components(family, None, torch.float32)
    transformer, vae = models["transformer"], models["vae"]
    tokens, text = (1024 // 16) ** 2, 512
    meta = {"device": "meta", "dtype": torch.float32}
    inputs = {
        "hidden_states": torch.empty(1, tokens, transformer.config.in_channels, **meta),
        "encoder_hidden_states": torch.empty(1, text, transformer.config.joint_attention_dim, **meta),
        "timestep": torch.empty(1, **meta),
        "guidance": torch.empty(1, **meta),
        "return_dict": False,
    }
    if family == "flux1":
        inputs["pooled_projections"] = torch.empty(1, transformer.config.pooled_projection_dim, **meta)
        inputs |= {"txt_ids": torch.zeros(text, 3), "img_ids": torch.zeros(tokens, 3)}
    else:
        inputs |= {"txt_ids": torch.zeros(1, text, 4), "img_ids": torch.zeros(1, tokens, 4)}
    latents = torch.empty(1, vae.config.latent_channels, 1024 // 8, 1024 // 8, **meta)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        transformer(**inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        vae.decode(latents, return_dict=False)
    ratio = decode.get_total_flops() / step.get_total_flops()
    print(
        f"\n{family} 1024x1024: step {step.get_total_flops() / 1e12:.0f} TFLOP, preview "
        f"{decode.get_total_flops() / 1e12:.1f} TFLOP = {ratio:.3f} step; 3 previews in {steps} steps "
        f"= +{3 * ratio / steps:.1%}"
    )
    assert ratio < 0.25

"""Full-size models with random weights, built from the real published configurations in configs/.

Speed and memory depend on shapes and dtypes, not on weight values, so a model built from its real config
with random weights times and sizes like the real one. Each model is first built on
the meta device (parameters without storage, cheap at any size), then materialised straight on the target
device in the target dtype; a GPU build never stages weights in CPU memory.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from pipelines.contract.modes import ResolvedMode
    from pipelines.contract.specs import Pipeline

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
# fal's Turbo file could not be read here, so the rank of its synthetic stand-in is an assumption, on the
# costly side.
LORA_RANK = 256
SCHEDULER_CONFIG = "flow-match-scheduler"

Component = Literal[
    "flux2-transformer",
    "flux2-vae",
    "mistral3-text-encoder",
    "flux1-transformer",
    "flux1-vae",
    "t5-xxl-encoder",
    "clip-l-text-encoder",
]


@dataclass(frozen=True)
class _Recipe:
    library: Literal["diffusers", "transformers"]
    class_name: str


# Each component's config file in configs/ is named after the component.
RECIPES: dict[Component, _Recipe] = {
    "flux2-transformer": _Recipe("diffusers", "Flux2Transformer2DModel"),
    "flux2-vae": _Recipe("diffusers", "AutoencoderKLFlux2"),
    "mistral3-text-encoder": _Recipe("transformers", "Mistral3ForConditionalGeneration"),
    "flux1-transformer": _Recipe("diffusers", "FluxTransformer2DModel"),
    "flux1-vae": _Recipe("diffusers", "AutoencoderKL"),
    "t5-xxl-encoder": _Recipe("transformers", "T5EncoderModel"),
    "clip-l-text-encoder": _Recipe("transformers", "CLIPTextModel"),
}

# Pipeline slot -> component, per model family (pipelines.contract.specs.ModelSpec.family).
FAMILY_COMPONENTS: dict[str, dict[str, Component]] = {
    "flux2": {
        "transformer": "flux2-transformer",
        "vae": "flux2-vae",
        "text_encoder": "mistral3-text-encoder",
    },
    "flux1": {
        "transformer": "flux1-transformer",
        "vae": "flux1-vae",
        "text_encoder": "clip-l-text-encoder",
        "text_encoder_2": "t5-xxl-encoder",
    },
}
FAMILY_COMPONENTS["flux1-kontext"] = FAMILY_COMPONENTS["flux1"]

# Tokenizer slot -> loader class, read from the subfolder of the same name (the repos' layout).
FAMILY_TOKENIZERS: dict[str, dict[str, str]] = {
    "flux2": {"tokenizer": "AutoProcessor"},
    "flux1": {"tokenizer": "AutoTokenizer", "tokenizer_2": "AutoTokenizer"},
}
FAMILY_TOKENIZERS["flux1-kontext"] = FAMILY_TOKENIZERS["flux1"]


def load_config(name: str) -> dict[str, Any]:
    """The JSON of configs/<name>.json, its `_source` note included."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"name: no config {name!r}; known: {', '.join(known)}")
    return json.loads(path.read_text(encoding="utf-8"))


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def component_config(component: Component, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A component's constructor config: its file without the metadata keys, with `overrides` merged in."""
    config = {key: value for key, value in load_config(component).items() if not key.startswith("_")}
    return _merged(config, overrides or {})


def build_meta(component: Component, overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The component's real architecture with parameters on the meta device (buffers, all tiny, on the CPU).

    `overrides` shrinks or alters the config, nested keys (`text_config`) merged rather than replaced.
    """
    from accelerate import init_empty_weights

    recipe = RECIPES[component]
    cls = getattr(importlib.import_module(recipe.library), recipe.class_name)
    config = component_config(component, overrides)
    # Buffers stay real: rotary tables and position ids are computed at construction, and to_empty would
    # leave them as garbage.
    with init_empty_weights(include_buffers=False):
        if recipe.library == "diffusers":
            return cls.from_config(config)
        model = cls(cls.config_class(**config))
    # accelerate rewraps every parameter assigned under its patch, which unties the ones __init__ tied
    # (T5's encoder.embed_tokens and shared): tie them again.
    model.tie_weights()
    return model


def parameter_count(component: Component, overrides: Mapping[str, Any] | None = None) -> int:
    """Parameters of the component, tied ones counted once."""
    return sum(p.numel() for p in build_meta(component, overrides).parameters())


def _fill(tensor: torch.Tensor, name: str, generator: torch.Generator, std: float) -> None:
    if name.endswith("bias"):
        tensor.zero_()
    elif tensor.ndim == 1:
        tensor.fill_(1.0)  # norm scales: keep activations at their usual magnitude
    else:
        tensor.normal_(0.0, std, generator=generator)


def materialise(
    module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> torch.nn.Module:
    """Give every meta parameter of `module` storage on `device` in `dtype`, filled with cheap random values.

    Allocated and filled on the device itself. Parameters that already have storage are left alone, so a
    large model can be materialised (and quantised) one block at a time, then as a whole for the rest.
    Shared parameters stay shared. Buffers move to `device` keeping their dtype, as from_pretrained keeps
    rotary tables in float32.
    """
    import torch

    target = torch.device(device)
    generator = torch.Generator(device=target).manual_seed(seed)
    fresh: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in list(submodule._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in fresh:
                    storage = dtype if param.is_floating_point() else param.dtype
                    data = torch.empty(param.shape, device=target, dtype=storage)
                    _fill(data, name, generator, std)
                    fresh[id(param)] = torch.nn.Parameter(data, requires_grad=False)
                submodule._parameters[name] = fresh[id(param)]
            for name, buffer in list(submodule._buffers.items()):
                if buffer is None or buffer.device == target:
                    continue
                if buffer.is_meta:
                    raise ValueError(f"buffer {name!r} has no values: build the module with build_meta")
                submodule._buffers[name] = buffer.to(target)
    logger.debug("materialised %d parameters of %s on %s", len(fresh), type(module).__name__, target)
    return module


Overrides = Mapping[Component, Mapping[str, Any]]


def build_components(
    family: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    seed: int = 0,
    overrides: Overrides | None = None,
) -> dict[str, torch.nn.Module]:
    """The family's synthetic models by pipeline slot; left on the meta device when `device` is None."""
    models: dict[str, torch.nn.Module] = {}
    for index, (slot, component) in enumerate(FAMILY_COMPONENTS[family].items()):
        model = build_meta(component, (overrides or {}).get(component)).eval()
        if device is not None:
            materialise(model, device, dtype, seed + index)
        models[slot] = model
    return models


def build_pipeline(
    model_id: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    tokenizer_dir: Path,
    seed: int = 0,
    overrides: Overrides | None = None,
) -> Pipeline:
    """The diffusers pipeline of `model_id` (Flux2Pipeline, FluxKontextPipeline, FluxPipeline) from
    synthetic components materialised on `device` in `dtype` (None: left on the meta device, for the caller
    to materialise and quantise piecewise).

    `tokenizer_dir` is laid out like the model's repo: `tokenizer/` (and `tokenizer_2/` for FLUX.1), as in a
    real checkpoint folder or one that pipelines.tools.tiny writes. Tokenizers only set token ids; every
    sequence is padded to the pipeline's fixed length, so tiny ones give the real shapes. `overrides` (per
    component) shrinks configs, for tests."""
    import diffusers
    import transformers

    from pipelines.contract.specs import get_spec

    spec = get_spec(model_id)
    tokenizers = {
        slot: getattr(transformers, loader).from_pretrained(tokenizer_dir / slot)
        for slot, loader in FAMILY_TOKENIZERS[spec.family].items()
    }
    scheduler_config = {k: v for k, v in load_config(SCHEDULER_CONFIG).items() if k != "_source"}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    models = build_components(spec.family, device, dtype, seed, overrides)
    logger.info("built synthetic %s (%s) on %s in %s", spec.id, spec.pipeline_class, device or "meta", dtype)
    pipeline_class = getattr(diffusers, spec.pipeline_class)
    return pipeline_class(scheduler=scheduler, **models, **tokenizers)


def block_lists(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Blocks of the outermost ModuleLists: the repeated layers that hold nearly all the weights."""
    import torch

    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(f"{t}.") for t in taken):
            taken.append(name)
            yield from module


def materialise_float8(model: torch.nn.Module, device: str, seed: int) -> None:
    """bf16 then fp8 one block at a time, so bf16 never holds the whole model, in the torchao recipe that
    `fluxd serve` loads with (pipelines.engine.loading.float8_config). Weights outside the repeated blocks
    (embeddings, the lm_head, norms) stay bf16."""
    import torch
    from torchao.quantization import quantize_

    from pipelines.engine.loading import float8_config

    config = float8_config(device)
    for index, block in enumerate(list(block_lists(model))):
        materialise(block, device, torch.bfloat16, seed + index)
        quantize_(block, config)
    materialise(model, device, torch.bfloat16, seed)


def materialise_nf4(model: torch.nn.Module, device: str, seed: int) -> None:
    """The repeated blocks' linear layers as bitsandbytes nf4, the rest bf16, one block at a time.

    Each block's linears become diffusers' bnb `Linear4bit` modules (the layers a checkpoint loaded with the
    same BitsAndBytesConfig gets), whose random bf16 weights bitsandbytes quantises when they reach
    `device`, so bf16 never holds more than one block.
    """
    import bitsandbytes as bnb
    import torch
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from pipelines.engine.loading import quantizer

    config = quantizer("diffusers", "nf4", device)
    generator = torch.Generator(device=device)
    for index, block in enumerate(list(block_lists(model))):
        replace_with_bnb_linear(block, modules_to_not_convert=[], quantization_config=config)
        generator.manual_seed(seed + index)
        for linear in block.modules():
            if isinstance(linear, bnb.nn.Linear4bit) and linear.weight.is_meta:
                data = torch.empty(linear.weight.shape, dtype=torch.bfloat16, device=device)
                data.normal_(0.0, 0.02, generator=generator)
                settings = linear.weight.__dict__
                weight = bnb.nn.Params4bit(data, requires_grad=False, **settings)
                linear.weight = weight.to(device)  # type: ignore[misc]  # bnb's Params4bit.to outgrows torch's stub
        materialise(block, device, torch.bfloat16, seed + index)
    materialise(model, device, torch.bfloat16, seed)


def synthetic_pipeline(
    model_id: str,
    resolved: ResolvedMode,
    device: str,
    tokenizer_dir: Path,
    overrides: Overrides | None = None,
) -> Pipeline:
    """The synthetic pipeline on `device`, its weights in the precisions `resolved` names, placed as
    `fluxd serve` places a loaded one (pipelines.engine.loading.place). Offloaded modes are materialised in
    CPU memory first, which the offload then streams from. `overrides` shrinks the configs, for tests."""
    import torch

    from pipelines.engine.loading import place

    pipe = build_pipeline(model_id, None, torch.bfloat16, tokenizer_dir, overrides=overrides)
    for index, (slot, model) in enumerate(pipe.components.items()):
        if not isinstance(model, torch.nn.Module):
            continue
        home = "cpu" if resolved.streamed(slot) else device
        precision = resolved.precision(slot)
        if precision == "float8":
            materialise_float8(model, home, seed=1000 * index)
        elif precision == "nf4":
            # Quantised where the kernels are (fast on a GPU), then moved to where the offload keeps it.
            materialise_nf4(model, device, seed=1000 * index)
            model.to(home)
        else:
            materialise(model, home, torch.bfloat16, seed=1000 * index)
    pipe.set_progress_bar_config(disable=True)
    return place(pipe, device, resolved)


def add_random_lora(pipe: Pipeline, adapter_name: str, rank: int = LORA_RANK) -> None:
    """A random LoRA laid out as fal's Turbo file (BFL keys) on the pipeline's transformer, converted and
    injected by diffusers exactly as the file would be."""
    from pipelines.tools.tiny import turbo_lora_state_dict

    pipe.load_lora_weights(turbo_lora_state_dict(pipe.transformer, rank=rank), adapter_name=adapter_name)

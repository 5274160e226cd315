"""Finding checkpoints on disk and loading them as diffusers pipelines, classes from model_index.json."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pipelines.contract.errors import WeightsMissing
from pipelines.contract.modes import Precision, ResolvedMode
from pipelines.contract.specs import LoraAdapter, ModelSpec, Pipeline

logger = logging.getLogger(__name__)


def dtype_for(device: str) -> torch.dtype:
    """bf16 for every component on CUDA, text encoders included (the Mistral encoder loaded without a dtype
    silently becomes 90 GB of fp32); fp32 on CPU, where bf16 matmuls are slow and tiny models are cheap."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _hub_snapshot(repo_id: str | None) -> Path | None:
    if repo_id is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def find_local(folder: Path, repo_id: str | None, marker: str) -> Path | None:
    """`folder` when it holds `marker`, else the Hugging Face cache's snapshot of `repo_id` when that does;
    offline only."""
    if (folder / marker).exists():
        return folder
    snapshot = _hub_snapshot(repo_id)
    if snapshot is not None and (snapshot / marker).exists():
        return snapshot
    return None


def locate_checkpoint(spec: ModelSpec, weights_dir: Path, repo_id: str | None = None) -> Path:
    """weights/<id>/ as `hf download` writes it, else the Hugging Face cache; offline only."""
    folder = Path(spec.checkpoint_path) if spec.checkpoint_path else weights_dir / spec.weights_id
    repo = repo_id or spec.repo_id
    found = find_local(folder, repo, "model_index.json")
    if found is not None:
        return found
    raise WeightsMissing(
        spec.weights_id,
        [str(folder), f"Hugging Face cache ({repo})"],
        f"fluxd weights pull {spec.weights_id}",
    )


def locate_adapter(spec: ModelSpec, adapter: LoraAdapter, weights_dir: Path) -> Path:
    """The folder holding the adapter's .safetensors: weights/<id>/ or the Hugging Face cache."""
    folder = weights_dir / adapter.folder
    found = find_local(folder, adapter.repo_id, adapter.weight_name)
    if found is not None:
        return found
    raise WeightsMissing(
        spec.id,
        [str(folder / adapter.weight_name), f"Hugging Face cache ({adapter.repo_id})"],
        f"fluxd weights pull {adapter.folder}",
    )


def float8_config(device: str) -> Any:
    """torchao's fp8 recipe: dynamic row-wise activations and weights, the fast kernels of an H100 (SM 8.9+);
    weight-only elsewhere (the CPU has no fp8 matmul either; tests exercise the same loading path with it)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    if device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    # Older GPUs (A100, A10, RTX 3090) have no fp8 matmul: torchao asserts SM 8.9 for the dynamic recipe.
    return Float8WeightOnlyConfig()


def quantizer(library: str, precision: Precision, device: str) -> Any:
    """The diffusers or transformers quantisation config for one component."""
    module = importlib.import_module(library)
    if precision == "float8":
        return module.TorchAoConfig(float8_config(device))
    return module.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=False,
    )


def model_index(path: Path) -> dict[str, Any]:
    """A checkpoint's model_index.json: each component slot's [library, class name]."""
    return json.loads((path / "model_index.json").read_text(encoding="utf-8"))


def quantizers(index: dict[str, Any], mode: ResolvedMode, device: str) -> dict[str, Any]:
    """Per component slot, the library's own quantisation config that it is loaded with: the transformer and
    every text encoder, each in the precision `mode` names; the VAE (84 M parameters, precision-sensitive)
    stays in its dtype."""
    return {
        slot: quantizer(entry[0], mode.precision(slot), device)
        for slot, entry in index.items()
        if mode.precision(slot) in ("float8", "nf4")
    }


def attention_backend(device: str) -> str | None:
    """FlashAttention-3 on a CUDA device where diffusers finds its package (`flash_attn_3`, built for Hopper);
    None keeps PyTorch's scaled-dot-product attention."""
    from diffusers.utils import is_flash_attn_3_available

    if device.startswith("cuda") and is_flash_attn_3_available():
        return "_flash_3"
    return None


def load_pipeline(path: Path, device: str, mode: ResolvedMode) -> Pipeline:
    """The checkpoint at `path` on `device` as `mode` says, quantised while loading, then placed."""
    logger.info("loading %s on %s: %s", path, device, mode.describe())
    index = model_index(path)
    # Quantised components load one at a time: bitsandbytes quantises on the GPU and leaves the result there,
    # so loaded as one pipeline every nf4 component would be on the GPU at once (FLUX.2: ~34 GB) before
    # offloading could move any of them back.
    loaded = {
        slot: load_component(path, slot, index[slot][0], index[slot][1], config, device, mode)
        for slot, config in quantizers(index, mode, device).items()
    }
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype_for(device), local_files_only=True, **loaded)
    pipe.set_progress_bar_config(disable=True)
    return place(pipe, device, mode)


def load_component(
    path: Path, slot: str, library: str, class_name: str, config: Any, device: str, mode: ResolvedMode
) -> torch.nn.Module:
    """One quantised component, built where its quantiser works (bitsandbytes: the GPU; torchao: the CPU),
    then moved to the CPU if `mode` streams it from there."""
    cls = getattr(importlib.import_module(library), class_name)
    nf4 = mode.precision(slot) == "nf4"
    # bitsandbytes is told the worker's GPU (it would take the current one); torchao quantises wherever the
    # weights load, by default the CPU (diffusers skips torchao quantisation given a device_map).
    placement = {"device_map": {"": device}} if nf4 else {}
    component = cls.from_pretrained(
        path / slot, dtype=dtype_for(device), quantization_config=config, local_files_only=True, **placement
    )
    if nf4 and mode.streamed(slot):
        component.to("cpu")
    return component


def offload_blocks(module: torch.nn.Module) -> list[str]:
    """The children to descend into so that block-level group offload finds a module's repeated layers.

    diffusers splits only a module's own ModuleList/Sequential children and onloads everything else as one
    group; a transformers text encoder keeps its layers deeper (Mistral3: model.language_model.layers, T5:
    encoder.block, CLIP: encoder.layers), so without this the 24 B Mistral encoder would move to
    the GPU as one 48 GB group. Lists inside lists (a block's own layers) are left to their block."""
    names: set[str] = set()

    def leads_to_a_list(parent: torch.nn.Module) -> bool:
        found = False
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
                found = True
            elif leads_to_a_list(child):
                names.add(name)
                found = True
        return found

    leads_to_a_list(module)
    return sorted(names)


def place(pipe: Pipeline, device: str, mode: ResolvedMode) -> Pipeline:
    """Put a loaded pipeline to work on `device`: resident, offloaded a component at a time (`model`) or
    streamed block by block (`group`; only the text encoders: `encoder`), the VAE sliced and tiled when
    memory is that tight, FlashAttention-3 where present, the repeated blocks compiled when `mode` says so.
    Synthetic pipelines are placed through here too."""
    from diffusers.hooks import apply_group_offloading

    # CUDA streams overlap the next block's copy with this block's compute; the CPU has none.
    cuda = device.startswith("cuda")
    if mode.offload == "model":
        # The VAE (84 M parameters) stays on the GPU, out of the offload chain: in it, decoding a preview
        # between two steps would first send the transformer back to the CPU.
        chain = [slot for slot in pipe.model_cpu_offload_seq.split("->") if slot != "vae"]
        pipe.model_cpu_offload_seq = "->".join(chain)
        pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "vae"]
        pipe.enable_model_cpu_offload(device=device)
    else:
        for slot, component in pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            if mode.streamed(slot):
                apply_group_offloading(
                    component,
                    onload_device=torch.device(device),
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=cuda,
                    low_cpu_mem_usage=cuda,
                    block_modules=offload_blocks(component),
                )
            else:
                component.to(device)
    if mode.offload in ("model", "group"):
        # Memory-bound modes also bound the VAE's peak: images one at a time, tiles above 1024 px a side.
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    backend = attention_backend(device)
    if backend is not None:
        try:
            pipe.transformer.set_attention_backend(backend)
        except (ImportError, RuntimeError, ValueError) as exc:
            # An optimisation only: a FlashAttention-3 build that diffusers cannot use must not cost
            # the model.
            logger.warning("keeping PyTorch attention: %s failed: %s", backend, exc)
    if mode.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return pipe

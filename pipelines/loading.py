"""Finding checkpoints on disk and loading them as diffusers pipelines, classes from model_index.json."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from pipelines.errors import WeightsMissing
from pipelines.specs import LoraAdapter, ModelSpec

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


def locate_checkpoint(spec: ModelSpec, weights_dir: Path, repo_id: str | None = None) -> Path:
    """weights/<id>/ as `hf download` writes it, else the Hugging Face cache; offline only."""
    folder = Path(spec.checkpoint_path) if spec.checkpoint_path else weights_dir / spec.weights_id
    if (folder / "model_index.json").exists():
        return folder
    repo = repo_id or spec.repo_id
    snapshot = _hub_snapshot(repo)
    if snapshot is not None and (snapshot / "model_index.json").exists():
        return snapshot
    raise WeightsMissing(
        spec.weights_id,
        [str(folder), f"Hugging Face cache ({repo})"],
        f"fluxd weights pull {spec.weights_id}",
    )


def locate_adapter(spec: ModelSpec, adapter: LoraAdapter, weights_dir: Path) -> Path:
    """The folder holding the adapter's .safetensors: weights/<id>/ or the Hugging Face cache."""
    folder = weights_dir / adapter.folder
    if (folder / adapter.weight_name).exists():
        return folder
    snapshot = _hub_snapshot(adapter.repo_id)
    if snapshot is not None and (snapshot / adapter.weight_name).exists():
        return snapshot
    raise WeightsMissing(
        spec.id,
        [str(folder / adapter.weight_name), f"Hugging Face cache ({adapter.repo_id})"],
        f"fluxd weights pull {adapter.folder}",
    )


def load_pipeline(path: Path, device: str) -> DiffusionPipeline:
    logger.info("loading %s on %s", path, device)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype_for(device), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

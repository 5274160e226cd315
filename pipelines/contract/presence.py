"""Whether a model's weights are on this machine: in the weights folder, or in the local Hugging Face cache.
Torch-free, and downloads nothing: the front serves only the models present, and an engine replica refuses to
start on a node without them."""

from __future__ import annotations

from pathlib import Path

from pipelines.contract.image_prompts import FOLDER as REDUX_FOLDER
from pipelines.contract.image_prompts import REPO_ID as REDUX_REPO
from pipelines.contract.specs import ModelSpec


def _in_hub_cache(repo_id: str | None, filename: str) -> bool:
    if repo_id is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def checkpoint_present(spec: ModelSpec, weights_dir: Path) -> bool:
    folder = Path(spec.checkpoint_path) if spec.checkpoint_path else weights_dir / spec.weights_id
    return (folder / "model_index.json").exists() or _in_hub_cache(spec.repo_id, "model_index.json")


def adapter_present(spec: ModelSpec, weights_dir: Path) -> bool:
    if spec.adapter is None:
        return True
    return (weights_dir / spec.adapter.folder / spec.adapter.weight_name).exists() or _in_hub_cache(
        spec.adapter.repo_id, spec.adapter.weight_name
    )


def redux_present(weights_dir: Path) -> bool:
    """Whether the FLUX.1 Redux weights that `image_prompt` runs on are here (`fluxd weights pull redux`)."""
    return (weights_dir / REDUX_FOLDER / "model_index.json").exists() or _in_hub_cache(
        REDUX_REPO, "model_index.json"
    )

"""Checkpoint folders on disk: pull with huggingface_hub, list, verify. Torch-free."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipelines.contract import image_prompts
from pipelines.contract.specs import SPECS, ModelSpec, get_spec
from pipelines.engine import safety

# Weights beside the models, each a repo snapshot in a folder of its own: what `fluxd weights pull <folder>`
# fetches.
EXTRAS = {safety.FOLDER: safety.REPO_ID, image_prompts.FOLDER: image_prompts.REPO_ID}

logger = logging.getLogger(__name__)


@dataclass
class Problem:
    path: str
    message: str


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def verify(folder: Path) -> list[Problem]:
    """Every component model_index.json names is present and every safetensors header is readable."""
    from safetensors import safe_open

    problems: list[Problem] = []
    index = folder / "model_index.json"
    files = list(folder.glob("*.safetensors"))
    if index.exists():
        for name, value in json.loads(index.read_text()).items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            component = folder / name
            if not component.is_dir() or not any(component.iterdir()):
                problems.append(Problem(str(component), f"component '{name}' ({value[1]}) is missing"))
        files = list(folder.rglob("*.safetensors"))
    elif not files:
        return [Problem(str(folder), "neither a model_index.json nor a .safetensors file")]
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # any unreadable header is a problem to report, whatever its kind
            problems.append(Problem(str(path), f"unreadable safetensors header: {exc}"))
    return problems


def pull(model_id: str, weights_dir: Path, token: str | None = None) -> Path:
    """Download (resuming) into weights/<id>/ with huggingface_hub, then verify."""
    from huggingface_hub import snapshot_download

    if model_id in EXTRAS:
        target = weights_dir / model_id
        logger.info("downloading %s into %s", EXTRAS[model_id], target)
        snapshot_download(EXTRAS[model_id], local_dir=target, token=token)
        return target
    spec: ModelSpec = get_spec(model_id)
    target = weights_dir / (spec.adapter.folder if spec.adapter else spec.weights_id)
    repo = spec.adapter.repo_id if spec.adapter else spec.repo_id
    if repo is None:
        raise ValueError(f"'{model_id}' is an alias of {spec.weights_id}: pull that instead.")
    allow = [spec.adapter.weight_name] if spec.adapter else None
    logger.info("downloading %s into %s", repo, target)
    snapshot_download(repo, local_dir=target, token=token, allow_patterns=allow)
    return target


def pull_lora(repo_id: str, token: str | None = None) -> Path:
    """A LoRA repo's safetensors into the Hugging Face cache, where a request's `loras` finds it by repo id
    (pipelines/contract/lora_catalog.py); the server itself never downloads."""
    from huggingface_hub import snapshot_download

    logger.info("downloading LoRA %s into the Hugging Face cache", repo_id)
    return Path(snapshot_download(repo_id, token=token, allow_patterns=["*.safetensors", "*.json", "*.md"]))


def offline_hint(model_id: str, weights_dir: Path) -> str:
    if model_id in EXTRAS:
        return (
            f"The Hugging Face Hub is not reachable. On a machine that reaches it run\n"
            f"  hf download {EXTRAS[model_id]} --local-dir {model_id}\n"
            f"and copy that folder to {weights_dir / model_id}."
        )
    spec = get_spec(model_id)
    repo = spec.adapter.repo_id if spec.adapter else spec.repo_id
    target = weights_dir / (spec.adapter.folder if spec.adapter else spec.weights_id)
    return (
        f"The Hugging Face Hub is not reachable. On a machine that reaches it run\n"
        f"  hf download {repo} --local-dir {spec.id}\n"
        f"and copy that folder to {target} (it must contain "
        f"{spec.adapter.weight_name if spec.adapter else 'model_index.json and the component folders'})."
    )


def listing(weights_dir: Path) -> list[tuple[str, str, Path, int]]:
    """(model id or extra's folder, state, folder, bytes) for every known id, then the extras (EXTRAS)."""
    rows = []
    for spec in SPECS.values():
        folder = weights_dir / (spec.adapter.folder if spec.adapter else spec.weights_id)
        if spec.alias:
            rows.append((spec.id, f"alias of {spec.base}", folder, 0))
        elif folder.exists():
            rows.append((spec.id, "present", folder, folder_size(folder)))
        else:
            rows.append((spec.id, "missing", folder, 0))
    for name in EXTRAS:
        folder = weights_dir / name
        if folder.exists():
            rows.append((name, "present", folder, folder_size(folder)))
        else:  # optional: the features it serves answer 400 saying to pull it
            rows.append((name, "not pulled", folder, 0))
    return rows

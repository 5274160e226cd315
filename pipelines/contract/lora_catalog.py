"""The user's LoRAs: named by a request, found on this server, checked from their safetensors header.

Torch-free: the HTTP process resolves every `loras` entry here, so an unknown name, a path out of the LoRA
folder, a file that is no LoRA or one made for another family is a 400 before anything is queued. The worker
loads what was resolved (pipelines/engine/lora_adapters.py).

Where a LoRA may live: a `.safetensors` file or a folder holding one under `weights/loras/` (named with or
without the suffix), a Hugging Face repo already in the local Hugging Face cache (`fluxd weights pull
--lora REPO`), or an http(s) URL under the operator's `--fetch-allow`, which the front fetches into
`weights/loras/.cache/` and hands over as a file (`resolve`'s `files`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.safetensors_header import HeaderError, read_header
from pipelines.contract.specs import Family

PARAM = "loras"
FOLDER = "loras"  # weights/loras/
MAX_LORAS = 3  # fal's FLUX LoRA endpoints take up to 3
MAX_SCALE = 4.0  # fal's bound on a LoRA's scale
# A name is one file or folder name (with its suffix, or a repo id): POSIX file systems take 255 bytes.
MAX_NAME_CHARS = 255
SUFFIX = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
DEFAULT_CACHE_MB = 2048  # adapters a worker keeps loaded (--lora-cache-mb)

Layout = Literal["diffusers", "kohya", "bfl", "peft"]
LoraFamily = Literal["flux2", "flux1"]  # FLUX.1 [dev] and Kontext share one transformer architecture

FAMILY_TITLES: dict[str, str] = {"flux2": "FLUX.2", "flux1": "FLUX.1"}


def family_of(family: Family) -> LoraFamily:
    """The architecture a model's LoRAs are trained for (Kontext takes FLUX.1 [dev] LoRAs)."""
    return "flux2" if family == "flux2" else "flux1"


@dataclass(frozen=True)
class LoraChoice:
    """One entry of a request's `loras`, resolved by the front; crosses to the worker in RenderRequest."""

    name: str  # as listed by /v1/loras
    path: str  # the .safetensors file
    scale: float
    key: str  # the adapter's name in the transformer: the file's identity, so an edited file loads anew


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says: enough to list it and to refuse it for the wrong model."""

    name: str
    path: Path
    layout: Layout
    family: LoraFamily | None  # None: its keys and shapes fit either family; the worker's load decides
    rank: int
    bytes: int
    key: str

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "lora",
            "family": self.family,
            "layout": self.layout,
            "rank": self.rank,
            "bytes": self.bytes,
        }


def _header(path: Path, name: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Tensor shapes and metadata from a safetensors file's JSON header, without reading any tensor."""
    try:
        tensors, metadata = read_header(path)
    except (OSError, HeaderError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise InvalidParameter(
            PARAM, f"LoRA '{name}': its file {path.name} is not a valid safetensors file ({why})."
        ) from exc
    return {key: tensor.shape for key, tensor in tensors.items()}, metadata


def _layout(keys: list[str]) -> Layout | None:
    """The key layout diffusers' FLUX loaders recognise: its own / PEFT's, kohya's, BFL's (ai-toolkit, fal's
    Turbo) or PEFT's base_model.model. prefix (fal's trainer)."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    return None


_DOWN = re.compile(r"\.(lora_A|lora_down)(\.[\w-]+)?\.weight$")
# Module names only one family has, in diffusers' and BFL's spellings (kohya's is BFL's with underscores).
_FLUX2_ONLY = re.compile(r"stream_modulation|to_qkv_mlp_proj|\.linear_in\.|\.linear_out\.")
_FLUX1_ONLY = re.compile(
    r"img_mod|txt_mod|blocks[._]\d+[._]modulation|norm1(_context)?\.linear|proj_mlp|ff(_context)?\.net|"
    r"vector_in|^lora_te|single_transformer_blocks\.\d+\.attn\.to_[qkv]\."
)
# BFL's fused layers tell the families apart by shape alone: FLUX.1's MLP is 4x the hidden size, FLUX.2's is
# gated (SwiGLU) at 3x, so its inputs are 6x. Per module: (fan_out, fan_in) -> hidden multiple -> family.
_SHAPE_RULES: list[tuple[re.Pattern[str], Callable[[int, int], float], dict[float, LoraFamily]]] = [
    (
        re.compile(r"single_blocks[._]\d+[._]linear1$"),
        lambda out, inp: out / inp - 3,
        {4: "flux1", 6: "flux2"},
    ),
    (re.compile(r"single_blocks[._]\d+[._]linear2$"), lambda out, inp: inp / out, {5: "flux1", 4: "flux2"}),
    (re.compile(r"(img|txt)_mlp[._]0$"), lambda out, inp: out / inp, {4: "flux1", 6: "flux2"}),
    (re.compile(r"(img|txt)_mlp[._]2$"), lambda out, inp: inp / out, {4: "flux1", 3: "flux2"}),
]
_MATRIX = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.weight$")


def _family(shapes: dict[str, list[int]], metadata: dict[str, str]) -> LoraFamily | None:
    declared = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version"))
    declared = declared.lower().replace(".", "").replace("-", "").replace("_", "")
    if "flux2" in declared:
        return "flux2"
    if "flux1" in declared:
        return "flux1"
    keys = list(shapes)
    if any(_FLUX2_ONLY.search(k) for k in keys):
        return "flux2"
    if any(_FLUX1_ONLY.search(k) for k in keys):
        return "flux1"
    modules: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        match = _MATRIX.search(key)
        if match and len(shape) == 2:
            side = "up" if match.group(1) in ("lora_B", "lora_up") else "down"
            modules.setdefault(key[: match.start()], {})[side] = shape
    for module, pair in modules.items():
        if "up" not in pair or "down" not in pair or not pair["down"][1] or not pair["up"][0]:
            continue
        for pattern, multiple, families in _SHAPE_RULES:
            if pattern.search(module):
                family = families.get(multiple(pair["up"][0], pair["down"][1]))
                if family is not None:
                    return family
    return None


@functools.lru_cache(maxsize=256)
def _inspect(path: Path, name: str, stamp: tuple[int, int]) -> LoraInfo:
    shapes, metadata = _header(path, name)
    keys = list(shapes)
    layout = _layout(keys)
    downs = [shape for key, shape in shapes.items() if _DOWN.search(key) and len(shape) == 2]
    if layout is None or not downs:
        example = ", ".join(key[:80] for key in keys[:2]) or "no tensors"
        raise InvalidParameter(
            PARAM,
            f"LoRA '{name}' has key names fluxd cannot load ({example}): it takes diffusers/PEFT, kohya "
            "and BFL/ai-toolkit LoRA layouts.",
        )
    identity = hashlib.sha256(f"{path}:{stamp[0]}:{stamp[1]}".encode()).hexdigest()[:16]
    return LoraInfo(name, path, layout, _family(shapes, metadata), downs[0][0], stamp[0], f"lora_{identity}")


def inspect(path: Path, name: str) -> LoraInfo:
    """A LoRA file's header, read once per version of the file."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise InvalidParameter(PARAM, f"LoRA '{name}' cannot be read.") from exc
    return _inspect(path, name, (stat.st_size, stat.st_mtime_ns))


def _weights_file(folder: Path, name: str) -> Path:
    """The one .safetensors a LoRA folder holds (diffusers' file name wins where there are several)."""
    if (folder / DIFFUSERS_WEIGHT_NAME).is_file():
        return folder / DIFFUSERS_WEIGHT_NAME
    files = sorted(p for p in folder.glob(f"*{SUFFIX}") if p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise InvalidParameter(
            PARAM, f"LoRA '{name}' is a folder with no single .safetensors file to load (found: {found})."
        )
    return files[0]


def _hub_folder(repo_id: str) -> Path | None:
    """A repo's snapshot in the local Hugging Face cache; never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name past the file system's limits (ENAMETOOLONG) names nothing there
        return False


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def locate(name: str, weights_dir: Path) -> Path:
    """The .safetensors file `name` stands for, never outside the LoRA folder or the Hugging Face cache."""
    if "://" in name or name.startswith("data:"):
        raise InvalidParameter(
            PARAM,
            "A LoRA is fetched only from an http(s) URL this server's operator allows (--fetch-allow); "
            f"otherwise put the file under the server's weights/{FOLDER}/ or run `fluxd weights pull --lora "
            "REPO`, then name it in `path`.",
        )
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or ".." in parts or "\\" in name or "\x00" in name:
        raise InvalidParameter(PARAM, f"LoRA path '{name}' must name a LoRA under weights/{FOLDER}/.")
    root = (weights_dir / FOLDER).resolve()
    for candidate in (root / name, root / f"{name}{SUFFIX}"):
        found = candidate.resolve()
        # A symlink may point anywhere the operator chose; the name itself may not climb out.
        if not candidate.absolute().is_relative_to(root) or not _exists(found):
            continue
        if found.is_dir():
            return _weights_file(found, name)
        if found.suffix == SUFFIX:
            return found
    if _REPO_ID.match(name):
        snapshot = _hub_folder(name)
        if snapshot is not None:
            return _weights_file(snapshot, name)
    raise InvalidParameter(
        PARAM,
        f"No LoRA named '{name}' on this server: GET /v1/loras lists them (files under weights/{FOLDER}/ "
        "and repos pulled with `fluxd weights pull --lora REPO`).",
    )


def check_entries(entries: list[tuple[str, float]]) -> None:
    """What a request's `loras` can be refused for before any file is read or fetched: their count, scales."""
    if len(entries) > MAX_LORAS:
        raise InvalidParameter(PARAM, f"At most {MAX_LORAS} LoRAs per request; {len(entries)} were sent.")
    for _, scale in entries:
        if not -MAX_SCALE <= scale <= MAX_SCALE:
            raise InvalidParameter(PARAM, f"A LoRA's scale must be between -{MAX_SCALE:g} and {MAX_SCALE:g}.")


def resolve(
    entries: list[tuple[str, float]],
    family: Family,
    model_id: str,
    weights_dir: Path,
    files: Mapping[str, Path] | None = None,
) -> list[LoraChoice]:
    """A request's `loras` as the worker loads them, or a 400 naming `loras`; `files` maps names already
    found elsewhere (fetched by URL) to their file."""
    check_entries(entries)
    wanted = family_of(family)
    choices: list[LoraChoice] = []
    for name, scale in entries:
        found = (files or {}).get(name)
        info = inspect(found if found is not None else locate(name, weights_dir), name)
        if info.family is not None and info.family != wanted:
            raise InvalidParameter(
                PARAM,
                f"LoRA '{name}' is made for {FAMILY_TITLES[info.family]}; '{model_id}' is "
                f"{FAMILY_TITLES[wanted]}.",
            )
        if any(choice.key == info.key for choice in choices):
            raise InvalidParameter(PARAM, f"LoRA '{name}' is listed twice: give it once, with one scale.")
        choices.append(LoraChoice(name, str(info.path), float(scale), info.key))
    return choices


def catalog(weights_dir: Path) -> Iterator[LoraInfo | tuple[str, str]]:
    """Every LoRA under weights/loras/ and in the Hugging Face cache; (name, why) for files that are none."""
    root = weights_dir / FOLDER
    names: list[str] = []
    if root.is_dir():
        for path in sorted(root.rglob(f"*{SUFFIX}")):
            relative = path.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):  # .cache/: LoRAs fetched by URL
                continue
            names.append(str(relative.parent) if relative.parent != Path(".") else relative.stem)
    names.extend(_hub_loras())
    for name in dict.fromkeys(names):
        try:
            yield inspect(locate(name, weights_dir), name)
        except InvalidParameter as exc:
            yield name, exc.message
        except OSError as exc:  # one unreadable entry (a dangling link, a permission) lists as such alone
            yield name, f"LoRA '{name}' cannot be read ({exc.strerror})."


def _hub_loras() -> list[str]:
    """Repo ids in the Hugging Face cache that hold a LoRA rather than a pipeline (no model_index.json)."""
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache (or an unreadable one) lists nothing
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        files = {f.file_name for revision in repo.revisions for f in revision.files}
        if "model_index.json" not in files and any(f.endswith(SUFFIX) for f in files):
            found.append(repo.repo_id)
    return sorted(found)

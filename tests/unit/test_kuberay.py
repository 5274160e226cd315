"""deploy/kuberay/rayservice.yaml checked without a cluster: it parses, its import path and settings exist in
the code, and its pods, volumes and versions agree with the application it deploys."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from server.declarations.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(manifest()["spec"]["serveConfigV2"])


def application() -> dict[str, Any]:
    [app] = serve_config()["applications"]
    return app


def pods() -> list[dict[str, Any]]:
    cluster = manifest()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def test_it_is_a_rayservice() -> None:
    assert manifest()["apiVersion"] == "ray.io/v1" and manifest()["kind"] == "RayService"


def test_the_import_path_names_the_application_builder() -> None:
    module, _, name = application()["import_path"].partition(":")
    source = ROOT / Path(*module.split(".")).with_suffix(".py")
    # Read, not imported: the check holds where ray is not installed.
    tree = ast.parse(source.read_text())
    [builder] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert [arg.arg for arg in builder.args.args] == ["args"]


def test_the_args_are_fluxd_settings_and_valid() -> None:
    args = application()["args"]
    assert set(args) <= set(Settings.model_fields), set(args) - set(Settings.model_fields)
    settings = Settings.model_validate({"ray": "auto", **args})
    assert settings.ray_gpus_per_replica == 1


def test_ray_version_is_the_pinned_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [re.fullmatch(r"ray\[serve\]==(\S+)", dep) for dep in extras["ray"]]
    assert pin and manifest()["spec"]["rayClusterConfig"]["rayVersion"] == pin[1]


def test_every_pod_mounts_the_weights_at_the_weights_dir_and_has_the_api_key_from_a_secret() -> None:
    weights_dir = application()["args"]["weights_dir"]
    for pod in pods():
        [container] = pod["containers"]
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert any(m["mountPath"] == weights_dir and m["name"] in claims for m in container["volumeMounts"])
        [key] = [env for env in container["env"] if env["name"] == "FLUXD_API_KEYS"]
        assert "secretKeyRef" in key["valueFrom"]


def test_gpu_workers_and_a_cpu_head() -> None:
    [head, *workers] = pods()
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"].get("limits", {})
    assert workers and all(w["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for w in workers)

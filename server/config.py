"""Settings: CLI flags override FLUXD_ environment variables, which override the TOML file, then defaults."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.modes import Mode

ENV_PREFIX = "FLUXD_"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxd"


class ModelEntry(BaseModel):
    """A model in the TOML registry: a new id on a local folder, or an alias with its own defaults."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = None
    path: str | None = None
    alias: bool = False
    default_steps: int | None = None
    default_guidance: float | None = None
    default_size: str | None = None
    mode: Mode | None = None


class Settings(BaseModel):
    """Every setting of `fluxd serve`; see README for each one."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    weights_dir: Path = Path("weights")
    demo: bool = False
    demo_size: str = "256x256"
    default_model: str = "flux.2-dev"
    default_edit_model: str = "flux.2-dev"
    public_url: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    api_key_file: Path | None = None
    no_auth: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    max_body_mb: float = Field(50.0, gt=0)
    store_dir: Path = DEFAULT_CACHE / "images"
    image_ttl_s: float = Field(3600.0, gt=0)
    store_quota_mb: float = Field(2048.0, gt=0)
    queue_size: int = Field(64, ge=1)
    queue_timeout_s: float = Field(600.0, gt=0)
    max_batch_images: int = Field(4, ge=1)
    devices: list[str] = Field(default_factory=lambda: ["cpu"])
    worker_threads: int | None = None
    preload: list[str] = Field(default_factory=list)
    memory_budget_gb: float | None = Field(None, gt=0)
    mode: Mode = "auto"
    weights: Literal["disk", "synthetic"] = "disk"
    prompt_cache_mb: float = Field(512.0, ge=0)
    worker_start_timeout_s: float = Field(600.0, gt=0)
    log_prompts: bool = False
    log_level: str = "INFO"
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    # Beyond one machine (server/ray_app.py): only read when `ray` is set.
    ray: str | None = Field(
        None,
        min_length=1,
        description="serve through Ray Serve: 'auto' joins the running Ray cluster, an address (host:6379, "
        "ray://host:10001) joins that one, 'local' starts one on this machine; unset: local worker processes",
    )
    ray_min_replicas: int = Field(1, ge=1, description="engine replicas Ray Serve keeps running")
    ray_max_replicas: int = Field(1, ge=1, description="engine replicas Ray Serve may scale up to")
    ray_target_ongoing_requests: float = Field(
        1.0,
        gt=0,
        description="batches in flight (running or waiting) per engine replica that Ray Serve scales "
        "towards; a replica runs one batch at a time, as a local worker does",
    )
    ray_upscale_delay_s: float = Field(30.0, ge=0, description="seconds of high load before adding a replica")
    ray_downscale_delay_s: float = Field(
        600.0, ge=0, description="seconds of low load before removing a replica"
    )
    ray_autoscaling_window_s: float = Field(
        30.0, gt=0, description="seconds over which the in-flight count is averaged for each scaling decision"
    )
    ray_gpus_per_replica: float | None = Field(
        None,
        ge=0,
        description="GPUs of each engine replica; unset: 1 when the cluster has GPUs, else 0 (the CPU)",
    )
    ray_cpus_per_replica: float = Field(
        1.0, gt=0, description="logical CPUs of each engine replica (a node must declare at least that many)"
    )
    ray_max_replicas_per_node: int | None = Field(
        None, ge=1, description="engine replicas one node may hold; unset: as many as its GPUs or CPUs allow"
    )

    @model_validator(mode="after")
    def _replica_range(self) -> Settings:
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError(
                f"ray_max_replicas ({self.ray_max_replicas}) is below "
                f"ray_min_replicas ({self.ray_min_replicas})"
            )
        return self

    @property
    def synthetic_weights(self) -> bool:
        return self.weights == "synthetic"

    def all_api_keys(self) -> list[str]:
        keys = [key.strip() for key in self.api_keys if key.strip()]  # --api-key "" must not open the door
        if self.api_key_file is not None:
            keys += [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
        return keys


_LIST_FIELDS = {"api_keys", "cors_origins", "devices", "preload"}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        values[name] = (
            [part.strip() for part in raw.split(",") if part.strip()] if name in _LIST_FIELDS else raw
        )
    return values


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the three sources; `flags` holds only what was given on the command line."""
    environ = os.environ if environ is None else environ
    config_file = config_file or (
        Path(environ[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in environ else None
    )
    values: dict[str, Any] = tomllib.loads(config_file.read_text()) if config_file else {}
    values.update(_from_env(environ))
    values.update({key: value for key, value in (flags or {}).items() if value is not None})
    return Settings.model_validate(values)

"""Every setting of `fluxd serve`, declared once: a field of `Settings` with its description.

pydantic-settings derives the rest from each field: the `fluxd serve` flag (kebab case, plus an older spelling
from `json_schema_extra={"flag": ...}`), the `FLUXD_*` environment variable and the TOML key; `--help` and
README's Settings table are generated from the descriptions. Flags override the environment, which overrides
the TOML file (`--config`), which overrides the defaults. Adding a setting is adding a field (with its
description), then `python -m server.declarations.settings_readme README.md` to regenerate README's table.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from pipelines.contract.lora_catalog import DEFAULT_CACHE_MB
from pipelines.contract.messages import WORKER_ENTRY
from pipelines.contract.modes import Mode
from server.declarations.webhook_targets import allow_list, secret_key

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


class Settings(BaseSettings):
    """Every setting of `fluxd serve`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags="toggle",  # a bool field is a switch: `--demo`, not `--demo true`
        cli_hide_none_type=True,
        cli_show_env_vars=True,
    )

    # `default=` by keyword: mypy reads a positional one as no default, and `Settings()` would not type-check.
    config: Path | None = Field(
        default=None,
        description="TOML file: any setting below by its name (`queue_size = 16`) and `[models.<id>]` tables",
    )
    host: str = Field(
        default="127.0.0.1", description="bind address; any other than loopback needs an API key or --no-auth"
    )
    port: int = Field(default=8000, ge=1, le=65535, description="port")
    weights_dir: Path = Field(
        default=Path("weights"),
        description="folder with one diffusers checkpoint per model id (with --demo and no --weights-dir: "
        "~/.cache/fluxd/tiny)",
    )
    demo: bool = Field(
        default=False,
        description="serve tiny random-weight checkpoints, written on the first run; images are noise",
    )
    demo_size: str = Field(default="256x256", description="default size of every model under --demo")
    weights: Literal["disk", "synthetic"] = Field(
        default="disk",
        description="the checkpoints in --weights-dir (disk), or every built-in model at full size with "
        "random weights from its published config, built on each CUDA worker (synthetic: for benchmarks; "
        "images are noise; refused without CUDA devices; Turbo gets a random LoRA of the real file's layout "
        "at an assumed rank of 256)",
    )
    default_model: str = Field(
        default="flux.2-dev",
        description="model of requests that name none (generations, edits and variations)",
    )
    public_url: str | None = Field(
        default=None, description="absolute base of returned image URLs, e.g. http://gpu-box:8000"
    )
    api_keys: list[SecretStr] = Field(
        default=[],
        description="accepted bearer keys (repeatable; comma-separated in the environment); never printed",
        json_schema_extra={"flag": "api-key"},
    )
    api_key_file: Path | None = Field(default=None, description="file with one accepted key per line")
    no_auth: bool = Field(
        default=False, description="allow a non-loopback bind without keys (logged as a warning)"
    )
    cors_origins: list[str] = Field(
        default=[], description="allowed CORS origins (repeatable)", json_schema_extra={"flag": "cors-origin"}
    )
    max_body_mb: float = Field(default=50.0, gt=0, description="largest request body (413 above)")
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="seconds an idle keep-alive connection stays open between requests"
    )
    request_head_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds a connection has to send a request's headers before it is closed",
    )
    max_connections: int = Field(
        default=1024, ge=1, description="concurrent connections and requests before new ones get a 503"
    )
    forwarded_allow_ips: list[str] = Field(
        default=["127.0.0.1", "::1"],
        description="proxies whose X-Forwarded-Proto/Host/Prefix headers shape returned URLs "
        "(addresses or networks, '*' for any)",
    )
    store_dir: Path = Field(
        default=DEFAULT_CACHE / "images", description="folder of the images served by URL"
    )
    image_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="seconds an image URL stays valid",
        json_schema_extra={"flag": "image-ttl"},
    )
    store_quota_mb: float = Field(
        default=2048.0, gt=0, description="disk quota of the URL image store, oldest out first"
    )
    store_sweep_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds between sweeps of expired url images (each write also sweeps)",
    )
    job_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="seconds a finished async job (Prefer: respond-async) and its result stay fetchable",
    )
    max_jobs: int = Field(
        default=1000,
        ge=1,
        description="async jobs stored at once, finished ones included; past it a new job gets a 429",
    )
    webhook_allow: list[str] = Field(
        default=[],
        description="URL prefixes a job's webhook_url may target, e.g. https://hooks.lan:9000/fluxd; empty: "
        "no webhooks (a server that POSTs wherever it is told is an SSRF)",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        validate_default=True,  # so that a missing secret is checked against --webhook-allow
        description="Standard Webhooks signing secret, whsec_<base64>; needed with --webhook-allow; never "
        "printed",
    )
    fetch_allow: list[str] = Field(
        default=[],
        description="URL prefixes a request's `loras` and `image_prompt` may be fetched from, e.g. "
        "https://files.lan/loras/; empty: no URL is fetched (a server that GETs wherever it is told is "
        "an SSRF)",
    )
    fetch_max_mb: int = Field(
        default=2048, ge=1, description="largest file fetched from a --fetch-allow URL, in MiB"
    )
    fetch_timeout_s: float = Field(
        default=300.0, gt=0, description="seconds one fetch from a --fetch-allow URL may take, all in all"
    )
    queue_size: int = Field(default=64, ge=1, description="queued requests per model before 429")
    queue_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="seconds in the queue before 504",
        json_schema_extra={"flag": "queue-timeout"},
    )
    max_batch_images: int = Field(
        default=4, ge=1, description="images of compatible requests run in one call"
    )
    devices: list[str] = Field(
        default=["cpu"], description="one worker process per device, e.g. cuda:0,cuda:1"
    )
    worker_threads: int | None = Field(
        default=None, description="torch threads per CPU worker; unset: torch's own choice"
    )
    worker_start_timeout_s: float = Field(
        default=600.0, gt=0, description="seconds a worker may take to start, --preload models included"
    )
    preload: list[str] = Field(default=[], description="models loaded at start-up, before /ready turns 200")
    memory_budget_gb: float | None = Field(
        default=None,
        gt=0,
        description="checkpoints a worker keeps loaded, least recently used unloaded first; also the GPU "
        "memory the modes are resolved against",
    )
    mode: Mode = Field(
        default="auto", description="how every model runs (see Run modes); per checkpoint in the TOML file"
    )
    prompt_cache_mb: float = Field(
        default=512.0, ge=0, description="text-encoder outputs kept per worker; 0 is off"
    )
    lora_cache_mb: float = Field(
        default=float(DEFAULT_CACHE_MB),
        ge=0,
        description="LoRA adapters kept loaded per worker beside the model weights, least recently used "
        "unloaded first (a request's own LoRAs always load)",
    )
    worker_heartbeat_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="a worker process that sends nothing for this long, not even the heartbeat a thread of "
        "its own sends every second, is stopped or frozen: it is killed and replaced, its requests answered "
        "503",
    )
    batch_deadline_floor_s: float = Field(
        default=900.0,
        gt=0,
        description="a batch may always run this long before its worker counts as hung (killed and replaced, "
        "its requests answered 503); it covers what comes before the first step: loading a checkpoint on "
        "first use (FLUX.2 [dev] reads 112 GB of bf16 weights, minutes from a slow disk), prompt "
        "enhancement, compilation (--preload models load before the worker is ready, outside it)",
    )
    batch_deadline_factor: float = Field(
        default=10.0,
        ge=1,
        description="a batch may also run this many times its steps x its own measured step time, when that "
        "is longer than --batch-deadline-floor-s",
    )
    worker_entry: str = Field(
        default=WORKER_ENTRY,
        description="the loop each worker process runs, as module:function; tests name one that wraps it "
        "with an injected fault",
    )
    safety_checker: bool = Field(
        default=False,
        description="check images with the NSFW classifier in weights/safety-checker (`fluxd weights pull "
        "safety-checker`) unless a request says otherwise; off on a self-hosted box, where fal's default on "
        "would black out a user's own images",
    )
    safety_threshold: float = Field(
        default=0.5, ge=0, le=1, description="nsfw probability from which the safety checker flags an image"
    )
    log_prompts: bool = Field(default=False, description="log prompts")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING")
    models: dict[str, ModelEntry] = Field(
        default={}, description="the model registry: `[models.<id>]` tables in the TOML file (JSON elsewhere)"
    )
    # Beyond one machine (server/dispatch/ray_app.py): read only when `ray` is set.
    ray: str | None = Field(
        default=None,
        min_length=1,
        description="serve through Ray Serve: `auto` joins the running Ray cluster, an address (host:6379, "
        "ray://host:10001) joins that one, `local` starts one here; unset: local worker processes",
    )
    ray_min_replicas: int = Field(default=1, ge=1, description="engine replicas Ray Serve keeps running")
    ray_max_replicas: int = Field(default=1, ge=1, description="engine replicas Ray Serve may scale up to")
    ray_target_ongoing_requests: float = Field(
        default=1.0,
        gt=0,
        description="batches in flight (running or waiting) per engine replica that Ray Serve scales "
        "towards; a replica runs one batch at a time, as a local worker does",
    )
    ray_upscale_delay_s: float = Field(
        default=30.0, ge=0, description="seconds of high load before Ray Serve adds a replica"
    )
    ray_downscale_delay_s: float = Field(
        default=600.0, ge=0, description="seconds of low load before Ray Serve removes a replica"
    )
    ray_autoscaling_window_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds of in-flight counts averaged for each scaling decision (keep it above Serve's "
        "10 s metrics interval)",
    )
    ray_gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs of each engine replica; unset: 1 when the cluster has GPUs, else 0 (the CPU)",
    )
    ray_cpus_per_replica: float = Field(
        default=1.0,
        gt=0,
        description="logical CPUs of each engine replica (a node must declare at least that many, or the "
        "replica waits for ever)",
    )
    ray_max_replicas_per_node: int | None = Field(
        default=None, ge=1, description="engine replicas one node may hold; unset: as its GPUs or CPUs allow"
    )

    @model_validator(mode="after")
    def _demo_weights(self) -> Self:
        # --demo without a weights folder of its own serves the tiny checkpoints it writes into the cache.
        if self.demo and "weights_dir" not in self.model_fields_set:
            self.weights_dir = DEFAULT_CACHE / "tiny"
        return self

    @field_validator("webhook_allow", "fetch_allow")
    @classmethod
    def _allow_list(cls, entries: list[str]) -> list[str]:
        allow_list(entries)  # a ValueError names the bad entry, its credentials masked
        return entries

    @field_validator("webhook_secret")
    @classmethod
    def _webhooks_are_signed(cls, secret: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if secret is None and info.data.get("webhook_allow"):
            raise ValueError("needed with --webhook-allow: every webhook is signed (whsec_<base64>)")
        if secret is not None:
            secret_key(secret.get_secret_value())  # a ValueError says what is wrong with it, not the value
        return secret

    @model_validator(mode="after")
    def _replica_range(self) -> Self:
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError(
                f"ray_max_replicas ({self.ray_max_replicas}) is below "
                f"ray_min_replicas ({self.ray_min_replicas})"
            )
        return self

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if entry != "*":
                ipaddress.ip_network(entry, strict=False)  # a ValueError names the bad entry
        return entries

    @property
    def synthetic_weights(self) -> bool:
        return self.weights == "synthetic"

    def all_api_keys(self) -> list[str]:
        # --api-key "" must not open the door
        keys = [key.get_secret_value().strip() for key in self.api_keys if key.get_secret_value().strip()]
        if self.api_key_file is not None:
            keys += [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
        return keys

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The CLI source, when given, goes in front of these.
        return init_settings, _Environment(settings_cls), _TomlFile(settings_cls)


class _Environment(EnvSettingsSource):
    """FLUXD_* variables; a list may also be written comma-separated (`FLUXD_DEVICES=cuda:0,cuda:1`)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if get_origin(field.annotation) is list and not value.lstrip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return super().decode_complex_value(field_name, field, value)


class _TomlFile(PydanticBaseSettingsSource):
    """The TOML file named by `config`, which the flags and the environment, read before, may set."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if path is None:
            return {}
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"config file {path} not found")
        try:
            return TomlConfigSettingsSource(self.settings_cls, toml_file=path)()
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc

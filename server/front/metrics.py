"""Prometheus series (prometheus-client), one registry per app so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("fluxd_queue_depth", "Jobs waiting for a worker", ["model"], registry=r)
        self.queue_wait = Histogram(
            "fluxd_queue_wait_seconds",
            "Time from enqueue to dispatch",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.run_time = Histogram(
            "fluxd_run_seconds", "Time from dispatch to result", ["model"], buckets=_SECONDS, registry=r
        )
        self.images = Counter("fluxd_images_generated", "Images returned to clients", ["model"], registry=r)
        self.batch_images = Histogram(
            "fluxd_batch_images",
            "Images per pipeline call",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.prompt_cache = Counter(
            "fluxd_prompt_cache_lookups",
            "Prompts looked up in the workers' text-encoder cache, by result",
            ["model", "result"],
            registry=r,
        )
        self.lora_adapters = Counter(
            "fluxd_lora_adapters",
            "LoRA adapters (Turbo's included) batches switched on, by whether the worker had them loaded",
            ["model", "result"],
            registry=r,
        )
        self.lora_load_seconds = Counter(
            "fluxd_lora_load_seconds", "Time workers spent loading LoRA adapters", ["model"], registry=r
        )
        self.errors = Counter("fluxd_errors", "Error answers by code", ["status", "code"], registry=r)
        self.worker_restarts = Counter(
            "fluxd_worker_restarts", "Worker processes replaced", ["worker"], registry=r
        )
        self.device_memory = Gauge(
            "fluxd_device_memory_bytes", "Accelerator memory allocated by a worker", ["worker"], registry=r
        )
        self.cancelled = Counter(
            "fluxd_cancelled",
            "Requests whose client went away (or whose async job was cancelled), by where they were",
            ["model", "stage"],
            registry=r,
        )
        self.steps = Counter(
            "fluxd_denoise_steps",
            "Denoising steps the workers ran, counted per request",
            ["model"],
            registry=r,
        )
        self.jobs = Gauge("fluxd_jobs", "Async jobs stored, by status", ["status"], registry=r)

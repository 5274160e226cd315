"""`fluxd bench gpu`: per model and mode, time and size the real architectures with synthetic weights.

Each row is one pipeline call at the requested size after a short warm-up: text-encode ms, ms per denoising
step, VAE decode ms, end to end, achieved TFLOP/s against the FLOP count of the transformer config and the
share of the physical floor that is (that FLOP count over the GPU's dense bf16 peak), and the peak GPU
memory reserved. Without CUDA it says so and exits 2. The FLOP arithmetic and the table are pure functions,
tested on any machine.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.contract.modes import MODES, ResolvedMode, choose_mode
from pipelines.contract.schedules import resample_sigmas
from pipelines.contract.specs import SIZE_MULTIPLE, ModelSpec, Pipeline, get_spec
from pipelines.tools.synthetic import (
    FAMILY_COMPONENTS,
    LORA_RANK,
    Overrides,
    add_random_lora,
    load_config,
    synthetic_pipeline,
)

logger = logging.getLogger(__name__)

NO_GPU_MESSAGE = "no CUDA GPU present: fluxd bench gpu measures nothing on this machine"
DEFAULT_MODELS = ("flux.2-dev", "flux.2-dev-turbo", "flux.1-kontext-dev", "flux.1-dev")
PROMPT = "A lighthouse on a cliff at dusk, waves breaking below, warm light in the lantern room"
WARMUP_STEPS = 2

# PERFORMANCE.md's floor: sustained dense bf16 on an H100, and twice that for fp8 linears.
BF16_TFLOPS = 800.0
FP8_TFLOPS = 1600.0

# Both pipelines pad every prompt to max_sequence_length=512 tokens.
TEXT_TOKENS = 512

# Per token and block a FLUX block does 4*D^2 multiply-adds of attention projections (q, k, v, out) and
# k*h*D of MLP, h the MLP width: k=3 for FLUX.2's gated SwiGLU (D->2h, h->D), k=2 for FLUX.1's GELU MLP
# (D->h, h->D); single blocks fuse the same matrices. FLUX.1's config has no mlp_ratio: diffusers fixes 4.
_MLP: dict[str, tuple[float, int]] = {"Flux2Transformer2DModel": (3.0, 3), "FluxTransformer2DModel": (4.0, 2)}


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one transformer forward (one denoising step of a guidance-distilled model)."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def image_tokens(width: int, height: int) -> int:
    """Latent tokens of an image: 8x VAE downsampling, then 2x2 patches."""
    return (width // SIZE_MULTIPLE) * (height // SIZE_MULTIPLE)


def transformer_flops(
    config: Mapping[str, Any], width: int, height: int, references: int = 0, text_tokens: int = TEXT_TOKENS
) -> StepFlops:
    """FLOPs per step from a transformer config: every block attends over text + image + reference tokens."""
    ratio, mlp_matrices = _MLP[config["_class_name"]]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = config.get("mlp_ratio", ratio) * dim
    blocks = config["num_layers"] + config["num_single_layers"]
    image = image_tokens(width, height) * (1 + references)
    sequence = text_tokens + image
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    macs = (
        blocks * sequence * (4 * dim * dim + mlp_matrices * mlp * dim)
        + text_tokens * config["joint_attention_dim"] * dim
        + image * (in_channels + out_channels) * dim
    )
    attention_macs = blocks * 2 * sequence * sequence * dim  # Q K^T and P V
    return StepFlops(linear=2.0 * macs, attention=2.0 * attention_macs)


def floor_seconds(flops: StepFlops, fp8_linears: bool = False) -> float:
    """The physical floor of one step: linears at the fp8 or bf16 rate, attention at the bf16 rate."""
    linear_rate = FP8_TFLOPS if fp8_linears else BF16_TFLOPS
    return flops.linear / (linear_rate * 1e12) + flops.attention / (BF16_TFLOPS * 1e12)


def references_of(spec: ModelSpec) -> int:
    """Reference images the benchmark sends: Kontext is measured editing, the others generating."""
    return 1 if spec.family == "flux1-kontext" else 0


def flops_for(model_id: str, width: int, height: int) -> StepFlops:
    spec = get_spec(model_id)
    config = load_config(FAMILY_COMPONENTS[spec.family]["transformer"])
    return transformer_flops(config, width, height, references_of(spec))


@dataclass(frozen=True)
class Row:
    """One measured (or unmeasured) model and mode."""

    model: str
    mode: str
    weights: str = ""
    steps: int = 0
    size: str = ""
    text_encode_ms: float | None = None
    step_ms: float | None = None
    vae_ms: float | None = None
    total_s: float | None = None
    step_flops: StepFlops | None = None
    fp8_linears: bool = False
    peak_gb: float | None = None
    note: str = ""

    @property
    def achieved_tflops(self) -> float | None:
        if self.step_ms is None or self.step_flops is None:
            return None
        return self.step_flops.total / (self.step_ms / 1000.0) / 1e12

    @property
    def floor_percent(self) -> float | None:
        if self.step_ms is None or self.step_flops is None:
            return None
        return 100.0 * floor_seconds(self.step_flops, self.fp8_linears) / (self.step_ms / 1000.0)


COLUMNS = (
    "model",
    "mode",
    "weights (transformer/encoder)",
    "steps",
    "size",
    "text-encode ms",
    "ms/step",
    "VAE ms",
    "end-to-end s",
    "TFLOP/step",
    "TFLOP/s",
    "% of floor",
    "peak GPU GB",
    "note",
)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Row], device: str, date: str) -> str:
    """One markdown table, headed by the device and the date."""
    lines = [
        f"fluxd bench gpu: {device}, {date}. Synthetic weights (real configs, random values).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = (
            row.model,
            row.mode,
            row.weights or "-",
            str(row.steps) if row.steps else "-",
            row.size or "-",
            _number(row.text_encode_ms, 1),
            _number(row.step_ms, 1),
            _number(row.vae_ms, 1),
            _number(row.total_s, 2),
            _number(row.step_flops.total / 1e12 if row.step_flops else None, 1),
            _number(row.achieved_tflops, 0),
            _number(row.floor_percent, 0),
            _number(row.peak_gb, 1),
            row.note,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768), both multiples of the latent patch."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size: expected WIDTHxHEIGHT, got {text!r}") from None
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"size: both sides must be positive multiples of {SIZE_MULTIPLE}")
    return width, height


def _model_list(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    for model in models:
        try:
            get_spec(model)
        except LookupError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return models


def _mode_list(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"modes: unknown {', '.join(unknown)}; expected {', '.join(MODES)}")
    return modes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxd bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=_model_list, default=list(DEFAULT_MODELS), help="comma-separated ids"
    )
    parser.add_argument(
        "--modes", type=_mode_list, default=["auto"], help=f"comma-separated: {', '.join(MODES)}"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's own)")
    parser.add_argument(
        "--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT, default 1024x1024"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="cap the process's share of GPU memory (low-VRAM checks)",
    )
    parser.add_argument(
        "--tokenizers",
        type=Path,
        default=None,
        help="a folder per weights id holding tokenizer/ (and tokenizer_2/); default: tiny ones",
    )
    return parser


class _Stopwatch:
    """Wall time spent inside wrapped callables, the GPU synchronised at both ends."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, owner: object, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.synchronize()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.synchronize()
                self.seconds.setdefault(label, []).append(time.perf_counter() - start)

        setattr(owner, attribute, timed)

    def total_ms(self, label: str) -> float | None:
        values = self.seconds.get(label)
        return None if not values else 1000.0 * sum(values)

    def mean_ms(self, label: str) -> float | None:
        values = self.seconds.get(label)
        return None if not values else 1000.0 * sum(values) / len(values)


def _call_kwargs(spec: ModelSpec, width: int, height: int, steps: int, device: str) -> dict[str, Any]:
    import torch
    from PIL import Image

    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "guidance_scale": spec.default_guidance,
        "generator": torch.Generator(device=device).manual_seed(0),
        "output_type": "np",
    }
    if references_of(spec):
        kwargs["image"] = Image.new("RGB", (width, height), (128, 128, 128))
    if spec.adapter is not None and spec.adapter.sigmas is not None:
        kwargs["sigmas"] = resample_sigmas(spec.adapter.sigmas, steps)
    return kwargs


def _timed_call(
    pipe: Pipeline,
    watch: _Stopwatch,
    spec: ModelSpec,
    steps: int,
    size: tuple[int, int],
    device: str,
) -> tuple[float, dict[str, float | None], float | None]:
    """A warm-up call (compilation, allocator), then one timed call: end-to-end s, the stopwatch's
    text-encode / per-step / VAE ms, and the peak GPU memory reserved in GB (None off CUDA)."""
    import torch

    width, height = size
    cuda = device.startswith("cuda")
    pipe(**_call_kwargs(spec, width, height, min(steps, WARMUP_STEPS), device))
    watch.seconds.clear()
    if cuda:
        # The allocator still caches what building the weights needed (bf16 before fp8/nf4): returned first,
        # it would count in the call's peak.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    watch.synchronize()
    start = time.perf_counter()
    pipe(**_call_kwargs(spec, width, height, steps, device))
    watch.synchronize()
    total = time.perf_counter() - start
    parts = {"text": watch.total_ms("text"), "step": watch.mean_ms("step"), "vae": watch.total_ms("vae")}
    return total, parts, torch.cuda.max_memory_reserved() / 1e9 if cuda else None


def measure(
    spec: ModelSpec,
    mode: str,
    resolved: ResolvedMode,
    args: argparse.Namespace,
    tokenizer_root: Path,
    device: str = "cuda",
    overrides: Overrides | None = None,
) -> list[Row]:
    """Build `spec` in `resolved`, then time it; an adapter is timed unfused, as fluxd serves it, and then
    switched off: a LoRA fused into its base adds no work per step, so the base's time is a fused copy's
    (peft cannot merge into a quantised base, and a fused copy's memory is a second transformer). `device`
    and `overrides` (shrunk configs) let tests run the same steps on the CPU."""
    import torch

    steps = args.steps or spec.default_steps
    pipe = synthetic_pipeline(spec.id, resolved, device, tokenizer_root / spec.weights_id, overrides)
    variants = [""]
    if spec.adapter is not None:
        add_random_lora(pipe, spec.adapter.name)
        variants = [
            f"LoRA unfused (as served), rank {LORA_RANK}",
            "LoRA off: the time of a fused copy (not served)",
        ]
    watch = _Stopwatch(torch.cuda.synchronize if device.startswith("cuda") else lambda: None)
    for slot, component in pipe.components.items():
        if slot.startswith("text_encoder"):
            watch.wrap(component, "forward", "text")
    watch.wrap(pipe.transformer, "forward", "step")
    watch.wrap(pipe.vae, "decode", "vae")
    rows = []
    for index, note in enumerate(variants):
        if index == 1:
            pipe.disable_lora()
        total, parts, peak = _timed_call(pipe, watch, spec, steps, args.size, device)
        rows.append(
            Row(
                model=spec.id,
                mode=mode if mode == resolved.mode else f"{mode} -> {resolved.mode}",
                weights=f"{resolved.transformer}/{resolved.encoder}",
                steps=steps,
                size="{}x{}".format(*args.size),
                text_encode_ms=parts["text"],
                step_ms=parts["step"],
                vae_ms=parts["vae"],
                total_s=total,
                step_flops=flops_for(spec.id, *args.size),
                fp8_linears=resolved.transformer == "float8",
                peak_gb=peak,
                note=note,
            )
        )
    return rows


def _rows(
    spec: ModelSpec, mode: str, gpu_bytes: int, args: argparse.Namespace, tokenizer_root: Path
) -> list[Row]:
    import gc

    import torch

    try:
        resolved = choose_mode(spec.id, gpu_bytes, mode)
    except ValueError as error:
        return [Row(spec.id, mode, note=f"not measured: {error}")]
    weights = f"{resolved.transformer}/{resolved.encoder}"
    try:
        return measure(spec, mode, resolved, args, tokenizer_root)
    except Exception as error:  # an OOM or a kernel error ends this row, not the benchmark
        logger.exception("bench of %s in %s failed", spec.id, mode)
        return [Row(spec.id, mode, weights, note=f"failed: {type(error).__name__}: {error}"[:200])]
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    gpu_bytes = total
    if args.gpu_memory_gb is not None:
        gpu_bytes = min(total, int(args.gpu_memory_gb * 1e9))
        torch.cuda.set_per_process_memory_fraction(gpu_bytes / total)
    with tempfile.TemporaryDirectory(prefix="fluxd-bench-") as scratch:
        tokenizer_root = args.tokenizers
        if tokenizer_root is None:
            from pipelines.tools.tiny import write_tiny

            tokenizer_root = Path(scratch)
            write_tiny(tokenizer_root)
        rows = [
            row
            for model in args.models
            for mode in args.modes
            for row in _rows(get_spec(model), mode, gpu_bytes, args, tokenizer_root)
        ]
    device = f"{torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB"
    device += f", capped at {gpu_bytes / 1e9:.0f} GB)" if gpu_bytes < total else ")"
    table = format_table(rows, device, datetime.date.today().isoformat())
    print(table)
    if args.out is not None:
        args.out.write_text(table, encoding="utf-8")
    return 0

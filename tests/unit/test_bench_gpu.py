"""`fluxd bench gpu`'s pure parts: FLOP arithmetic against PERFORMANCE.md, the table, the arguments."""

from __future__ import annotations

import pytest

from pipelines.tools import bench_gpu
from pipelines.tools.bench_gpu import Row, StepFlops, floor_seconds, flops_for, format_table, parse_size
from pipelines.tools.synthetic import load_config

TFLOP = 1e12


def assert_close(measured: float, expected: float, tolerance: float = 0.02) -> None:
    assert abs(measured - expected) <= tolerance * expected, (measured, expected)


def test_flux2_step_flops_match_performance_md() -> None:
    flops = flops_for("flux.2-dev", 1024, 1024)

    assert_close(flops.total / TFLOP, 282.6)
    assert_close(flops.linear / TFLOP, 253.4)
    assert_close(flops.attention / TFLOP, 29.2)


def test_flux1_step_flops_match_performance_md() -> None:
    assert_close(flops_for("flux.1-dev", 1024, 1024).total / TFLOP, 74.4)
    assert_close(flops_for("flux.1-kontext-dev", 1024, 1024).total / TFLOP, 165.5)  # with its reference


def test_a_flux2_reference_image_doubles_the_image_tokens() -> None:
    config = load_config("flux2-transformer")

    flops = bench_gpu.transformer_flops(config, 1024, 1024, references=1)

    assert_close(flops.total / TFLOP, 582.8)


def test_floors_match_performance_md() -> None:
    flux2 = flops_for("flux.2-dev", 1024, 1024)
    flux1 = flops_for("flux.1-dev", 1024, 1024)

    assert_close(floor_seconds(flux2), 0.353)
    assert_close(floor_seconds(flux2, fp8_linears=True), 0.195)
    assert_close(floor_seconds(flux1), 0.093)
    assert_close(floor_seconds(flux1, fp8_linears=True), 0.056)
    assert_close(50 * floor_seconds(flux2), 17.7)


def test_flops_grow_with_size() -> None:
    assert flops_for("flux.2-dev", 2048, 2048).total > 4 * flops_for("flux.2-dev", 1024, 1024).total


def test_sglang_step_time_is_77_percent_of_the_floor() -> None:
    row = Row("flux.2-dev", "resident", step_ms=460.5, step_flops=flops_for("flux.2-dev", 1024, 1024))

    assert row.floor_percent is not None and round(row.floor_percent) == 77
    assert row.achieved_tflops is not None and 600 < row.achieved_tflops < 620


def test_table_names_device_and_date_and_marks_missing_figures() -> None:
    measured = Row(
        "flux.2-dev",
        "auto -> resident",
        weights="float8/float8",
        steps=28,
        size="1024x1024",
        text_encode_ms=31.0,
        step_ms=300.0,
        vae_ms=80.0,
        total_s=8.9,
        step_flops=StepFlops(253.4e12, 29.2e12),
        fp8_linears=True,
        peak_gb=61.2,
    )
    unmeasured = Row("flux.2-dev", "lowvram", note="not measured: not wired")

    table = format_table([measured, unmeasured], "NVIDIA H100 80GB HBM3 (79 GiB)", "2026-11-22")
    lines = table.splitlines()

    assert "NVIDIA H100 80GB HBM3" in lines[0] and "2026-11-22" in lines[0]
    assert lines[2].startswith("| model | mode |") and "% of floor" in lines[2] and "peak GPU GB" in lines[2]
    assert lines[4].split(" | ")[5:9] == ["31.0", "300.0", "80.0", "8.90"]
    assert "| 65 |" in lines[4]  # 0.195 s floor over 0.300 s
    assert lines[5].split(" | ")[1:-1].count("-") == 11 and lines[5].endswith("not measured: not wired |")


@pytest.mark.parametrize(("text", "size"), [("1024x1024", (1024, 1024)), ("1360X768", (1360, 768))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1024", "1000x1000", "0x1024", "axb"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(Exception, match="size"):
        parse_size(text)


@pytest.mark.parametrize("argv", [["--modes", "turbo"], ["--models", "flux.3-dev"], ["--size", "100x100"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(argv)
    assert exit_info.value.code == 2


def test_without_cuda_it_says_so_and_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert bench_gpu.main([]) == 2
    assert capsys.readouterr().out.strip() == bench_gpu.NO_GPU_MESSAGE

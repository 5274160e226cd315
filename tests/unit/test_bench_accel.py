"""`fluxd bench accel`'s arithmetic, verdicts and table (pure functions; the run itself is the bench)."""

from __future__ import annotations

from pipelines.engine.acceleration import full_evaluations
from pipelines.tools.bench_accel import Row, format_table, missed


def rows(regular: float, high: float) -> list[Row]:
    return [
        Row("flux.2-dev", "none", 28, 400.0),
        Row("flux.2-dev", "regular", regular, 300.0),
        Row("flux.2-dev", "high", high, 250.0),
    ]


def test_the_schedule_meets_the_targets_at_28_steps() -> None:
    assert [full_evaluations(level, 28) for level in ("none", "regular", "high")] == [28, 16, 13]
    assert missed(rows(16, 13)) == []


def test_a_level_short_of_its_target_is_named() -> None:
    assert missed(rows(19, 13)) == ["flux.2-dev regular"]
    assert missed(rows(16, 15)) == ["flux.2-dev high"]


def test_the_table_has_a_row_per_level_against_none() -> None:
    table = format_table(rows(16, 13), 28, "512x512", "a CPU", "2026-12-02")
    assert "| flux.2-dev | regular | 16 | 1.75x | 300 | 1.33x |" in table
    assert "| flux.2-dev | high | 13 | 2.15x | 250 | 1.60x |" in table
    assert table.startswith("`fluxd bench accel`, 2026-12-02, a CPU")


def test_the_mask_table_gives_masked_over_plain() -> None:
    from pipelines.tools.bench_mask import Row as MaskRow
    from pipelines.tools.bench_mask import format_table as mask_table

    table = mask_table([MaskRow("flux.1-dev", 400.0, 500.0)], "256x256")
    assert "| flux.1-dev | 400 | 500 | 1.25x |" in table

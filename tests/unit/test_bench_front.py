"""`fluxd bench front`'s arithmetic and its reading of a process's CPU time."""

from __future__ import annotations

import os

from server.tools.bench_front import Cell, ceiling_gpus, format_report, process_cpu_s


def test_the_ceiling_counts_turbo_gpus_one_core_keeps_up_with() -> None:
    # 20 ms a image: 50 images/s on one core; a Turbo GPU makes one every 2 s.
    assert ceiling_gpus(20.0) == 100.0
    assert Cell("png", "url", 32, images=64, seconds=2.0, cpu_s=0.64).cpu_ms == 10.0


def test_a_process_cpu_time_is_read_from_proc_as_the_kernel_counts_it() -> None:
    mine = os.times()
    assert abs(process_cpu_s(os.getpid()) - (mine.user + mine.system)) < 0.05


def test_the_report_names_the_worst_cell_as_the_ceiling() -> None:
    cells = [Cell("png", "b64_json", 1, 10, 1.0, 0.2), Cell("jpeg", "url", 32, 10, 1.0, 0.05)]
    report = format_report(cells, 200.0, [(1, 20.0, 1_700_000), (6, 200.0, 1_400_000)])
    assert "worst cell (png b64_json at 1, 20.0 ms) keeps up with 100 H100s" in report
    assert "| 1 | 20 | 1.70 MB | +21% |" in report

"""`fluxd bench serve`'s pure parts: percentiles, RSS parsing, tallies, verdicts, the table, the arguments.

No server is started and nothing is timed: the load loop runs against a stand-in client.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from pipelines.contract.specs import SPECS
from server.declarations.protocol import ImageGenerationRequest
from server.front.normalize import build_request
from server.tools import bench, bench_harness, bench_report, cli
from server.tools.bench_report import Measured, Outcome, Row, Soak, Tally, Throughput

STATUS = """Name:\tpython
State:\tS (sleeping)
VmPeak:\t  812344 kB
VmRSS:\t   63812 kB
RssAnon:\t   40000 kB
"""

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
processor\t: 1
model name\t: AMD EPYC 7763 64-Core Processor
"""

MB = 2**20


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]

    assert bench_report.percentile(values, 50) == 3.0
    assert bench_report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench_report.percentile(values, 0) == 1.0
    assert bench_report.percentile(values, 100) == 5.0
    assert bench_report.percentile([10.0, 20.0], 90) == pytest.approx(19.0)
    assert bench_report.percentile([7.0], 95) == 7.0


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_what_has_none(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        bench_report.percentile(values, q)


def test_vm_rss_is_read_in_bytes() -> None:
    assert bench_report.parse_vm_rss(STATUS) == 63812 * 1024


def test_a_status_without_vm_rss_is_an_error() -> None:
    with pytest.raises(ValueError, match="VmRSS"):
        bench_report.parse_vm_rss("Name:\tkthreadd\nState:\tS (sleeping)\n")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_this_process_has_a_resident_size() -> None:
    assert bench_harness.read_rss(os.getpid()) > MB


def test_cpu_model_comes_from_cpuinfo_with_a_fallback() -> None:
    assert bench_report.cpu_model(CPUINFO) == "AMD EPYC 7763 64-Core Processor"
    assert bench_report.cpu_model("processor\t: 0\nFeatures\t: fp asimd\n")


def test_tally_sorts_every_outcome_into_one_count() -> None:
    outcomes = [
        Outcome(200, 0.1, images=2),
        Outcome(200, 0.1, images=1),
        Outcome(503, 0.1),
        Outcome(429, 0.1),
        Outcome(None, 0.1, error="ReadTimeout"),
        Outcome(None, 0.0, error="the phase ran out of time", sent=False),
    ]

    assert bench_report.tally(outcomes) == Tally(
        ok=2, lost=1, server_errors=1, client_errors=1, not_sent=1, images=3
    )


def test_throughput_is_images_over_wall_time() -> None:
    assert Throughput(requests=8, images=10, seconds=4.0).per_second == 2.5
    assert Throughput(requests=0, images=0, seconds=0.0).per_second == 0.0


def test_growth_is_relative_to_the_first_reading() -> None:
    assert bench_report.growth(100 * MB, 105 * MB) == pytest.approx(0.05)
    assert bench_report.growth(100 * MB, 90 * MB) == pytest.approx(-0.10)


def measured(
    http_ms: float = 105.0,
    batched_per_s: float = 3.0,
    counts: Tally | None = None,
    rss_end: int = 105 * MB,
) -> Measured:
    return Measured(
        http_ms=[http_ms - 5, http_ms, http_ms + 50],
        direct_ms=[99.0, 100.0, 400.0],
        max_batch_images=4,
        concurrency=8,
        batched=Throughput(requests=64, images=int(batched_per_s * 10), seconds=10.0),
        unbatched=Throughput(requests=64, images=20, seconds=10.0),
        soak=Soak(
            requests=500,
            concurrency=16,
            counts=counts or Tally(ok=500, lost=0, server_errors=0, client_errors=0, not_sent=0, images=571),
            mark=100,
            rss_mark=100 * MB,
            rss_end=rss_end,
            worker_rss_mark=900 * MB,
            worker_rss_end=990 * MB,
        ),
    )


def verdicts(rows: list[Row]) -> dict[str, bool | None]:
    return {row.metric.split(" (")[0].split(",")[0]: row.passed for row in rows}


def test_a_run_within_every_target_passes_every_row() -> None:
    rows = bench_report.table_rows(measured())

    assert verdicts(rows) == {
        "overhead: HTTP p50 / direct Engine.render p50": True,
        "batching: images/s at concurrency 8": True,
        "soak: requests answered 200": True,
        "soak: lost": True,
        "soak: 5xx": True,
        "soak: HTTP process RSS": True,
        "soak: worker process RSS": None,  # informational: no target
    }
    assert rows[0].value == "1.050 (105 ms / 100 ms)"
    assert rows[1].value.startswith("1.50 (3.00 / 2.00 img/s)")
    assert rows[5].value == "100.0 MB -> 105.0 MB (+5.0%)"


def test_a_lora_measure_adds_two_information_rows() -> None:
    lora = bench_report.LoraCost("tiny-flux2-style", 12.0, [100.0, 102.0, 98.0], [110.0, 111.0, 109.0])
    rows = bench_report.table_rows(dataclasses.replace(measured(), lora=lora))[-2:]
    assert [row.passed for row in rows] == [None, None]
    assert rows[0].value == "12 ms"
    assert rows[1].value == "1.100 (110 ms / 100 ms)"


def test_the_overhead_target_is_inclusive_at_1_10() -> None:
    assert bench_report.table_rows(measured(http_ms=110.0))[0].passed is True
    assert bench_report.table_rows(measured(http_ms=111.0))[0].passed is False


def test_too_little_batching_speed_up_fails() -> None:
    assert bench_report.table_rows(measured(batched_per_s=2.9))[1].passed is False


def test_soak_losses_5xx_and_memory_growth_each_fail_their_row() -> None:
    bad = Tally(ok=497, lost=1, server_errors=2, client_errors=0, not_sent=0, images=560)

    rows = bench_report.table_rows(measured(counts=bad, rss_end=110 * MB))

    assert [row.passed for row in rows[2:6]] == [False, False, False, False]
    assert rows[3].value == "1" and rows[4].value == "2"
    assert rows[5].value.endswith("(+10.0%)")


def test_the_report_is_one_markdown_table_under_the_machine_line() -> None:
    rows = bench_report.table_rows(measured(http_ms=200.0))

    report = bench_report.format_report(rows, "2 cores (AMD EPYC)", "2026-01-01 00:00 UTC")
    lines = report.splitlines()

    assert lines[0] == "fluxd bench serve, 2026-01-01 00:00 UTC: 2 cores (AMD EPYC)"
    assert lines[2:4] == ["| metric | value | target | result |", "|---|---|---|---|"]
    assert len(lines) == 4 + len(rows)
    assert all(line.count(" | ") == 3 for line in lines[4:])
    assert lines[4].endswith("| FAIL |") and lines[5].endswith("| pass |") and lines[-1].endswith("| info |")


def test_the_soak_mix_covers_every_model_and_the_server_accepts_each_request() -> None:
    bodies = [bench.soak_body(i) for i in range(105)]

    assert {body["model"] for body in bodies[:5]} == set(bench_report.SOAK_MODELS)
    assert {body["size"] for body in bodies} == set(bench_report.SOAK_SIZES)
    assert {body["response_format"] for body in bodies} == {"url", "b64_json"}
    assert {body.get("n", 1) for body in bodies} == {1, 2}
    for body in bodies:
        request, _ = build_request(ImageGenerationRequest(**body), SPECS[body["model"]], {})
        assert min(request.width, request.height) >= 64 and max(request.width, request.height) <= 256
        assert request.steps <= 8


def test_the_batching_mix_shares_one_batch_shape() -> None:
    bodies = bench_report.batching_bodies(8)

    assert len({body["seed"] for body in bodies}) == 8
    shapes = {(b["model"], b["size"], b["num_inference_steps"]) for b in bodies}
    assert shapes == {("flux.2-dev", "256x256", 28)}


class FakeResponse:
    def __init__(self, status_code: int, payload: Any) -> None:
        self.status_code = status_code
        self._payload = payload

    def json(self) -> Any:
        return self._payload


class FakeClient:
    """Answers by the body's seed: 0 -> connection refused, 1 -> 500, 2 -> a 200 without JSON, else 200."""

    def post(self, url: str, json: dict[str, Any], timeout: float) -> FakeResponse:
        assert url.startswith("http://127.0.0.1:")
        seed = json["seed"]
        if seed == 0:
            raise httpx.ConnectError("refused")
        if seed == 1:
            return FakeResponse(500, {"error": {}})
        if seed == 2:
            return FakeResponse(200, "not an images response")
        return FakeResponse(200, {"data": [{}] * json.get("n", 1)})


FAKE_CLIENT = cast("httpx.Client", FakeClient())


def test_run_load_keeps_order_counts_answers_and_maps_failures() -> None:
    bodies = [{"seed": i, "n": 2 if i == 3 else 1} for i in range(6)]
    answers: list[int] = []

    outcomes, _ = bench_harness.run_load(
        FAKE_CLIENT,
        "http://127.0.0.1:9",
        bodies,
        3,
        time.monotonic() + 3600,
        answers.append,
    )

    assert [o.status for o in outcomes] == [None, 500, None, 200, 200, 200]
    assert [o.images for o in outcomes] == [0, 0, 0, 2, 1, 1]
    assert sorted(answers) == [1, 2, 3, 4, 5, 6]
    assert bench_report.tally(outcomes).lost == 2


def test_run_load_sends_nothing_past_its_deadline() -> None:
    outcomes, _ = bench_harness.run_load(
        FAKE_CLIENT,
        "http://127.0.0.1:9",
        [{"seed": 5}] * 4,
        2,
        time.monotonic() - 1,
    )

    assert bench_report.tally(outcomes).not_sent == 4


def test_quick_sets_small_defaults_that_explicit_flags_override() -> None:
    full = bench.parse_args([])
    quick = bench.parse_args(["--quick", "--soak-requests", "12"])

    assert (full.requests, full.soak_requests, full.soak_concurrency) == bench.FULL
    assert (quick.requests, quick.soak_requests, quick.soak_concurrency) == (
        bench.QUICK[0],
        12,
        bench.QUICK[2],
    )
    assert full.concurrency == 8 and full.max_batch_images == 4 and full.weights_dir is None


def test_counts_below_one_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--soak-concurrency", "0"])


def test_cli_routes_bench_serve_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)

    assert cli.main(["bench", "serve", "--quick", "--out", "table.md"]) == 0
    assert seen == [["--quick", "--out", "table.md"]]


def test_importing_the_bench_leaves_torch_out() -> None:
    code = "import sys, server.tools.bench; sys.exit(1 if 'torch' in sys.modules else 0)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_bench_serve_help_lists_the_bench_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "serve", "--help"])

    assert exit_info.value.code == 0
    assert "--soak-requests" in capsys.readouterr().out

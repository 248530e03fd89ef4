"""Smoke run of the benchmark: every strategy runs, and its figures are consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitkeys.tools.bench import make_workload, markdown, run_strategy
from rabbitkeys.tools.bench.plots import write_plots
from rabbitkeys.tools.bench.runner import STRATEGIES, Result

from .support import make_settings


@pytest.mark.processes
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_strategy_runs_and_ordered_ones_keep_order(
    amqp_url: str, namespace: str, strategy: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    workload = make_workload("uniform", 300, paced_messages=100)
    result = await run_strategy(
        strategy, workload, settings, workers=2, partitions=4, work_ms=1.0, rate=200, timeout=60
    )
    assert result.lost == 0
    assert result.messages == 400
    assert result.paced_rate == 200
    assert result.throughput > 0 and result.p99_ms >= result.p50_ms
    if strategy != "shared":
        assert result.order_violations == 0


def test_the_report_and_plots_show_every_strategy(tmp_path: Path) -> None:
    results = [
        Result(strategy, "uniform", 10, 1.0, rate, 1.0, 2.0, None, 200.0, 0, 0, {})
        for strategy, rate in zip(STRATEGIES, (1000.0, 400.0, 800.0, 900.0), strict=True)
    ]
    table = markdown(results)
    assert "| uniform | rabbitkeys | 900 |" in table
    assert "0.90 x | yes" in table
    pytest.importorskip("matplotlib")
    written = write_plots(results, tmp_path)
    assert [p.name for p in written] == ["throughput.png", "latency_p99.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)

"""Smoke run of the benchmark: every strategy runs, and its figures are consistent."""

from __future__ import annotations

import pytest

from rabbitkeys.bench import make_workload, run_strategy
from rabbitkeys.bench.runner import STRATEGIES

from .support import make_settings


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_strategy_runs_and_ordered_ones_keep_order(
    amqp_url: str, namespace: str, strategy: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    workload = make_workload("uniform", 300)
    result = await run_strategy(
        strategy, workload, settings, workers=2, partitions=4, work_ms=1.0, timeout=60
    )
    assert result.lost == 0
    assert result.messages == 300
    assert result.throughput > 0 and result.p99_ms >= result.p50_ms
    if strategy != "shared":
        assert result.order_violations == 0

"""Smoke run of the benchmark: every strategy runs, its figures are consistent, the report
has issue 13's rows and columns, and a run leaves nothing behind on the broker."""

from __future__ import annotations

import asyncio
import collections
import itertools
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys._metrics import PublisherMetrics
from rabbitkeys.tools.bench import applies, make_workload, markdown, run_strategy
from rabbitkeys.tools.bench.plots import write_plots
from rabbitkeys.tools.bench.runner import STRATEGIES, Result, _Batches

from .conftest import Broker
from .support import make_settings


def _bench_vhosts(broker: Broker) -> list[str]:
    return [
        vhost["name"]
        for vhost in broker.api("vhosts?columns=name")
        if vhost["name"].startswith("rabbitkeys-bench-")
    ]


@pytest.mark.processes
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_strategy_runs_and_ordered_ones_keep_order(
    amqp_url: str, namespace: str, broker: Broker, strategy: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    workload = make_workload("bursts", 300, paced_messages=100)
    before = set(_bench_vhosts(broker))
    result = await run_strategy(
        strategy, workload, settings, workers=2, partitions=4, work_ms=1.0, rate=200, timeout=60
    )
    assert result.lost == 0
    assert result.messages == 400
    assert result.paced_rate == 200
    assert result.throughput > 0 and result.p99_ms >= result.p50_ms
    # one AMQP message carries one job or more
    assert 0 < result.amqp_rate <= result.throughput * 1.0001
    assert result.batch_mean >= 1 and result.batch_p99 >= result.batch_p50 >= 1
    assert result.total_cpu_ms is not None and result.broker_cpu_ms is not None
    assert result.total_cpu_ms > result.broker_cpu_ms > 0
    if strategy != "shared":
        assert result.order_violations == 0
    # the run's vhost, and everything in it, is gone
    assert set(_bench_vhosts(broker)) <= before


@pytest.mark.processes
async def test_an_interrupted_run_removes_its_vhost(
    amqp_url: str, namespace: str, broker: Broker
) -> None:
    settings = make_settings(amqp_url, namespace)
    workload = make_workload("bursts", 20_000)
    before = set(_bench_vhosts(broker))
    run = asyncio.ensure_future(
        run_strategy("raw", workload, settings, workers=1, partitions=1, work_ms=1.0, timeout=60)
    )
    for _ in range(200):  # until the run has made its vhost and declared queues in it
        await asyncio.sleep(0.1)
        made = set(_bench_vhosts(broker)) - before
        if made and broker.api(f"queues/{made.pop()}?columns=name"):
            break
    run.cancel()  # what Ctrl-C does to `rabbitkeys bench`
    with pytest.raises(asyncio.CancelledError):
        await run
    assert set(_bench_vhosts(broker)) <= before


def test_bursts_interleaved_and_slow_are_the_same_jobs() -> None:
    bursts = make_workload("bursts", 10_000).keys
    interleaved = make_workload("interleaved", 10_000).keys
    slow = make_workload("slow", 10_000)
    assert len(set(bursts)) == 1000
    # each key's 10 messages back to back
    assert [len(list(run)) for _, run in itertools.groupby(bursts)] == [10] * 1000
    assert collections.Counter(interleaved) == collections.Counter(bursts)
    assert interleaved != bursts
    # slow is interleaved with 1 % of its keys slow: the interleaved row is its baseline
    assert slow.keys == interleaved and len(slow.slow_keys) == 10
    # the paced phase (200 keys) meets known keys, 1 % of them slow
    paced = make_workload("slow", 10_000, paced_messages=2000)
    assert len(set(paced.paced_keys)) == 200 and set(paced.paced_keys) <= set(paced.keys)
    assert len(set(paced.paced_keys) & paced.slow_keys) == 2
    assert len(set(make_workload("churn", 500).keys)) == 500
    assert not applies("raw", "churn") and applies("raw", "bursts")


def _result(
    strategy: str,
    workload: str,
    jobs: float,
    *,
    p99_ms: float = 2.0,
    fast_p99_ms: float | None = None,
    **fields: float,
) -> Result:
    figures = {"amqp_rate": jobs, "broker_cpu_ms": 0.5, "total_cpu_ms": 1.0, **fields}
    return Result(
        strategy, workload, 10, 1.0, jobs, 1.0, p99_ms, fast_p99_ms, 200.0, 0, 0, {}, **figures
    )


def test_the_report_and_plots_show_every_row_column_and_target(tmp_path: Path) -> None:
    results = []
    for workload, ours in (("bursts", 3000.0), ("interleaved", 1800.0)):
        results += [
            _result("shared", workload, 2800.0),
            _result("partitions", workload, 1800.0),
            _result("raw", workload, 2000.0),
            _result(
                "rabbitkeys",
                workload,
                ours,
                amqp_rate=ours / 5,
                batch_mean=5.0,
                batch_p50=5.0,
                batch_p99=10.0,
            ),
        ]
    results.append(_result("rabbitkeys", "slow", 1500.0, fast_p99_ms=2.5))
    churn = _result("rabbitkeys", "churn", 700.0)
    churn.extra["new_keys_per_second"] = 700.0
    results.append(churn)
    table = markdown(results, declare_rate=1000.0)
    assert (
        "| workload | strategy | jobs/s | AMQP msg/s | jobs per msg | p50 ms | p99 ms "
        "| fast keys p99 ms | order violations | lost | broker CPU ms/job | all CPU ms/job |"
    ) in table
    assert "| bursts | rabbitkeys | 3,000 | 600 | 5.0 (5 / 10) |" in table
    assert "| interleaved | raw | 2,000 | 2,000 | 1.0 (1 / 1) |" in table
    assert "| 0.50 | 1.00 |" in table
    assert "3,000 / 2,800 = 1.07 x, 0 violations | yes |" in table
    assert "1,800 / 2,800 = 0.64 x, 0 violations | **no** |" in table
    assert "2.5 / 2.0 ms = 1.25 x | yes |" in table
    assert "700 / 1,000 per s = 0.70 x | yes |" in table
    assert "| bursts: rabbitkeys / raw per-key queues (jobs/s) | 1.50 x | - |" in table
    assert "| interleaved: raw per-key queues / shared queue" in table
    pytest.importorskip("matplotlib")
    written = write_plots(results, tmp_path)
    assert [p.name for p in written] == [
        "throughput.png",
        "amqp_messages.png",
        "cpu_per_job.png",
        "latency_p99.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_batch_sizes_are_read_from_the_publishers_histogram() -> None:
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    metrics.batch_jobs.observe(1)  # before the phase
    before = _Batches.read(registry)
    for size in [1] * 50 + [10] * 49 + [100]:
        metrics.batch_jobs.observe(size)
    phase = _Batches.read(registry).since(before)
    assert phase.count == 100 and phase.total == 50 + 490 + 100
    assert phase.quantile(0.5) == 1 and phase.quantile(0.99) == 10
    assert phase.quantile(1.0) == 100
    # a publisher that records nothing: one job per message
    assert _Batches.read(CollectorRegistry()).quantile(0.99) == 1

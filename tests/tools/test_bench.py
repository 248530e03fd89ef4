"""Smoke run of the benchmark: every strategy runs, its figures are consistent, the report
has issue 13's rows and columns, and a run leaves nothing behind on the broker; ``--cluster``
reports every figure for classic and quorum key queues and stops its cluster, also when it
fails or is interrupted."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys._observe.metrics import PublisherMetrics
from rabbitkeys.tools.bench import applies, make_workload, markdown, run_strategy
from rabbitkeys.tools.bench.plots import write_plots
from rabbitkeys.tools.bench.runner import STRATEGIES, Result, _Batches
from rabbitkeys.tools.rabbit_cluster import RabbitCluster

from ..conftest import Broker
from ..support import make_settings, skip_or_fail


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


# --------------------------------------------------------------------------- --cluster

#: the bench's own cluster: apart from the test cluster's port base (5680) and the broker's
CLUSTER_PORT_BASE = int(os.environ.get("RABBITKEYS_TEST_BENCH_CLUSTER_PORT_BASE", "5740"))
_FIGURE_ROWS = (
    "bursts: jobs/s",
    "bursts: AMQP msg/s",
    "bursts: broker CPU ms/job (3 nodes)",
    "interleaved: jobs/s",
    "interleaved: AMQP msg/s",
    "interleaved: broker CPU ms/job (3 nodes)",
    "churn: new keys/s (declare + bind + first job)",
    "churn: broker CPU ms/new key (3 nodes)",
    "interleaved: broker memory KiB / live key (3 nodes' Erlang VMs)",
    "interleaved: broker RSS KiB / live key (3 nodes' beam.smp)",
)
_NUMBER = r"-?[\d,]+(?:\.\d+)?"


def _bench_cluster(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rabbitkeys",
        "bench",
        "--cluster",
        "--cluster-port-base",
        str(CLUSTER_PORT_BASE),
        *args,
    ]


def _cluster_is_gone() -> None:
    cluster = RabbitCluster(Path("/nonexistent"), port_base=CLUSTER_PORT_BASE)
    assert not any(cluster.pids(node.index) for node in cluster.nodes)
    assert not Path(f"/tmp/rabbitkeys-bench-cluster-{CLUSTER_PORT_BASE}").exists()


def _needs_a_cluster() -> None:
    if (reason := RabbitCluster.usable()) is not None:
        skip_or_fail(f"bench --cluster cannot start a cluster here: {reason}")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.timeout(600)
def test_cluster_bench_reports_every_figure_for_both_queue_types() -> None:
    _needs_a_cluster()
    done = subprocess.run(
        _bench_cluster("--messages", "200", "--churn-messages", "40", "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    for workload in ("bursts", "interleaved", "churn"):
        for queue_type in ("classic", "quorum"):
            # jobs/s, AMQP msg/s, CPU, new keys (churn only), memory per key; nothing lost
            row = re.search(rf"^\| {workload} \| {queue_type} \| (.*) \|$", report, re.M)
            assert row, f"no {workload} / {queue_type} row in\n{report}"
            cells = [c.strip() for c in row.group(1).split("|")]
            assert len(cells) == 7
            jobs, amqp, cpu, new_keys, memory, lost, violations = cells
            assert all(re.fullmatch(_NUMBER, c) for c in (jobs, amqp, cpu)), cells
            assert re.fullmatch(_NUMBER, new_keys) if workload == "churn" else new_keys == "-"
            assert re.fullmatch(rf"{_NUMBER} KiB", memory), cells
            assert (lost, violations) == ("0", "0"), cells
    for figure in _FIGURE_ROWS:
        match = re.search(
            rf"^\| {re.escape(figure)} \| ({_NUMBER}) \| ({_NUMBER}) \| (.*) \|$", report, re.M
        )
        assert match, f"no figure {figure!r} for both types in\n{report}"
        classic = float(match.group(1).replace(",", ""))
        assert match.group(3) == "-" if classic == 0 else match.group(3).endswith(" x")
    # key queues per node: three node columns, every key queue of the run counted once
    nodes = [f"rk{i}-{CLUSTER_PORT_BASE}@localhost" for i in (1, 2, 3)]
    assert "| workload | queue type | " + " | ".join(nodes) + " |" in report
    for workload, keys in (("bursts", 20), ("interleaved", 20), ("churn", 40)):
        for queue_type in ("classic", "quorum"):
            counts = re.findall(
                rf"^\| {workload} \| {queue_type} \| (\d+) \| (\d+) \| (\d+) \|$",
                report,
                re.M,
            )
            assert counts and sum(map(int, counts[0])) == keys, (workload, queue_type, report)
    _cluster_is_gone()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.timeout(300)
def test_an_interrupted_cluster_bench_stops_its_cluster() -> None:
    _needs_a_cluster()
    with subprocess.Popen(
        _bench_cluster("--messages", "2000", "--workers", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as bench:
        try:
            assert bench.stderr is not None
            for line in bench.stderr:  # until the first run has figures: the cluster is busy
                if re.search(r"bursts +classic: ", line):
                    break
            else:
                pytest.fail("bench --cluster ended before its first run")
            bench.send_signal(signal.SIGINT)  # what Ctrl-C does
            rest = bench.stderr.read()
            assert bench.wait(timeout=120) != 0
            assert "stopping the cluster" in rest
        finally:
            if bench.poll() is None:
                bench.kill()
    _cluster_is_gone()


@pytest.mark.cluster
def test_a_cluster_bench_that_cannot_start_leaves_nothing_behind() -> None:
    _needs_a_cluster()
    with socket.socket() as taken:  # the first node's AMQP port, held by someone else
        taken.bind(("127.0.0.1", CLUSTER_PORT_BASE + 1))
        taken.listen()
        done = subprocess.run(_bench_cluster(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    # refused up front, before any node booted
    assert f"ports [{CLUSTER_PORT_BASE + 1}] are in use" in done.stderr
    _cluster_is_gone()


def test_cluster_bench_refuses_transient_queues() -> None:
    # quorum queues are always durable: a classic side without would compare two things
    done = subprocess.run(_bench_cluster("--transient"), capture_output=True, text=True)
    assert done.returncode == 2
    assert "not with --transient" in done.stderr

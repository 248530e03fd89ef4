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
from rabbitkeys.tools.bench.brokers import BrokerSpecError, parse_broker
from rabbitkeys.tools.bench.by_hand import ByHand, measure_by_hand_new_keys
from rabbitkeys.tools.bench.plots import write_plots
from rabbitkeys.tools.bench.report import BrokerColumn, side_by_side_markdown
from rabbitkeys.tools.bench.runner import STRATEGIES, Result, _Batches
from rabbitkeys.tools.bench.side_by_side import _median_run
from rabbitkeys.tools.rabbit_cluster import RabbitCluster

from ..conftest import Broker
from ..support import make_settings, skip_or_fail

_NUMBER = r"-?[\d,]+(?:\.\d+)?"


def _bench_vhosts(broker: Broker) -> list[str]:
    """The bench vhosts this test process made (marked with its pid): the brokers are
    shared, and another session's bench makes and deletes its own meanwhile."""
    mark = f"rabbitkeys bench: pid {os.getpid()} on {socket.gethostname()}"
    return [
        vhost["name"]
        for vhost in broker.api("vhosts?columns=name,description")
        if vhost["name"].startswith("rabbitkeys-bench-") and vhost.get("description") == mark
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


# ------------------------------------------------- issue 25: new keys, by hand, two brokers


def test_new_bursts_are_the_bursts_on_keys_never_seen() -> None:
    bursts = make_workload("bursts", 1000, paced_messages=200)
    new = make_workload("new-bursts", 1000, paced_messages=200)
    assert [len(list(run)) for _, run in itertools.groupby(new.keys)] == [10] * 100
    assert not set(new.keys) & set(bursts.keys)
    # the paced phase's keys are new too, in bursts of 10
    assert len(set(new.paced_keys)) == 20 and not set(new.paced_keys) & set(new.keys)
    # raw declares its queues before it is timed: it has no row for new keys
    assert not applies("raw", "new-bursts") and applies("shared", "new-bursts")


@pytest.mark.processes
async def test_new_bursts_run_cold_and_keep_order(
    amqp_url: str, namespace: str, broker: Broker
) -> None:
    settings = make_settings(amqp_url, namespace)
    workload = make_workload("new-bursts", 200, paced_messages=40)
    result = await run_strategy(
        "rabbitkeys", workload, settings, workers=2, partitions=1, work_ms=1.0, timeout=60
    )
    assert (result.lost, result.order_violations, result.messages) == (0, 0, 240)
    # no warm-up: every key of the fast phase was new when it was timed
    assert result.extra["new_keys_per_second"] > 0


async def test_new_keys_by_hand_are_measured_in_a_vhost_that_goes(
    amqp_url: str, namespace: str, broker: Broker
) -> None:
    before = set(_bench_vhosts(broker))
    by_hand = await measure_by_hand_new_keys(make_settings(amqp_url, namespace), keys=48)
    assert by_hand.rate > 0
    # the broker on this host (CI's): its CPU per key is measured with the rate
    assert by_hand.broker_cpu_ms is not None and by_hand.broker_cpu_ms > 0
    assert set(_bench_vhosts(broker)) <= before


def _column(name: str, churn_rate: float, by_hand: ByHand) -> BrokerColumn:
    churn = _result("rabbitkeys", "churn", churn_rate)
    churn.extra["new_keys_per_second"] = churn_rate
    results = [
        _result("shared", "new-bursts", 2000.0),
        _result("rabbitkeys", "new-bursts", 1600.0),
        _result("shared", "churn", 2100.0),
        churn,
    ]
    return BrokerColumn(name, results, declare_rate=500.0, by_hand=by_hand)


def test_the_by_hand_row_and_its_ratio() -> None:
    column = _column("local", 300.0, ByHand(400.0, 8.0))
    table = markdown(column.results, declare_rate=column.declare_rate, by_hand=column.by_hand)
    assert (
        "| new keys by hand: declare a durable SAC queue, bind, consume, publish one "
        "persistent message, get it acked, 16 lanes in parallel | 400 per s | - |"
    ) in table
    assert "| new keys: rabbitkeys >= 1.0 x by hand (new keys/s, churn, nothing lost) | " in table
    assert "300 / 400 per s = 0.75 x | **no** |" in table
    # the broker's work per new key beside it (churn's 0.5 ms against 8 by hand)
    assert "| broker CPU per new key: rabbitkeys (churn) / by hand | 0.50 / 8.00 ms = 0.06 x |" in (
        table
    )
    assert "1,600 / 2,000 = 0.80 x, 0 violations | **no** |" in table  # new-bursts vs shared
    # without a churn run, the by-hand rate stands alone
    alone = markdown(column.results[:2], by_hand=ByHand(400.0))
    assert "| 400 per s | - |" in alone and "x by hand" not in alone


def test_side_by_side_has_a_column_per_broker_for_each_figure_and_ratio() -> None:
    table = side_by_side_markdown(
        [_column("3.10", 300.0, ByHand(400.0)), _column("4.0.5", 500.0, ByHand(400.0))]
    )
    assert "| figure | 3.10 | 4.0.5 |" in table
    assert "| target | 3.10 | 4.0.5 |" in table
    assert "| churn / rabbitkeys: jobs/s | 300 | 500 |" in table
    assert "| new-bursts / shared: lost / order violations | 0 / 0 | 0 / 0 |" in table
    assert "| 300 / 400 per s = 0.75 x (**no**) | 500 / 400 per s = 1.25 x (yes) |" in table
    assert "| new keys by hand: " in table and "| 400 per s | 400 per s |" in table


@pytest.mark.parametrize(
    "value",
    [
        "amqp://localhost:5672/,http://localhost:15672/",  # no name
        "a=amqp://localhost:5672/",  # no management URL
        "a=http://localhost:15672/,amqp://localhost:5672/",  # swapped
        "=amqp://localhost:5672/,http://localhost:15672/",
    ],
)
def test_a_bad_broker_value_is_refused_clearly(value: str) -> None:
    with pytest.raises(BrokerSpecError, match="--broker"):
        parse_broker(value, make_settings("amqp://localhost/", "t"))


def test_a_bad_broker_value_does_not_print_its_password() -> None:
    with pytest.raises(BrokerSpecError) as refused:
        parse_broker("amqp://guest:s3cret@localhost:5672/", make_settings("amqp://localhost/", "t"))
    assert "s3cret" not in str(refused.value) and "guest:***@" in str(refused.value)


def test_a_broker_value_points_the_settings_at_that_broker() -> None:
    parsed = parse_broker(
        "4.0=amqp://guest:guest@localhost:5710/,http://guest:guest@localhost:15710/",
        make_settings("amqp://localhost/", "t", durable=False),
    )
    assert parsed.name == "4.0"
    assert parsed.settings.amqp_urls == ["amqp://guest:guest@localhost:5710/"]
    assert parsed.settings.management_url is not None
    assert (
        parsed.settings.management_url.get_secret_value() == "http://guest:guest@localhost:15710/"
    )
    assert parsed.settings.durable is False  # the rest of the settings kept


@pytest.mark.parametrize(
    "args",
    [
        ["--broker", "nonsense"],
        ["--broker", "a=amqp://localhost:5672/,ftp://localhost/"],
        ["--broker", "a=amqp://x/,http://x/", "--broker", "a=amqp://y/,http://y/"],
        ["--broker", "a=amqp://x/,http://x/", "--scale", "10"],
    ],
)
def test_the_cli_refuses_a_bad_broker_with_exit_2(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--broker" in done.stderr
    assert "Traceback" not in done.stderr


def test_rounds_keep_the_run_of_median_throughput() -> None:
    runs = [_result("rabbitkeys", "churn", jobs, p99_ms=jobs) for jobs in (300.0, 100.0, 200.0)]
    assert _median_run(runs) is runs[2]
    assert _median_run(runs[:2]) is runs[1]  # of two, the lower: no figure made up


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--rounds", "2", "--cluster"]])
def test_the_cli_refuses_bad_rounds_with_exit_2(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "bench", *args], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--rounds" in done.stderr, done.stderr


#: the two brokers of the side-by-side run: 3.10 and 4.x (override for other machines)
TWO_BROKERS = os.environ.get(
    "RABBITKEYS_TEST_BENCH_BROKERS",
    "3.10=amqp://guest:guest@localhost:5672/,http://guest:guest@localhost:15672/;"
    "4.0.5=amqp://guest:guest@localhost:5710/,http://guest:guest@localhost:15710/",
).split(";")


def _version_of(spec: str) -> str:
    parsed = parse_broker(spec, make_settings("amqp://localhost/", "t"))
    from rabbitkeys.tools.bench.brokers import rabbitmq_version

    version = rabbitmq_version(parsed.settings)
    if version is None:
        skip_or_fail(f"no management API answers for --broker {parsed.name}")
    assert version is not None
    return version


@pytest.mark.broker
@pytest.mark.rabbitmq4
@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_brokers_in_one_run_each_with_its_column_and_version() -> None:
    versions = {spec.partition("=")[0]: _version_of(spec) for spec in TWO_BROKERS}
    brokers = [arg for spec in TWO_BROKERS for arg in ("--broker", spec)]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "rabbitkeys", "bench", *brokers),
            *("--strategies", "shared,raw,rabbitkeys", "--workloads", "new-bursts,churn"),
            *("--messages", "100", "--churn-messages", "20", "--paced-messages", "20"),
            *("--workers", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    machine = report.splitlines()[0]
    for name, version in versions.items():
        assert f"RabbitMQ {version} ({name})" in machine, machine
        assert f"### {name}: RabbitMQ {version}" in report
    names = list(versions)
    assert f"| figure | {' | '.join(names)} |" in report
    assert f"| target | {' | '.join(names)} |" in report
    for row in ("new-bursts / rabbitkeys: jobs/s", "churn / rabbitkeys: jobs/s"):
        cells = re.search(rf"^\| {re.escape(row)} \| (.*) \|$", report, re.M)
        assert cells, f"no {row!r} in\n{report}"
        assert all(re.fullmatch(_NUMBER, c.strip()) for c in cells.group(1).split("|"))
    for row in ("new-bursts / rabbitkeys: lost / order violations",):
        assert re.search(rf"^\| {re.escape(row)} \| 0 / 0 \| 0 / 0 \|$", report, re.M), report
    # the by-hand ratio, in the side-by-side table (the last one): a measure per broker
    ratios = re.findall(r"^\| new keys: rabbitkeys >= 1.0 x by hand .*\|$", report, re.M)
    assert ratios and ratios[-1].count(" per s = ") == 2, report
    assert "new-bursts / raw" not in report  # raw has no row for new keys


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


async def test_a_bench_run_does_not_start_after_a_swallowed_cancel() -> None:
    """Ctrl-C cancels the bench's main task; a cancel swallowed on the way (Python 3.11's
    wait_for, aiormq's channel close) still stops it before the next run, which would
    otherwise run, and the bench exit 0. Nothing answers on port 1: a run that started
    would fail with BrokerUnavailableError, not CancelledError."""
    settings = make_settings("amqp://guest:guest@127.0.0.1:1/", "bench-cancelled")
    waiting = asyncio.Event()

    async def bench() -> None:
        waiting.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # swallowed, as a library may
        await run_strategy(
            "rabbitkeys", make_workload("bursts", 10), settings, workers=1, partitions=1, work_ms=1
        )

    task = asyncio.create_task(bench())
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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

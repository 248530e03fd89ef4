"""Run each strategy on each workload, on the same broker, client library and worker count.

Strategies:

* ``shared``: one queue, N workers, handlers concurrent: the throughput ceiling; breaks order;
* ``single``: one queue, one worker, one message at a time: ordered, the article's simple way;
* ``partitions``: a consistent-hash exchange into P single-active-consumer queues, N workers,
  one message at a time per queue: ordered, Kafka-like;
* ``rabbitkeys``: a registry and N workers through the CLI.

Every handler awaits ``work_ms`` (1 ms: an I/O-bound job); slow keys 100 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

from ..._errors import BrokerUnavailableError
from ..._management import _get, list_queues
from ..._publisher import Publisher
from ..._settings import Settings
from ..._topology import Names
from ..cluster import LocalCluster
from .recording import HEADER_PUBLISHED, HEADER_SEQ, Record, count_all, read_all
from .workloads import Workload

__all__ = ["STRATEGIES", "Result", "measure_declare_rate", "run_strategy"]

STRATEGIES = ("shared", "single", "partitions", "rabbitkeys")
IN_FLIGHT = 1000  # publishes awaiting their confirm at once, for every strategy


@dataclass
class Result:
    strategy: str
    workload: str
    messages: int
    seconds: float
    throughput: float
    #: publish call -> handler start, in the paced phase (in the fast one if none)
    p50_ms: float
    p99_ms: float
    #: p99 of keys that are not slow (the "slow" workload), else None
    fast_p99_ms: float | None
    #: the paced phase's rate, messages per second (0: no paced phase)
    paced_rate: float
    order_violations: int
    lost: int
    extra: dict[str, float]


async def run_strategy(
    strategy: str,
    workload: Workload,
    settings: Settings,
    *,
    workers: int,
    partitions: int,
    work_ms: float,
    rate: float = 200.0,
    timeout: float = 300.0,
) -> Result:
    namespace = f"bench-{strategy}-{uuid.uuid4().hex[:6]}"
    # Short x-expires as a backstop, and every key queue deleted at the end: thousands of
    # durable queues left behind make the broker's next boot crawl.
    settings = settings.model_copy(
        update={
            "namespace": namespace,
            "log_level": "WARNING",
            "key_queue_expires": 60.0,
            # an overloaded registry (key churn) shows as latency, not as failed publishes
            "ensure_timeout": timeout,
            "publish_timeout": timeout,
        }
    )
    with tempfile.TemporaryDirectory(prefix="rabbitkeys-bench-") as scratch:
        directory = Path(scratch)
        env = {
            **os.environ,
            "RK_BENCH_DIR": scratch,
            "RK_BENCH_SLOW": ",".join(sorted(workload.slow_keys)),
            "RK_BENCH_WORK_MS": str(work_ms),
            "RABBITKEYS_AMQP_URL": settings.amqp_url.get_secret_value(),
        }
        extra: dict[str, float] = {}
        if strategy == "rabbitkeys":
            try:
                phases = await _run_rabbitkeys(
                    settings, workload, workers, env, directory, rate, timeout, extra
                )
            finally:
                await _delete_key_queues(settings)
        else:
            phases = await _run_baseline(
                strategy, settings, workload, workers, partitions, env, directory, rate, timeout
            )
        records = [r for r in read_all(directory) if r.published >= phases.started]
    return _summarise(strategy, workload, records, phases, rate, extra)


# --- the baselines, on plain aio-pika ---------------------------------------------------


async def _run_baseline(
    strategy: str,
    settings: Settings,
    workload: Workload,
    workers: int,
    partitions: int,
    env: dict[str, str],
    directory: Path,
    rate: float,
    timeout: float,
) -> _Phases:
    ns = settings.namespace
    durable = settings.durable
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    channel = await connection.channel(publisher_confirms=True)
    if strategy == "partitions":
        exchange = await channel.declare_exchange(
            f"{ns}.partitions", "x-consistent-hash", durable=durable, auto_delete=True
        )
        queues = [f"{ns}.p{i}" for i in range(partitions)]
        for name in queues:
            queue = await channel.declare_queue(
                name,
                durable=durable,
                auto_delete=True,
                arguments={"x-single-active-consumer": True},
            )
            await queue.bind(exchange, routing_key="1")
        mode, per_worker = "sequential", [queues] * workers
    else:
        queues = [f"{ns}.{strategy}"]
        await channel.declare_queue(queues[0], durable=durable, auto_delete=True)
        exchange = channel.default_exchange
        mode = "concurrent" if strategy == "shared" else "sequential"
        per_worker = [queues] * (workers if strategy == "shared" else 1)
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rabbitkeys.tools.bench.baseline_worker", mode, *names, env=env
        )
        for names in per_worker
    ]
    try:
        await _wait_consumed(channel, queues)
        sequences: dict[str, int] = {}
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def publish(key: str) -> None:
            sequences[key] = seq = sequences.get(key, 0) + 1
            message = aio_pika.Message(
                b"x",
                delivery_mode=(
                    aio_pika.DeliveryMode.PERSISTENT
                    if durable
                    else aio_pika.DeliveryMode.NOT_PERSISTENT
                ),
                headers={"bench-key": key, HEADER_SEQ: seq, HEADER_PUBLISHED: _now_us()},
            )
            routing_key = key if strategy == "partitions" else queues[0]
            async with limit:
                await exchange.publish(message, routing_key=routing_key)

        phases = await _measure(publish, workload, directory, rate, timeout)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await process.wait()
        for name in queues:
            await channel.queue_delete(name)
        await connection.close()
    return phases


async def _wait_consumed(channel: aio_pika.abc.AbstractChannel, queues: list[str]) -> None:
    for _ in range(200):
        counts = [
            (await channel.declare_queue(name, passive=True)).declaration_result.consumer_count
            for name in queues
        ]
        if all(counts):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("benchmark workers did not start consuming")


# --- rabbitkeys ---------------------------------------------------------------------------


async def _run_rabbitkeys(
    settings: Settings,
    workload: Workload,
    workers: int,
    env: dict[str, str],
    directory: Path,
    rate: float,
    timeout: float,
    extra: dict[str, float],
) -> _Phases:
    cluster_env = {k: v for k, v in env.items() if k.startswith("RK_BENCH")}
    async with LocalCluster(settings, extra_env=cluster_env) as cluster:
        await cluster.start_registry()
        for _ in range(workers):
            await cluster.start_worker("rabbitkeys.tools.bench.app:app")
        await cluster.wait_for_workers(workers)
        broker_before = _broker_memory(settings)
        rss_before = _rss([p.pid for p in cluster.workers])
        async with Publisher(settings) as publisher:
            limit = asyncio.Semaphore(IN_FLIGHT)

            async def publish(key: str) -> None:
                async with limit:
                    await publisher.publish(key, b"x", headers={HEADER_PUBLISHED: _now_us()})

            phases = await _measure(publish, workload, directory, rate, timeout)
        keys = workload.distinct_keys
        if broker_before is not None and (after := _broker_memory(settings)) is not None:
            extra["broker_bytes_per_key"] = (after - broker_before) / keys
        extra["worker_bytes_per_key"] = (_rss([p.pid for p in cluster.workers]) - rss_before) / keys
        extra["new_keys_per_second"] = keys / max(1e-9, phases.fast_done - phases.started)
    return phases


# --- shared -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phases:
    started: float  # the fast phase's first publish
    fast_done: float  # all of the fast phase handled
    paced_started: float
    #: CPU seconds the broker (on this host) spent during the fast phase, if readable
    broker_cpu: float | None = None


async def _measure(
    publish: Any, workload: Workload, directory: Path, rate: float, timeout: float
) -> _Phases:
    """Warm up; publish the workload as fast as it is confirmed (throughput); then publish
    its paced part at ``rate`` per second (latency without the queueing of the first).

    The warm-up is one message per key, so that keyed workloads are measured in steady
    state (keys known); key churn is measured cold, that being its point.
    """
    warmup = [] if workload.name == "churn" else list(dict.fromkeys(workload.keys))
    await _publish_all(publish, warmup)
    await _wait_handled(directory, len(warmup), timeout)
    broker_cpu_before = broker_cpu_seconds()
    started = time.time()
    await _publish_all(publish, workload.keys)
    handled = len(warmup) + len(workload.keys)
    fast_done = await _wait_handled(directory, handled, timeout)
    broker_cpu_after = broker_cpu_seconds()
    broker_cpu = (
        broker_cpu_after - broker_cpu_before
        if broker_cpu_before is not None and broker_cpu_after is not None
        else None
    )
    paced_started = time.time()
    if workload.paced_keys:
        await _publish_all(publish, workload.paced_keys, rate=rate)
        await _wait_handled(directory, handled + len(workload.paced_keys), timeout)
    return _Phases(started, fast_done, paced_started, broker_cpu)


async def _publish_all(publish: Any, keys: list[str], *, rate: float | None = None) -> None:
    # Calls made in workload order (per key, that is the order to keep); up to IN_FLIGHT
    # confirms awaited at once. With a rate: call i is made at start + i / rate.
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, key in enumerate(keys):
        if rate:
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(publish(key)))
    await asyncio.gather(*tasks)


async def _wait_handled(directory: Path, expected: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while count_all(directory) < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the workers flush every 0.2 s
    return time.time()


def _summarise(
    strategy: str,
    workload: Workload,
    records: list[Record],
    phases: _Phases,
    rate: float,
    extra: dict[str, float],
) -> Result:
    fast_phase = [r for r in records if r.published < phases.paced_started]
    paced = [r for r in records if r.published >= phases.paced_started]
    if not fast_phase:
        raise RuntimeError(f"{strategy}/{workload.name}: nothing was handled")
    seconds = max(r.finished for r in fast_phase) - phases.started
    timed = paced or fast_phase
    latencies = sorted((r.started - r.published) * 1000 for r in timed)
    fast = sorted(
        (r.started - r.published) * 1000 for r in timed if r.key not in workload.slow_keys
    )
    expected = len(workload.keys) + len(workload.paced_keys)
    if phases.broker_cpu is not None:
        extra["broker_cpu_ms_per_message"] = phases.broker_cpu * 1000 / len(fast_phase)
    return Result(
        strategy=strategy,
        workload=workload.name,
        messages=len(records),
        seconds=seconds,
        throughput=len(fast_phase) / seconds,
        p50_ms=statistics.median(latencies),
        p99_ms=_percentile(latencies, 0.99),
        fast_p99_ms=_percentile(fast, 0.99) if workload.slow_keys else None,
        paced_rate=rate if paced else 0.0,
        order_violations=count_order_violations(records),
        lost=expected - len({(r.key, r.seq) for r in records}),
        extra=extra,
    )


def count_order_violations(records: list[Record]) -> int:
    """Messages that started before the previous message of their key (in publish order)
    had finished: run before it, or at the same time."""
    by_key: dict[str, list[Record]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    violations = 0
    for key_records in by_key.values():
        key_records.sort(key=lambda r: r.seq)
        for previous, current in itertools.pairwise(key_records):
            if current.started < previous.finished:
                violations += 1
    return violations


async def _delete_key_queues(settings: Settings) -> None:
    names = Names(settings.namespace)
    try:
        queues = await list_queues(settings, names.key_queue_prefix)
    except BrokerUnavailableError:
        return  # no management API: x-expires removes them within a minute
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue.name)
        for job_type in {"default"}:
            await channel.exchange_delete(names.jobs_exchange(job_type))
    finally:
        await connection.close()


def _now_us() -> int:
    # integer microseconds: a float header travels as a 32-bit float (pamqp)
    return time.time_ns() // 1000


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def _broker_memory(settings: Settings) -> float | None:
    try:
        nodes = _get(settings, "nodes?columns=mem_used")
        return float(sum(node["mem_used"] for node in nodes))
    except Exception:
        return None


def broker_cpu_seconds() -> float | None:
    """CPU time of the RabbitMQ node on this host (``beam.smp``), or None if not found."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if "(beam.smp)" in stat.read_text():
                return cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def measure_declare_rate(settings: Settings, queues: int = 2000, channels: int = 16) -> float:
    """The broker's raw rate of declaring a new queue and binding it, over 16 channels."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    prefix = f"bench-raw-{uuid.uuid4().hex[:6]}"
    try:
        opened = [await connection.channel() for _ in range(channels)]
        exchange = await opened[0].declare_exchange(f"{prefix}.x", "direct", auto_delete=True)
        names = [f"{prefix}.q{i}" for i in range(queues)]

        async def declare_some(channel: aio_pika.abc.AbstractChannel, part: list[str]) -> None:
            for name in part:
                queue = await channel.declare_queue(
                    name,
                    durable=settings.durable,
                    arguments={"x-expires": 60_000, "x-single-active-consumer": True},
                )
                await queue.bind(exchange, routing_key=name)

        started = time.perf_counter()
        await asyncio.gather(*(declare_some(ch, names[i::channels]) for i, ch in enumerate(opened)))
        rate = queues / (time.perf_counter() - started)
        for i, name in enumerate(names):
            await opened[i % channels].queue_delete(name)
        return rate
    finally:
        await connection.close()

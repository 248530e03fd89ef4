"""Run each strategy on each workload, on the same broker, client library and worker count.

Strategies:

* ``shared``: one queue, N workers, handlers concurrent: the throughput ceiling; breaks order;
* ``single``: one queue, one worker, one message at a time: ordered, the article's simple way;
* ``partitions``: a consistent-hash exchange into P single-active-consumer queues, N workers,
  one message at a time per queue: ordered, Kafka-like;
* ``raw``: plain aio-pika on pre-declared durable single-active-consumer queues, one per key,
  one consumer each (prefetch 4) spread over the N workers, one message at a time per key:
  rabbitkeys' design without rabbitkeys, the ceiling without batching;
* ``rabbitkeys``: a registry and N workers through the CLI.

Every handler awaits ``work_ms`` (1 ms: an I/O-bound job); slow keys 100 ms. Each run has a
vhost of its own (``broker.run_vhost``), deleted at the end.

A job is one ``publish()``; an AMQP message carries one job, or several of one key when the
publisher batches them. Rates and CPU are per job; ``amqp_rate`` is AMQP messages per second,
counted by the publisher (rabbitkeys' ``rabbitkeys_publish_batch_jobs``; one per job for the
others).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from prometheus_client import CollectorRegistry

from ..._broker.amqp import broker_version
from ..._broker.management import list_queues
from ..._errors import BrokerUnavailableError
from ..._publisher.publisher import Publisher
from ..._settings import Settings
from ..._wire.topology import Names, key_queue_durable
from ..cluster import LocalCluster
from .broker import (
    broker_cpu_seconds,
    broker_erlang_memory,
    broker_memory,
    broker_pids,
    cpu_seconds,
    key_queue_nodes,
    processes_cpu,
    run_vhost,
)
from .recording import HEADER_PUBLISHED, HEADER_SEQ, Record, count_all, read_all
from .workloads import COLD_WORKLOADS, Workload

__all__ = [
    "DEFAULT_STRATEGIES",
    "STRATEGIES",
    "Result",
    "applies",
    "broker_cpu_seconds",
    "cpu_seconds",
    "measure_declare_rate",
    "run_strategy",
]

STRATEGIES = ("shared", "single", "partitions", "raw", "rabbitkeys")
#: what ``rabbitkeys bench`` runs unless told otherwise ("single" is slow and says little)
DEFAULT_STRATEGIES = ("shared", "partitions", "raw", "rabbitkeys")
IN_FLIGHT = 1000  # publishes awaiting their confirm at once, for every strategy
#: channels the raw strategy and the raw declare rate declare queues over
DECLARE_CHANNELS = 16


def applies(strategy: str, workload: str) -> bool:
    """Whether a row means anything: ``raw`` declares its queues before it is timed, so on
    new keys (churn, new-bursts) it would time nothing of them (the raw declare rate and
    the by-hand new-key rate stand there)."""
    return not (strategy == "raw" and workload in COLD_WORKLOADS)


@dataclass
class Result:
    strategy: str
    workload: str
    messages: int
    seconds: float
    #: jobs per second, fast phase
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
    #: AMQP messages per second, fast phase (= throughput without batches)
    amqp_rate: float = 0.0
    #: jobs per AMQP message in the fast phase: mean, p50, p99 (bucket bounds)
    batch_mean: float = 1.0
    batch_p50: float = 1.0
    batch_p99: float = 1.0
    #: CPU ms per job in the fast phase: the broker's, and all processes' together
    broker_cpu_ms: float | None = None
    total_cpu_ms: float | None = None
    #: rabbitkeys: key queues per node their leader runs on, at the end of the fast phase
    key_queue_nodes: dict[str, int] = field(default_factory=dict)


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
    _stop_if_cancelled()
    async with run_vhost(settings, f"{strategy}-{workload.name}") as run_settings:
        result = await _run_strategy(
            strategy,
            workload,
            run_settings,
            own_vhost=run_settings.vhost != settings.vhost,
            workers=workers,
            partitions=partitions,
            work_ms=work_ms,
            rate=rate,
            timeout=timeout,
        )
    _stop_if_cancelled()
    return result


def _stop_if_cancelled() -> None:
    """Raise :class:`asyncio.CancelledError` if this task was cancelled (Ctrl-C cancels the
    bench's main task) and something on the way swallowed it: Python 3.11's ``wait_for``
    returns a result that is ready in the same turn as the cancel, and aiormq drops one that
    lands in a channel's close. The bench would then run all its remaining runs and exit 0;
    the cancel request stays counted (``Task.cancelling``), so it stops here instead, before
    the next run and before a run's figures are reported."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _run_strategy(
    strategy: str,
    workload: Workload,
    settings: Settings,
    *,
    own_vhost: bool,
    workers: int,
    partitions: int,
    work_ms: float,
    rate: float,
    timeout: float,
) -> Result:
    namespace = f"bench-{strategy}-{uuid.uuid4().hex[:6]}"
    # Thousands of durable queues left behind make the broker's next boot crawl: they go
    # with the run's vhost; in a vhost not the run's own, by name at the end, and a short
    # x-expires as a backstop. Not in its own vhost: under load a worker may start
    # consuming a new key later than that, and its queue would expire with its messages.
    settings = settings.model_copy(
        update={
            "namespace": namespace,
            "log_level": "WARNING",
            "key_queue_expires": settings.key_queue_expires if own_vhost else 60.0,
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
        spread: dict[str, int] = {}
        if strategy == "rabbitkeys":
            try:
                phases = await _run_rabbitkeys(
                    settings, workload, workers, env, directory, rate, timeout, extra, spread
                )
            finally:
                if not own_vhost:  # else they go with the vhost
                    await _delete_key_queues(settings)
        else:
            phases = await _run_baseline(
                strategy, settings, workload, workers, partitions, env, directory, rate, timeout
            )
        records = [r for r in read_all(directory) if r.published >= phases.started]
    result = _summarise(strategy, workload, records, phases, rate, extra)
    result.key_queue_nodes = spread
    return result


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
    connection = await aio_pika.connect(settings.amqp_urls[0])
    # transient messages in durable queues on RabbitMQ 4, as rabbitkeys' own key queues
    queue_durable = key_queue_durable(durable, broker_version(connection))
    channel = await connection.channel(publisher_confirms=True)
    routing: Callable[[str], str]
    declared: list[str] = []  # what to delete, however far the run got
    try:
        if strategy == "partitions":
            exchange = await channel.declare_exchange(
                f"{ns}.partitions", "x-consistent-hash", durable=durable, auto_delete=True
            )
            queues = [f"{ns}.p{i}" for i in range(partitions)]
            for name in queues:
                queue = await channel.declare_queue(
                    name,
                    durable=queue_durable,
                    auto_delete=True,
                    arguments={"x-single-active-consumer": True},
                )
                declared.append(name)
                await queue.bind(exchange, routing_key="1")
            mode, per_worker = "sequential", [queues] * workers
            routing = str  # the key, hashed by the exchange
        elif strategy == "raw":
            # one queue per key, bound by its key to a direct exchange, as rabbitkeys does
            exchange = await channel.declare_exchange(f"{ns}.raw", "direct", durable=durable)
            keys = list(dict.fromkeys(workload.keys + workload.paced_keys))
            queues = [f"{ns}.k.{key}" for key in keys]
            await _declare_bound(connection, exchange.name, keys, queues, queue_durable, declared)
            mode, per_worker = "raw", [queues[i::workers] for i in range(workers)]
            routing = str
        else:
            queues = [f"{ns}.{strategy}"]
            await channel.declare_queue(queues[0], durable=queue_durable, auto_delete=True)
            declared.append(queues[0])
            exchange = channel.default_exchange
            mode = "concurrent" if strategy == "shared" else "sequential"
            per_worker = [queues] * (workers if strategy == "shared" else 1)
            routing = lambda key: queues[0]  # noqa: E731
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rabbitkeys.tools.bench.baseline_worker",
                mode,
                *names,
                env=env,
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
                async with limit:
                    await exchange.publish(message, routing_key=routing(key))

            phases = await _measure(
                publish,
                workload,
                directory,
                rate,
                timeout,
                broker_pids(settings),
                [p.pid for p in processes],
            )
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
            for process in processes:
                await process.wait()
    finally:
        # the run's vhost goes too; this is for a run in a vhost it may not delete
        await _delete_queues(connection, declared)
        await connection.close()
    return phases


async def _declare_bound(
    connection: aio_pika.abc.AbstractConnection,
    exchange: str,
    keys: list[str],
    queues: list[str],
    durable: bool,
    declared: list[str],
) -> None:
    """Single-active-consumer queues bound by their key, over several channels; each
    added to ``declared`` once it exists."""
    channels = [await connection.channel() for _ in range(DECLARE_CHANNELS)]

    async def declare_some(channel: aio_pika.abc.AbstractChannel, part: range) -> None:
        for i in part:
            queue = await channel.declare_queue(
                queues[i], durable=durable, arguments={"x-single-active-consumer": True}
            )
            declared.append(queues[i])
            await queue.bind(exchange, routing_key=keys[i])

    try:
        await asyncio.gather(
            *(
                declare_some(channel, range(i, len(queues), DECLARE_CHANNELS))
                for i, channel in enumerate(channels)
            )
        )
    finally:
        for channel in channels:
            await channel.close()


async def _delete_queues(connection: aio_pika.abc.AbstractConnection, queues: list[str]) -> None:
    if not queues or connection.is_closed:
        return
    channels = [await connection.channel() for _ in range(min(DECLARE_CHANNELS, len(queues)))]

    async def delete_some(channel: aio_pika.abc.AbstractChannel, part: list[str]) -> None:
        for name in part:
            await channel.queue_delete(name)

    await asyncio.gather(
        *(delete_some(channel, queues[i :: len(channels)]) for i, channel in enumerate(channels))
    )


async def _wait_consumed(channel: aio_pika.abc.AbstractChannel, queues: list[str]) -> None:
    waiting = list(queues)
    for _ in range(200):
        waiting = [
            name
            for name in waiting
            if not (
                await channel.declare_queue(name, passive=True)
            ).declaration_result.consumer_count
        ]
        if not waiting:
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
    spread: dict[str, int],
) -> _Phases:
    cluster_env = {k: v for k, v in env.items() if k.startswith("RK_BENCH")}
    async with LocalCluster(settings, extra_env=cluster_env) as cluster:
        await cluster.start_registry()
        for _ in range(workers):
            await cluster.start_worker("rabbitkeys.tools.bench.app:app")
        try:
            await cluster.wait_for_workers(workers)
            phases = await _measure_rabbitkeys(
                settings, cluster, workload, directory, rate, timeout, extra, spread
            )
        except BaseException:
            # interrupted or failed: no graceful stop (up to 30 s each; a worker finishing
            # its keys without a registry), the run's vhost and queues go anyway
            for process in cluster.workers + cluster.registries:
                if process.returncode is None:
                    process.kill()
            raise
    return phases


async def _measure_rabbitkeys(
    settings: Settings,
    cluster: LocalCluster,
    workload: Workload,
    directory: Path,
    rate: float,
    timeout: float,
    extra: dict[str, float],
    spread: dict[str, int],
) -> _Phases:
    broker_before = broker_memory(settings)
    brokers = broker_pids(settings)
    # mem_used above is the management API's, refreshed every 5 s: a short run may see no
    # change in it; the nodes' Erlang memory (computed when asked) and RSS are read now
    erlang_before = broker_erlang_memory(settings)
    broker_rss_before = _rss(brokers)
    rss_before = _rss([p.pid for p in cluster.workers])
    # a registry of its own: the batch sizes of this run only
    metrics = CollectorRegistry()
    publisher = Publisher(settings, metrics_registry=metrics)
    await publisher.start()
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def publish(key: str) -> None:
        async with limit:
            await publisher.publish(key, b"x", headers={HEADER_PUBLISHED: _now_us()})

    pids = [p.pid for p in cluster.workers + cluster.registries]
    measured = False
    try:
        phases = await _measure(publish, workload, directory, rate, timeout, brokers, pids, metrics)
        measured = True
    finally:
        # close() waits up to publish_timeout for publishes already called to settle:
        # right after a complete run, but not after Ctrl-C or a failure, when what is
        # unsettled may wait for a registry that is gone
        try:
            await asyncio.wait_for(publisher.close(), None if measured else 5.0)
        except TimeoutError:
            await publisher._stop_connection()
    keys = workload.distinct_keys
    if broker_before is not None and (after := broker_memory(settings)) is not None:
        extra["broker_bytes_per_key"] = (after - broker_before) / keys
    extra["worker_bytes_per_key"] = (_rss([p.pid for p in cluster.workers]) - rss_before) / keys
    if brokers:
        extra["broker_rss_bytes_per_key"] = (_rss(brokers) - broker_rss_before) / keys
    if erlang_before is not None and (erlang := broker_erlang_memory(settings)) is not None:
        extra["broker_erlang_bytes_per_key"] = (erlang - erlang_before) / keys
    extra["new_keys_per_second"] = keys / max(1e-9, phases.fast_done - phases.started)
    # while the run's queues exist (they go with its vhost): where the locator put them
    spread.update(
        await asyncio.to_thread(
            key_queue_nodes, settings, Names(settings.namespace).key_queue_prefix
        )
    )
    return phases


# --- shared -------------------------------------------------------------------------------

BATCH_METRIC = "rabbitkeys_publish_batch_jobs"


@dataclass(frozen=True)
class _Batches:
    """The publisher's jobs-per-AMQP-message histogram at one moment (cumulative)."""

    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> count <= it
    total: float = 0.0  # jobs in them
    count: float = 0.0  # AMQP messages

    @classmethod
    def read(cls, registry: CollectorRegistry | None) -> _Batches:
        if registry is None:
            return cls()
        buckets, total, count = {}, 0.0, 0.0
        for metric in registry.collect():
            if metric.name != BATCH_METRIC:
                continue
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
        return cls(buckets, total, count)

    def since(self, before: _Batches) -> _Batches:
        return _Batches(
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - before.total,
            self.count - before.count,
        )

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (1 if nothing recorded)."""
        for bound, below in sorted(self.buckets.items()):
            if self.count and below >= q * self.count:
                return bound
        return 1.0


@dataclass(frozen=True)
class _Snapshot:
    broker_cpu: float | None  # the RabbitMQ nodes on this host, summed, if found
    clients_cpu: float  # this process (the publisher) and the run's other processes
    batches: _Batches

    @classmethod
    def take(
        cls, broker: list[int], pids: list[int], metrics: CollectorRegistry | None
    ) -> _Snapshot:
        return cls(
            broker_cpu_seconds(broker) if broker else None,
            processes_cpu([os.getpid(), *pids]),
            _Batches.read(metrics),
        )


@dataclass(frozen=True)
class _Phases:
    started: float  # the fast phase's first publish
    fast_done: float  # all of the fast phase handled
    paced_started: float
    #: at the start and at the end of the fast phase
    before: _Snapshot
    after: _Snapshot


async def _measure(
    publish: Any,
    workload: Workload,
    directory: Path,
    rate: float,
    timeout: float,
    broker: list[int],
    pids: list[int],
    metrics: CollectorRegistry | None = None,
) -> _Phases:
    """Warm up; publish the workload as fast as it is confirmed (throughput); then publish
    its paced part at ``rate`` per second (latency without the queueing of the first).

    The warm-up is one message per key, so that keyed workloads are measured in steady
    state (keys known); key churn and new-key bursts are measured cold, that being their
    point. CPU and batch
    sizes are taken over the fast phase; ``broker`` are the broker nodes' pids (summed: a
    cluster's nodes on this host), ``pids`` the run's processes besides this one (workers,
    registry).
    """
    warmup = [] if workload.name in COLD_WORKLOADS else list(dict.fromkeys(workload.keys))
    await _publish_all(publish, warmup)
    await _wait_handled(directory, len(warmup), timeout)
    before = _Snapshot.take(broker, pids, metrics)
    started = time.time()
    await _publish_all(publish, workload.keys)
    handled = len(warmup) + len(workload.keys)
    fast_done = await _wait_handled(directory, handled, timeout)
    after = _Snapshot.take(broker, pids, metrics)
    paced_started = time.time()
    if workload.paced_keys:
        await _publish_all(publish, workload.paced_keys, rate=rate)
        await _wait_handled(directory, handled + len(workload.paced_keys), timeout)
    return _Phases(started, fast_done, paced_started, before, after)


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
    jobs = len(fast_phase)
    before, after = phases.before, phases.after
    batches = after.batches.since(before.batches)
    # a publisher that records no batch sizes (the baselines) sends one message per job
    amqp_messages = batches.count if batches.count else jobs
    broker_cpu = (
        after.broker_cpu - before.broker_cpu
        if after.broker_cpu is not None and before.broker_cpu is not None
        else None
    )
    clients_cpu = after.clients_cpu - before.clients_cpu
    if broker_cpu is not None:
        extra["broker_cpu_ms_per_message"] = broker_cpu * 1000 / jobs
    return Result(
        strategy=strategy,
        workload=workload.name,
        messages=len(records),
        seconds=seconds,
        throughput=jobs / seconds,
        p50_ms=statistics.median(latencies),
        p99_ms=_percentile(latencies, 0.99),
        fast_p99_ms=_percentile(fast, 0.99) if workload.slow_keys else None,
        paced_rate=rate if paced else 0.0,
        order_violations=count_order_violations(records),
        lost=expected - len({(r.key, r.seq) for r in records}),
        extra=extra,
        amqp_rate=amqp_messages / seconds,
        batch_mean=batches.total / batches.count if batches.count else 1.0,
        batch_p50=batches.quantile(0.5),
        batch_p99=batches.quantile(0.99),
        broker_cpu_ms=None if broker_cpu is None else broker_cpu * 1000 / jobs,
        total_cpu_ms=None if broker_cpu is None else (broker_cpu + clients_cpu) * 1000 / jobs,
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
    connection = await aio_pika.connect(settings.amqp_urls[0])
    try:
        await _delete_queues(connection, [queue.name for queue in queues])
        channel = await connection.channel()
        for job_type in {"default"}:
            await channel.exchange_delete(names.jobs_exchange(job_type))
    finally:
        await connection.close()


def _now_us() -> int:
    # integer microseconds: a float header travels as a 32-bit float (pamqp)
    return time.time_ns() // 1000


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


#: kept under its old name for the scale run
_broker_memory = broker_memory


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


async def measure_declare_rate(
    settings: Settings, queues: int = 2000, channels: int = DECLARE_CHANNELS
) -> float:
    """The broker's raw rate of declaring a new durable single-active-consumer queue and
    binding it, over 16 channels (then deleted): what new keys are compared with."""
    async with run_vhost(settings, "declare") as settings:
        connection = await aio_pika.connect(settings.amqp_urls[0])
        prefix = f"bench-raw-{uuid.uuid4().hex[:6]}"
        names = [f"{prefix}.q{i}" for i in range(queues)]
        declared: list[str] = []
        queue_durable = key_queue_durable(settings.durable, broker_version(connection))
        try:
            opened = [await connection.channel() for _ in range(channels)]
            exchange = await opened[0].declare_exchange(f"{prefix}.x", "direct", auto_delete=True)

            async def declare_some(channel: aio_pika.abc.AbstractChannel, part: list[str]) -> None:
                for name in part:
                    queue = await channel.declare_queue(
                        name,
                        durable=queue_durable,
                        arguments={"x-expires": 60_000, "x-single-active-consumer": True},
                    )
                    declared.append(name)
                    await queue.bind(exchange, routing_key=name)

            started = time.perf_counter()
            await asyncio.gather(
                *(declare_some(ch, names[i::channels]) for i, ch in enumerate(opened))
            )
            return queues / (time.perf_counter() - started)
        finally:
            try:
                await _delete_queues(connection, declared)
            finally:
                await connection.close()

"""``rabbitkeys bench --celery``: the same Celery task, keys and handler time on plain Celery
and on the Celery bridge, with as many worker processes on the same broker, measured in one
run.

Both sides run the task of ``celery_app`` (sleep the handler time, append ``key seq pid
started finished`` to a Redis list), publish ``keys`` x ``jobs_per_key`` calls interleaved
(job 0 of every key, then job 1 of every key...), as fast as they go, and read the list
back:

* plain Celery: ``workers`` processes of ``celery worker`` on a queue of their own, pool
  ``threads`` with ``threads`` threads each (or ``solo``: one task at a time each), acks
  late (or early: Celery's default), Celery's default prefetch (4 per thread);
  ``task.apply_async()`` from one thread, no publisher confirms (Celery's default);
* the bridge: a ``rabbitkeys registry`` and ``workers`` processes of ``rabbitkeys worker
  --celery``, each running at most ``threads`` tasks at once (``sync_handler_threads``);
  ``ordered(task, key, publisher=...).aapply_async()`` on an async Publisher, up to 1,000
  confirms awaited at once.

Each side first runs one job per key (not counted: the keys known, the processes warm),
then the measured jobs. Figures: order violations (a job that started before every job
published before it for its key had finished: it overtook one, or ran beside it) per
10,000 jobs; jobs/s from the first publish to the last job's end; CPU (user + system, from
``/proc``) of the worker processes and their children, and for the bridge of its registry,
per job; the broker's (``beam.smp``) per job.

Each side runs in a vhost of its own (deleted at the end; the bridge's namespace and the
Celery queue are deleted by name before that), its Redis list is deleted, and every process
it started is stopped, killed on Ctrl-C or a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._broker.management import _get
from ..._errors import BrokerUnavailableError, RabbitkeysError
from ..._settings import Settings
from ..cluster import LocalCluster
from ..namespace import remove_namespace
from .broker import broker_cpu_seconds, broker_pids, cpu_seconds, processes_cpu, run_vhost

__all__ = ["CeleryComparison", "CeleryPlan", "Side", "run_celery_side_by_side"]

CELERY_APP = "rabbitkeys.tools.bench.celery_app"
#: bridge publishes awaiting their confirm at once (as ``runner.IN_FLIGHT``)
IN_FLIGHT = 1000
POOLS = ("threads", "solo")


@dataclass(frozen=True)
class CeleryPlan:
    keys: int = 100
    jobs_per_key: int = 100
    workers: int = 2
    work_ms: float = 1.0
    #: tasks each worker process runs at once, on both sides (``solo``: 1)
    threads: int = 8
    #: plain Celery's pool
    pool: str = "threads"
    #: plain Celery acks after the task (as the bridge does), else on receipt
    acks_late: bool = True
    redis_url: str = "redis://127.0.0.1:6379/7"
    timeout: float = 600.0
    #: jobs of a key published one after the other before the next key's (1: job 0 of every
    #: key, then job 1 of every key...)
    burst: int = 1

    @property
    def jobs(self) -> int:
        return self.keys * self.jobs_per_key

    @property
    def concurrency(self) -> int:
        return 1 if self.pool == "solo" else self.threads


@dataclass(frozen=True)
class Run:
    """One run of a job, as the task recorded it."""

    key: str
    seq: int
    pid: int
    started: float
    finished: float


@dataclass
class Side:
    name: str
    expected: int
    #: the measured jobs' runs (the warm-up's left out)
    runs: list[Run]
    #: first publish, wall clock
    started: float
    worker_cpu: float
    #: of ``worker_cpu``: the registry's (the bridge)
    registry_cpu: float | None
    broker_cpu: float | None
    #: this process's, publishing (and polling Redis every 50 ms)
    publisher_cpu: float
    #: AMQP messages the jobs were published in
    amqp_messages: float
    pids: set[int] = field(default_factory=set)

    @property
    def seconds(self) -> float:
        return max((r.finished for r in self.runs), default=self.started) - self.started

    @property
    def jobs_per_second(self) -> float:
        return len(self.distinct) / self.seconds if self.seconds > 0 else 0.0

    @property
    def distinct(self) -> dict[tuple[str, int], Run]:
        """Each job's first run."""
        first: dict[tuple[str, int], Run] = {}
        for run in sorted(self.runs, key=lambda r: r.started):
            first.setdefault((run.key, run.seq), run)
        return first

    @property
    def missing(self) -> int:
        return self.expected - len(self.distinct)

    @property
    def run_twice(self) -> int:
        return len(self.runs) - len(self.distinct)

    @property
    def violations(self) -> int:
        return count_violations(list(self.distinct.values()))

    @property
    def violations_per_10k(self) -> float:
        jobs = len(self.distinct)
        return self.violations * 10_000 / jobs if jobs else 0.0

    @property
    def jobs_per_message(self) -> float:
        return len(self.distinct) / self.amqp_messages if self.amqp_messages else 0.0

    def per_job_ms(self, seconds: float | None) -> float | None:
        jobs = len(self.distinct)
        return None if seconds is None or not jobs else seconds * 1000 / jobs


def count_violations(runs: list[Run]) -> int:
    """Jobs that started before every job published before them for their key had
    finished: they overtook one, or ran beside it."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    violations = 0
    for key_runs in by_key.values():
        key_runs.sort(key=lambda r: r.seq)
        latest = float("-inf")  # the latest end of the key's earlier jobs
        for run in key_runs:
            if run.started < latest:
                violations += 1
            latest = max(latest, run.finished)
    return violations


@dataclass
class CeleryComparison:
    plan: CeleryPlan
    celery: Side
    bridge: Side

    def rows(self) -> list[tuple[str, str, str, str]]:
        celery, bridge = self.celery, self.bridge

        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        def ratio(b: float | None, c: float | None) -> str:
            return "—" if b is None or not c else f"{b / c:.2f}"

        registry = bridge.per_job_ms(bridge.registry_cpu)
        return [
            (
                "order violations per 10,000 jobs",
                f"{celery.violations_per_10k:,.1f}",
                f"{bridge.violations_per_10k:,.1f}",
                ratio(bridge.violations_per_10k, celery.violations_per_10k),
            ),
            (
                "jobs/s",
                f"{celery.jobs_per_second:,.0f}",
                f"{bridge.jobs_per_second:,.0f}",
                ratio(bridge.jobs_per_second, celery.jobs_per_second),
            ),
            (
                "worker CPU ms per job (bridge: with its registry)",
                ms(celery.per_job_ms(celery.worker_cpu)),
                ms(bridge.per_job_ms(bridge.worker_cpu))
                + ("" if registry is None else f" (registry {registry:.3f})"),
                ratio(bridge.per_job_ms(bridge.worker_cpu), celery.per_job_ms(celery.worker_cpu)),
            ),
            (
                "broker CPU ms per job",
                ms(celery.per_job_ms(celery.broker_cpu)),
                ms(bridge.per_job_ms(bridge.broker_cpu)),
                ratio(bridge.per_job_ms(bridge.broker_cpu), celery.per_job_ms(celery.broker_cpu)),
            ),
            (
                "publisher CPU ms per job",
                ms(celery.per_job_ms(celery.publisher_cpu)),
                ms(bridge.per_job_ms(bridge.publisher_cpu)),
                ratio(
                    bridge.per_job_ms(bridge.publisher_cpu),
                    celery.per_job_ms(celery.publisher_cpu),
                ),
            ),
            (
                "jobs per AMQP message",
                f"{celery.jobs_per_message:.2f}",
                f"{bridge.jobs_per_message:.2f}",
                ratio(bridge.jobs_per_message, celery.jobs_per_message),
            ),
            (
                f"jobs not run / run twice (of {self.plan.jobs:,})",
                f"{celery.missing} / {celery.run_twice}",
                f"{bridge.missing} / {bridge.run_twice}",
                "—",
            ),
        ]

    def conditions(self) -> str:
        plan = self.plan
        pool = (
            f"pool threads, {plan.threads} threads each"
            if plan.pool == "threads"
            else "pool solo (one task at a time each)"
        )
        return (
            f"{plan.keys:,} keys x {plan.jobs_per_key:,} jobs ({plan.jobs:,}, published "
            f"as fast as they go, keys interleaved "
            + ("one job at a time" if plan.burst == 1 else f"in bursts of {plan.burst}")
            + f"), handler {plan.work_ms:g} ms (time.sleep), "
            f"{plan.workers} worker processes a side. Plain Celery: `celery worker`, {pool}, "
            f"acks {'late' if plan.acks_late else 'early (on receipt)'}, prefetch multiplier 4, "
            "apply_async without confirms. Bridge: `rabbitkeys worker --celery` (at most "
            f"{plan.concurrency} tasks at once each) and a registry, ordered(...).aapply_async "
            f"on an async Publisher, up to {IN_FLIGHT:,} confirms in flight. Durable queues, "
            "persistent messages on both sides."
        )

    def markdown(self) -> str:
        lines = [
            "| | plain Celery | bridge | bridge / Celery |",
            "|---|---:|---:|---:|",
            *(f"| {name} | {c} | {b} | {r} |" for name, c, b, r in self.rows()),
        ]
        return "\n".join(lines)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_celery_side_by_side(
    settings: Settings, plan: CeleryPlan, progress: Callable[[str], None] = _progress
) -> CeleryComparison:
    """Plain Celery, then the bridge, on the broker of ``settings``."""
    if plan.pool not in POOLS:
        raise ValueError(f"pool {plan.pool!r}: one of {', '.join(POOLS)}")
    redis = _connect_redis(plan.redis_url)
    run_id = uuid.uuid4().hex[:6]
    lists = {side: f"rabbitkeys-bench-celery:{run_id}:{side}" for side in ("celery", "bridge")}
    try:
        async with run_vhost(settings, "celery-plain") as run_settings:
            celery = await _run_celery(run_settings, plan, redis, lists["celery"], run_id)
        progress(_side_line(celery))
        async with run_vhost(settings, "celery-bridge") as run_settings:
            bridge = await _run_bridge(run_settings, plan, redis, lists["bridge"], run_id)
        progress(_side_line(bridge))
    finally:
        redis.delete(*lists.values())
        redis.close()
    return CeleryComparison(plan, celery, bridge)


def _side_line(side: Side) -> str:
    return (
        f"{side.name:>12}: {side.jobs_per_second:8,.0f} jobs/s  violations "
        f"{side.violations} of {len(side.distinct):,}  not run {side.missing}  "
        f"twice {side.run_twice}"
    )


def _connect_redis(url: str) -> Any:
    try:
        import redis
    except ImportError as exc:
        raise RuntimeError("bench --celery needs redis-py: pip install redis") from exc
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"bench --celery needs Redis at {url}: {exc}") from exc
    return client


def _env(plan: CeleryPlan, redis_list: str) -> dict[str, str]:
    return {"RK_CELERY_BENCH_REDIS": plan.redis_url, "RK_CELERY_BENCH_LIST": redis_list}


def _interleaved(plan: CeleryPlan) -> Iterator[tuple[str, int]]:
    """Every key's jobs in order, keys interleaved: ``burst`` jobs of key 0, then of key 1...,
    then the next ``burst`` of key 0."""
    for start in range(0, plan.jobs_per_key, plan.burst):
        for k in range(plan.keys):
            for seq in range(start, min(start + plan.burst, plan.jobs_per_key)):
                yield f"key-{k}", seq


def _warmup(plan: CeleryPlan) -> list[tuple[str, int]]:
    return [(f"key-{k}", -1) for k in range(plan.keys)]


async def _wait_recorded(redis: Any, redis_list: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(redis.llen, redis_list) < count:
        if time.monotonic() > deadline:
            return  # what did not run shows as "not run"
        await asyncio.sleep(0.05)


def _read_runs(redis: Any, redis_list: str) -> list[Run]:
    runs = []
    for item in redis.lrange(redis_list, 0, -1):
        key, seq, pid, started, finished = item.decode().split()
        if int(seq) >= 0:
            runs.append(Run(key, int(seq), int(pid), float(started), float(finished)))
    return runs


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and their live descendants."""
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return processes_cpu(sorted(seen))


@dataclass
class _Snapshot:
    workers: float
    registry: float
    broker: float | None
    publisher: float
    #: AMQP messages published so far (None: one per job)
    messages: float | None


def _snapshot(
    workers: list[int],
    registries: list[int],
    broker: list[int],
    messages: Callable[[], float | None],
) -> _Snapshot:
    return _Snapshot(
        _tree_cpu(workers),
        _tree_cpu(registries),
        broker_cpu_seconds(broker) if broker else None,
        cpu_seconds(os.getpid()),
        messages(),
    )


async def _measure(
    name: str,
    plan: CeleryPlan,
    redis: Any,
    redis_list: str,
    publish_all: Callable[[list[tuple[str, int]]], Any],
    workers: list[int],
    registries: list[int],
    broker: list[int],
    messages: Callable[[], float | None] = lambda: None,
) -> Side:
    """Warm up (one job per key), then publish and time the measured jobs. ``messages``:
    AMQP messages published so far (None: one per job)."""
    warmup = _warmup(plan)
    await publish_all(warmup)
    await _wait_recorded(redis, redis_list, len(warmup), plan.timeout)
    jobs = list(_interleaved(plan))
    before = _snapshot(workers, registries, broker, messages)
    started = time.time()
    await publish_all(jobs)
    await _wait_recorded(redis, redis_list, len(warmup) + plan.jobs, plan.timeout)
    after = _snapshot(workers, registries, broker, messages)
    broker_cpu = (
        after.broker - before.broker
        if after.broker is not None and before.broker is not None
        else None
    )
    registry = after.registry - before.registry
    return Side(
        name=name,
        expected=plan.jobs,
        runs=await asyncio.to_thread(_read_runs, redis, redis_list),
        started=started,
        worker_cpu=after.workers - before.workers + registry,
        registry_cpu=registry if registries else None,
        broker_cpu=broker_cpu,
        publisher_cpu=after.publisher - before.publisher,
        amqp_messages=(
            after.messages - before.messages
            if after.messages is not None and before.messages is not None
            else len(jobs)
        ),
        pids=set(workers),
    )


# --- plain Celery -------------------------------------------------------------------------


async def _run_celery(
    settings: Settings, plan: CeleryPlan, redis: Any, redis_list: str, run_id: str
) -> Side:
    from .celery_app import app, record

    queue = f"rabbitkeys-bench-celery-{run_id}"
    url = settings.amqp_urls[0]
    env = {
        **os.environ,
        **_env(plan, redis_list),
        "RK_CELERY_BENCH_BROKER": url,
        "RK_CELERY_BENCH_QUEUE": queue,
        "RK_CELERY_BENCH_ACKS_LATE": "1" if plan.acks_late else "0",
    }
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="rabbitkeys-bench-celery-") as scratch:
        logs = [Path(scratch, f"worker-{n}.log") for n in range(plan.workers)]
        try:
            for n, log in enumerate(logs):
                with log.open("wb") as output:
                    processes.append(
                        await asyncio.create_subprocess_exec(
                            *_celery_command(plan, queue, f"bench{n}-{run_id}@%h"),
                            env=env,
                            stdout=output,
                            stderr=output,
                            # its own process group: a prefork pool's children go with it
                            start_new_session=True,
                        )
                    )
            await _wait_consumers(settings, queue, processes, logs, plan.workers)

            def publish_sync(jobs: list[tuple[str, int]]) -> None:
                with app.connection_for_write(url) as connection, connection.Producer() as producer:
                    for key, seq in jobs:
                        record.apply_async((key, seq, plan.work_ms), queue=queue, producer=producer)

            async def publish_all(jobs: list[tuple[str, int]]) -> None:
                await asyncio.to_thread(publish_sync, jobs)

            assert app.conf.task_ignore_result
            return await _measure(
                "plain Celery",
                plan,
                redis,
                redis_list,
                publish_all,
                [p.pid for p in processes],
                [],
                broker_pids(settings),
            )
        finally:
            await _stop_celery(processes)
            await _delete_queue(settings, queue)


def _celery_command(plan: CeleryPlan, queue: str, node: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        CELERY_APP,
        "worker",
        "--hostname",
        node,
        "--queues",
        queue,
        "--pool",
        plan.pool,
        "--concurrency",
        str(plan.concurrency),
        "--loglevel",
        "WARNING",
        # cluster chatter between the workers, of no use here (mingle also waits at start)
        "--without-gossip",
        "--without-mingle",
    ]


async def _wait_consumers(
    settings: Settings,
    queue: str,
    processes: list[asyncio.subprocess.Process],
    logs: list[Path],
    count: int,
    timeout: float = 60.0,
) -> None:
    vhost = urllib.parse.quote(settings.vhost, safe="")
    path = f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
    deadline = time.monotonic() + timeout
    consumers = 0
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs, strict=True):
            if process.returncode is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"a celery worker exited ({process.returncode}):\n{tail}")
        try:
            consumers = int((await asyncio.to_thread(_get, settings, path)).get("consumers", 0))
        except (BrokerUnavailableError, OSError, ValueError):
            consumers = 0  # not declared yet
        if consumers >= count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{count} celery workers did not consume {queue} in {timeout:g}s")


async def _stop_celery(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL after 10 s, each whole group; at
    once on Ctrl-C or a failure is not needed: a warm shutdown of idle workers is quick."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), 10)
        except (TimeoutError, asyncio.CancelledError):
            _signal_group(process, signal.SIGKILL)
            await process.wait()
        _signal_group(process, signal.SIGKILL)  # what is left of its group


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)  # the group this run started it in


async def _delete_queue(settings: Settings, queue: str) -> None:
    import aio_pika

    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(settings.amqp_urls[0])
        try:
            channel = await connection.channel()
            await channel.queue_delete(queue)
        finally:
            await connection.close()


# --- the bridge ---------------------------------------------------------------------------


async def _run_bridge(
    settings: Settings, plan: CeleryPlan, redis: Any, redis_list: str, run_id: str
) -> Side:
    from prometheus_client import CollectorRegistry

    from ..._publisher.publisher import Publisher
    from ...celery import ordered
    from .celery_app import record
    from .runner import _Batches

    settings = settings.model_copy(
        update={
            "namespace": f"bench-celery-{run_id}",
            "log_level": "WARNING",
            "sync_handler_threads": plan.concurrency,
            "ensure_timeout": plan.timeout,
            "publish_timeout": plan.timeout,
        }
    )
    try:
        async with LocalCluster(settings, extra_env=_env(plan, redis_list)) as cluster:
            try:
                await cluster.start_registry()
                for _ in range(plan.workers):
                    await cluster.start_worker(f"{CELERY_APP}:app", options=("--celery",))
                await cluster.wait_for_workers(plan.workers, timeout=60)
                metrics = CollectorRegistry()  # of its own: this run's batches only
                publisher = Publisher(settings, metrics_registry=metrics)
                await publisher.start()
                limit = asyncio.Semaphore(IN_FLIGHT)

                async def publish(key: str, seq: int) -> None:
                    async with limit:
                        await ordered(record, key, publisher=publisher).aapply_async(
                            (key, seq, plan.work_ms)
                        )

                async def publish_all(jobs: list[tuple[str, int]]) -> None:
                    # tasks made in publish order: per key, the Publisher keeps it
                    await asyncio.gather(*(publish(key, seq) for key, seq in jobs))

                measured = False
                try:
                    side = await _measure(
                        "bridge",
                        plan,
                        redis,
                        redis_list,
                        publish_all,
                        [p.pid for p in cluster.workers],
                        [p.pid for p in cluster.registries],
                        broker_pids(settings),
                        lambda: _Batches.read(metrics).count,
                    )
                    measured = True
                finally:
                    try:
                        await asyncio.wait_for(publisher.close(), None if measured else 5.0)
                    except TimeoutError:
                        await publisher._stop_connection()
                return side
            except BaseException:
                # interrupted or failed: no graceful stop, the vhost goes anyway
                for process in cluster.workers + cluster.registries:
                    if process.returncode is None:
                        process.kill()
                raise
    finally:
        with contextlib.suppress(RabbitkeysError, OSError):
            await remove_namespace(settings)

"""``rabbitkeys bench --scale KEYS``: many live keys on a few workers.

A registry and ``workers`` workers run as processes; one message per key creates ``keys``
live keys, ``_NEW_KEYS_IN_FLIGHT`` at a time, each publish waiting at most the default
``ensure_timeout``; then one more worker joins. Measured: the time and registry CPU to
create and assign the keys, and the rate over each tenth of them (steady, or falling as the
broker holds more queues?); each new key's answer (publish call to confirm: ensure, declare,
bind, reply, publish) p50 and p99; broker, registry and worker memory per key; the time
until the join has settled (every moving key released by its old owner and consumed by the
new one), and the keys that moved against the ideal ``keys / (workers + 1)``.

Key queues are transient here (``durable=False``) whatever the settings say: tens of
thousands of durable queues make the broker's next boot slow if a run is interrupted. On
RabbitMQ 4 they are durable all the same (``key_queue_durable``: transient non-exclusive
queues are refused there), and only their messages are transient.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from ..._admin.status import fetch_status
from ..._broker.management import list_queues
from ..._errors import BrokerUnavailableError
from ..._publisher.publisher import Publisher
from ..._settings import Settings
from ..._wire.topology import Names
from ..cluster import LocalCluster
from .recording import count_all
from .runner import _broker_memory, _rss, cpu_seconds

__all__ = ["ScaleResult", "run_scale"]

# New keys asked for at once: enough to keep the registry's channels busy, few enough that
# workers' heartbeats do not wait behind thousands of requests in its queue.
_NEW_KEYS_IN_FLIGHT = 200
# How often the join's settling is looked at: a status of 100,000 keys costs the registry
# milliseconds, and looking every 50 ms would slow what is measured.
_SETTLE_POLL = 0.25


@dataclass
class ScaleResult:
    keys: int
    workers: int
    create_seconds: float
    #: keys per second over each tenth of the keys, in creation order
    tenth_rates: list[float]
    answer_p50_seconds: float
    answer_p99_seconds: float
    registry_cpu_seconds: float
    broker_bytes_per_key: float | None
    registry_bytes_per_key: float
    worker_bytes_per_key: float
    settle_seconds: float
    rebalance_cpu_seconds: float
    keys_moved: int
    ideal_moves: float

    def markdown(self) -> str:
        broker = (
            "-"
            if self.broker_bytes_per_key is None
            else f"{self.broker_bytes_per_key / 1024:,.1f} KiB"
        )
        tenths = self.tenth_rates
        return (
            f"| {self.keys:,} | {self.workers} | {self.create_seconds:,.1f} s "
            f"({self.keys / self.create_seconds:,.0f} keys/s) | "
            f"{tenths[0]:,.0f} → {tenths[-1]:,.0f} (min {min(tenths):,.0f}) | "
            f"{self.answer_p50_seconds * 1000:,.0f} / {self.answer_p99_seconds * 1000:,.0f} ms | "
            f"{self.registry_cpu_seconds:,.2f} s | {broker} | "
            f"{self.registry_bytes_per_key / 1024:,.1f} KiB | "
            f"{self.worker_bytes_per_key / 1024:,.1f} KiB | {self.settle_seconds:,.2f} s "
            f"({self.rebalance_cpu_seconds:,.2f} s CPU) | "
            f"{self.keys_moved:,} = {self.keys_moved / self.ideal_moves:.2f} x ideal |"
        )


HEADER = (
    "| live keys | workers | create + assign | keys/s, first → last tenth | new-key answer "
    "p50 / p99 | registry CPU | broker memory / key | registry memory / key "
    "| worker memory / key | settle after a join (registry CPU) | keys moved by the join |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


async def run_scale(settings: Settings, *, keys: int, workers: int = 4) -> ScaleResult:
    namespace = f"bench-scale-{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(
        update={
            "namespace": namespace,
            "log_level": "WARNING",
            "durable": False,
            "key_queue_expires": 600.0,
            "idle_period": 3600.0,  # no retirement during the run
            # each new key is answered within the default ensure_timeout, or the run fails
            "max_keys": max(settings.max_keys, keys),  # the run sets its own scale
        }
    )
    registry_port = free_port()
    with tempfile.TemporaryDirectory(prefix="rabbitkeys-scale-") as scratch:
        env = {"RK_BENCH_DIR": scratch, "RK_BENCH_WORK_MS": "0"}
        try:
            async with LocalCluster(settings, extra_env=env) as cluster:
                registry = await cluster.start_registry(metrics_port=registry_port)
                for _ in range(workers):
                    await cluster.start_worker("rabbitkeys.tools.bench.app:app")
                await cluster.wait_for_workers(workers)
                broker_before = _broker_memory(settings)
                rss_before = _rss([p.pid for p in cluster.workers])
                registry_rss_before = _rss([registry.pid])
                cpu_before = cpu_seconds(registry.pid)
                answers: list[float] = []
                done: list[float] = []
                started = time.monotonic()
                async with Publisher(settings) as publisher:
                    limit = asyncio.Semaphore(_NEW_KEYS_IN_FLIGHT)

                    async def one(n: int) -> None:
                        async with limit:
                            asked = time.monotonic()
                            await publisher.publish(f"scale-{n}", b"x")
                            done.append(time.monotonic())
                            answers.append(done[-1] - asked)

                    await asyncio.gather(*(one(n) for n in range(keys)))
                await _wait_until(lambda: count_all(Path(scratch)) >= keys, 600)
                create_seconds = time.monotonic() - started
                cpu = cpu_seconds(registry.pid) - cpu_before
                broker_after = _broker_memory(settings)
                rss_after = _rss([p.pid for p in cluster.workers])
                registry_rss_after = _rss([registry.pid])

                moved_before = _metrics(registry_port)["rabbitkeys_keys_moved_total"]
                joined = time.monotonic()
                cpu_before_join = cpu_seconds(registry.pid)
                await cluster.start_worker("rabbitkeys.tools.bench.app:app")
                settle = await _settled(settings, registry_port, workers + 1, moved_before)
                settle_seconds = settle - joined
                rebalance_cpu = cpu_seconds(registry.pid) - cpu_before_join
                moved_total = _metrics(registry_port)["rabbitkeys_keys_moved_total"]
                moved = int(moved_total - moved_before)
        finally:
            await _delete_namespace(settings)
    answers.sort()
    return ScaleResult(
        keys=keys,
        workers=workers,
        create_seconds=create_seconds,
        tenth_rates=_tenth_rates(started, done),
        answer_p50_seconds=answers[len(answers) // 2],
        answer_p99_seconds=answers[min(len(answers) - 1, int(len(answers) * 0.99))],
        registry_cpu_seconds=cpu,
        broker_bytes_per_key=(
            None
            if broker_before is None or broker_after is None
            else (broker_after - broker_before) / keys
        ),
        registry_bytes_per_key=(registry_rss_after - registry_rss_before) / keys,
        worker_bytes_per_key=(rss_after - rss_before) / keys,
        settle_seconds=settle_seconds,
        rebalance_cpu_seconds=rebalance_cpu,
        keys_moved=moved,
        ideal_moves=keys / (workers + 1),
    )


async def _settled(settings: Settings, port: int, workers: int, moved_before: float) -> float:
    """When the new worker is known, some keys moved, every move's handoff completed and
    no key is without a worker."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = await fetch_status(settings, backlog=False, timeout=30)
        metrics = _metrics(port)  # one scrape per look
        moved_total = metrics["rabbitkeys_keys_moved_total"]
        if (
            len(status.workers) == workers
            and moved_total > moved_before
            and metrics["rabbitkeys_handoff_duration_seconds_count"] >= moved_total
            and status.unassigned_keys == 0
        ):
            return time.monotonic()
        await asyncio.sleep(_SETTLE_POLL)
    raise TimeoutError("the join did not settle within 600 s")


async def _delete_namespace(settings: Settings) -> None:
    """Every queue and exchange of the run's namespace, 16 deletes at a time (100,000 key
    queues one by one take minutes)."""
    prefix = f"{settings.namespace}."
    try:
        queues = [q.name for q in await list_queues(settings, prefix, statistics=False)]
    except BrokerUnavailableError:
        return  # no management API: x-expires removes the key queues
    connection = await aio_pika.connect(settings.amqp_urls[0])
    try:
        channels = [await connection.channel() for _ in range(16)]

        async def delete_some(channel: aio_pika.abc.AbstractChannel, names: list[str]) -> None:
            for name in names:
                await channel.queue_delete(name)

        await asyncio.gather(*(delete_some(ch, queues[i::16]) for i, ch in enumerate(channels)))
        names = Names(settings.namespace)
        for exchange in (
            names.jobs_exchange("default"),
            names.requests_exchange,
            names.membership_exchange,
            names.commands_exchange,
            names.replies_exchange,
            names.dead_letter_exchange,
        ):
            await channels[0].exchange_delete(exchange)
    finally:
        await connection.close()


def _tenth_rates(started: float, done: list[float]) -> list[float]:
    """Keys per second over each tenth of the keys, by confirm time."""
    done = sorted(done)
    tenth = max(1, len(done) // 10)
    rates, previous = [], started
    for end in range(tenth, len(done) + 1, tenth):
        rates.append(tenth / max(1e-9, done[end - 1] - previous))
        previous = done[end - 1]
    return rates


def _metrics(port: int) -> dict[str, float]:
    """The registry's unlabelled samples, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        samples = {}
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if value and not line.startswith("#") and "{" not in name:
                samples[name] = float(value)
        return samples


async def _wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the keys were not all handled in time")
        await asyncio.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port

"""Failures while traffic flows: the chaos scenario (processes through the CLI), a broker
restart, and the keeper that stops a key queue from expiring with its messages."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher
from rabbitkeys._broker.management import list_queues
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys.tools.chaos import run_chaos
from rabbitkeys.tools.cluster import LocalCluster
from rabbitkeys.tools.demo import check_order, overlapping_handlings, read_records

from ..support import eventually, make_settings, running_registry, running_worker


@pytest.mark.processes
@pytest.mark.slow
async def test_chaos_worker_kill_scale_and_registry_kill_lose_and_reorder_nothing(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    report = await run_chaos(settings, keys=20, messages=40, workers=3)
    print(report.format())
    assert report.sent == 800
    assert report.lost == 0
    assert report.order_violations == 0
    # Every copy is tied to its cause: a redelivery whose previous handling was by the
    # SIGKILLed worker. The SIGTERM, the new workers and the registry kill add none.
    assert report.unexplained_duplicates == 0
    assert report.overlaps == 0  # one at a time per key, across every move and kill
    assert report.ok
    # the gaps are figures for the report (printed above), not thresholds: the timeline
    # did happen, and the keys of the killed worker were handled again
    assert report.worker_kill_gap is not None
    assert report.registry_failover is not None
    # the run removed its own namespace: nothing of it is left on the broker
    left = await list_queues(settings, f"{namespace}-chaos-")
    assert left == []


@pytest.mark.disruptive
@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None and os.environ.get("CI") != "true",
    reason="restarting the broker needs rabbitmqctl on this machine",
)
async def test_a_broker_restart_loses_and_reorders_nothing(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace)
    report = await run_chaos(settings, keys=20, messages=60, workers=3, broker_restart=True)
    print(report.format())
    assert report.lost == 0
    assert report.order_violations == 0
    # copies only from the SIGKILLed worker's redeliveries and across the restart
    assert report.unexplained_duplicates == 0
    assert report.broker_restart_gap is not None


async def test_the_keeper_stops_an_unconsumed_key_queue_from_expiring(
    amqp_url: str, namespace: str
) -> None:
    # x-expires of 2 s, and no worker for 6 s: without the keeper the queue and its
    # messages would be gone.
    settings = make_settings(amqp_url, namespace, key_queue_expires=2.0)
    handled: list[int] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(int(message.body))

    queue = Names(namespace).key_queue(KeyRef.of("orphan"))
    async with running_registry(settings):
        async with Publisher(settings) as publisher:
            for n in range(5):
                await publisher.publish("orphan", str(n).encode())
        await asyncio.sleep(6)  # three x-expires periods with no consumer: a lower bound
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 5
        await connection.close()
        async with running_worker(settings, app):
            await eventually(lambda: len(handled) == 5)
    assert handled == [0, 1, 2, 3, 4]


@pytest.mark.processes
@pytest.mark.slow
async def test_scaling_out_and_in_moves_keys_with_no_duplicate_and_no_reordering(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """As ``kubectl scale`` does: start workers while traffic flows, then SIGTERM some.
    Graceful moves: exactly zero duplicates."""
    settings = make_settings(amqp_url, namespace)
    names = [f"k{i}" for i in range(30)]
    sent = 0
    env = {"RK_DEMO_DIR": str(tmp_path), "RABBITKEYS_LOG_LEVEL": "WARNING"}

    def pids() -> set[int]:
        return {r["pid"] for r in read_records(tmp_path)}

    async with LocalCluster(settings, extra_env=env) as cluster:
        await cluster.start_registry()
        for _ in range(2):
            await cluster.start_worker("rabbitkeys.tools.demo:app")
        await cluster.wait_for_workers(2)
        stop = asyncio.Event()
        async with Publisher(settings) as publisher:

            async def traffic() -> None:
                nonlocal sent
                n = 0
                while not stop.is_set():
                    await asyncio.gather(*(publisher.publish(k, str(n).encode()) for k in names))
                    sent, n = sent + len(names), n + 1
                    await asyncio.sleep(0.05)

            publishing = asyncio.create_task(traffic())
            await eventually(lambda: len(pids()) == 2, timeout=30)  # both handle
            for _ in range(2):
                await cluster.start_worker("rabbitkeys.tools.demo:app")
            await cluster.wait_for_workers(4)
            await eventually(lambda: len(pids()) == 4, timeout=30)  # keys moved to them
            codes = [await cluster.terminate(p) for p in cluster.workers[:2]]
            await cluster.wait_for_workers(2)
            stop.set()  # the moves away from the stopped workers happened under traffic
            await publishing
        await eventually(lambda: len(read_records(tmp_path)) >= sent, timeout=60)
        # the other workers exit too: after that no handling (no duplicate) can come
        codes += await cluster.stop_all()
    records = read_records(tmp_path)
    assert codes and all(code == 0 for code in codes), codes  # every exit was clean
    rounds = sent // len(names)
    assert len(records) == sent  # every message once: no loss, no duplicate
    assert {(r["key"], int(r["body"])) for r in records} == {
        (k, n) for k in names for n in range(rounds)
    }
    order = check_order(records)
    assert all(order[k] == sorted(order[k]) for k in names)
    assert overlapping_handlings(records) == []  # one at a time per key, across the moves
    assert len({r["pid"] for r in records}) == 4

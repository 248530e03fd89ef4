"""A worker's hold on a key, driven directly against the real broker: the states it goes
through as it is taken, runs deliveries and is let go (by a Release, or by the broker
cancelling its consumer), and the handoff's order guarantee: what no handler started goes
back to the queue in its place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import cast

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Settings
from rabbitkeys._amqp import ChannelPool, TaskSet
from rabbitkeys._execution import Executor
from rabbitkeys._handoff import Handoff, KeyState
from rabbitkeys._metrics import WorkerMetrics
from rabbitkeys._protocol import KeyAssignment
from rabbitkeys._topology import KeyRef, Names, key_queue_arguments

from .support import eventually


class _NoGauges:
    def gauge_values(self) -> dict[str, float]:
        return {}


class Rig:
    """A Handoff on a real consume channel, its reports collected, its handler gated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[bytes] = []
        self.gate = asyncio.Event()
        self.reported: list[list[KeyAssignment]] = []
        #: a channel of the test's own, to publish, get and delete
        self.side: aio_pika.abc.AbstractChannel
        app = App()

        @app.handler()
        async def held_at_the_gate(message: Message) -> None:
            self.seen.append(message.body)
            await self.gate.wait()

        stopping = asyncio.Event()
        metrics = WorkerMetrics(_NoGauges(), CollectorRegistry())
        self.tasks = TaskSet(logging.getLogger("test"), "test task")
        self.handoff = Handoff(
            settings,
            Executor(app, settings, metrics, stopping),
            metrics,
            self.tasks,
            stopping,
            self.report,
        )
        ref = KeyRef.of("k")
        self.assignment = KeyAssignment(
            key_id=ref.id,
            job_type=ref.job_type,
            key=ref.key,
            queue=Names(settings.namespace).key_queue(ref),
        )

    async def report(self, keys: list[KeyAssignment]) -> None:
        self.reported.append(keys)

    def state(self) -> KeyState:
        [owned] = self.handoff.holds() or [None]
        return KeyState.RELEASED if owned is None else owned.state


@pytest.fixture
async def rig(settings: Settings) -> AsyncIterator[Rig]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=settings.prefetch)
    rig = Rig(settings)
    rig.handoff.begin(
        cast(aiormq.Channel, await consume.get_underlay_channel()),
        ChannelPool(connection, size=1),
        asyncio.Event(),
    )
    rig.side = await connection.channel()
    # the registry's part: a worker only checks that the queue exists
    await rig.side.declare_queue(
        rig.assignment.queue,
        durable=settings.durable,
        arguments=key_queue_arguments(settings.key_queue_expires),
    )
    try:
        yield rig
    finally:
        rig.gate.set()
        await asyncio.gather(*rig.tasks, *rig.handoff.runners(), return_exceptions=True)
        rig.handoff.end()
        await rig.side.queue_delete(rig.assignment.queue)
        await connection.close()


async def test_a_released_key_finishes_its_message_and_requeues_the_rest_in_order(
    rig: Rig,
) -> None:
    side = rig.side
    await rig.handoff.acquire(rig.assignment)
    assert rig.state() is KeyState.CONSUMING
    for body in (b"1", b"2", b"3"):
        await side.default_exchange.publish(
            aio_pika.Message(body), routing_key=rig.assignment.queue
        )
    await eventually(lambda: rig.seen == [b"1"])
    [owned] = rig.handoff.holds()
    await eventually(lambda: len(owned.buffer) == 3)  # 1 in the handler, 2 and 3 behind it

    releasing = asyncio.create_task(rig.handoff.release_and_report([owned.key_id]))
    await eventually(lambda: owned.state is KeyState.RELEASING)
    assert not releasing.done() and rig.reported == []  # the handler still runs
    rig.gate.set()
    await releasing
    assert owned.state is KeyState.RELEASED and rig.handoff.holds() == []
    assert rig.reported == [[rig.assignment]]
    assert rig.seen == [b"1"]  # 2 and 3 never started here
    # they are back in the queue, in their places; 1 was acked
    left = []
    while message := await (await side.get_queue(rig.assignment.queue)).get(fail=False):
        left.append(message.body)
        await message.ack()
    assert left == [b"2", b"3"]


async def test_a_consumer_the_broker_cancels_is_let_go_and_reported(
    rig: Rig,
) -> None:
    """The key's queue is deleted under a running handler: the hold moves to RELEASING at
    once (no new runner, left out of joins), and is released and reported once the handler
    is done."""
    side = rig.side
    await rig.handoff.acquire(rig.assignment)
    await side.default_exchange.publish(aio_pika.Message(b"1"), routing_key=rig.assignment.queue)
    await eventually(lambda: rig.seen == [b"1"])
    [owned] = rig.handoff.holds()
    await side.queue_delete(rig.assignment.queue)
    await eventually(lambda: owned.state is KeyState.RELEASING)
    assert not owned.state.held and rig.reported == []
    rig.gate.set()
    await eventually(lambda: rig.reported == [[rig.assignment]])
    assert owned.state is KeyState.RELEASED and rig.handoff.holds() == []
    await side.declare_queue(rig.assignment.queue)  # for the fixture's cleanup


async def test_taking_a_key_again_while_consuming_only_updates_its_assignment(
    rig: Rig,
) -> None:
    await rig.handoff.acquire(rig.assignment)
    [owned] = rig.handoff.holds()
    tag = owned.consumer_tag
    rebound = rig.assignment.model_copy(update={"routing_key": "rk-2"})
    await rig.handoff.acquire(rebound)
    assert rig.handoff.holds() == [owned] and owned.consumer_tag == tag
    assert owned.assignment.routing_key == "rk-2" and owned.state is KeyState.CONSUMING

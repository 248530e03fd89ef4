"""A worker's hold on a key, driven directly against the real broker: the states it goes
through as it is taken, runs deliveries and is let go (by a Release, or by the broker
cancelling its consumer, or closing a quorum key's channel), and the handoff's order
guarantee: what no handler started goes back to the queue in its place, also when the queue
holds more than the worker took (a classic key's deliveries are rejected in order; a quorum
key's channel is closed). Each on both queue types."""

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
from rabbitkeys._broker.amqp import ChannelPool, TaskSet
from rabbitkeys._observe.metrics import WorkerMetrics
from rabbitkeys._wire.protocol import KeyAssignment
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments
from rabbitkeys._worker.execution import Executor
from rabbitkeys._worker.handoff import Handoff, HoldState

from ..support import eventually, make_settings


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

    def state(self) -> HoldState:
        [owned] = self.handoff.holds() or [None]
        return HoldState.RELEASED if owned is None else owned.state


@pytest.fixture(params=["classic", "quorum"])
async def rig(amqp_url: str, namespace: str, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    settings = make_settings(amqp_url, namespace, queue_type=request.param, durable=True)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=settings.prefetch)
    rig = Rig(settings)
    rig.handoff.begin(
        cast(aiormq.Channel, await consume.get_underlay_channel()),
        ChannelPool(connection, size=1),
        asyncio.Event(),
        global_cap=False,
    )
    rig.side = await connection.channel()
    # the registry's part: a worker only checks that the queue exists
    await rig.side.declare_queue(
        rig.assignment.queue,
        durable=settings.durable,
        arguments=key_queue_arguments(settings.key_queue_expires, settings.queue_type),
    )
    try:
        yield rig
    finally:
        rig.gate.set()
        await asyncio.gather(*rig.tasks, *rig.handoff.runners(), return_exceptions=True)
        rig.handoff.end()
        await rig.side.queue_delete(rig.assignment.queue)
        await connection.close()


async def publish(rig: Rig, *bodies: bytes) -> None:
    for body in bodies:
        await rig.side.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=rig.assignment.queue,
        )


async def left_in_queue(rig: Rig) -> list[bytes]:
    """What the key's queue holds, head first, taken out (with a consumer: a quorum queue
    with single active consumer refuses basic.get)."""
    queue = await rig.side.declare_queue(rig.assignment.queue, passive=True)
    count = queue.declaration_result.message_count or 0
    found: list[bytes] = []

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        found.append(message.body)

    tag = await queue.consume(take, no_ack=True)
    await eventually(lambda: len(found) >= count)
    await queue.cancel(tag)
    return found


async def test_a_released_key_finishes_its_message_and_requeues_the_rest_in_order(
    rig: Rig,
) -> None:
    """The worker holds 4 (its prefetch), the queue 4 more: all 7 not handled are back, in
    order."""
    await rig.handoff.acquire(rig.assignment)
    assert rig.state() is HoldState.CONSUMING
    await publish(rig, *(str(n).encode() for n in range(1, 9)))
    await eventually(lambda: rig.seen == [b"1"])
    [owned] = rig.handoff.holds()
    await eventually(lambda: len(owned.buffer) == 4)  # 1 in the handler, 2 to 4 behind it

    releasing = asyncio.create_task(rig.handoff.release_and_report([owned.key_id]))
    await eventually(lambda: owned.state is HoldState.RELEASING)
    assert not releasing.done() and rig.reported == []  # the handler still runs
    rig.gate.set()
    await releasing
    assert owned.state is HoldState.RELEASED and rig.handoff.holds() == []
    assert rig.reported == [[rig.assignment]]
    assert rig.seen == [b"1"]  # 2 to 4 never started here
    # they are back in the queue, in their places, before 5 to 8; 1 was acked
    assert await left_in_queue(rig) == [str(n).encode() for n in range(2, 9)]


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
    await eventually(lambda: owned.state is HoldState.RELEASING)
    assert not owned.state.held and rig.reported == []
    rig.gate.set()
    await eventually(lambda: rig.reported == [[rig.assignment]])
    assert owned.state is HoldState.RELEASED and rig.handoff.holds() == []
    await side.declare_queue(  # for the fixture's cleanup
        rig.assignment.queue,
        durable=True,
        arguments=key_queue_arguments(rig.settings.key_queue_expires, rig.settings.queue_type),
    )


async def test_taking_a_key_again_while_consuming_only_updates_its_assignment(
    rig: Rig,
) -> None:
    await rig.handoff.acquire(rig.assignment)
    [owned] = rig.handoff.holds()
    tag = owned.consumer_tag
    rebound = rig.assignment.model_copy(update={"routing_key": "rk-2"})
    await rig.handoff.acquire(rebound)
    assert rig.handoff.holds() == [owned] and owned.consumer_tag == tag
    assert owned.assignment.routing_key == "rk-2" and owned.state is HoldState.CONSUMING


# quorum only: classic keys share the session's consume channel
@pytest.mark.parametrize("rig", ["quorum"], indirect=True)
async def test_a_quorum_key_whose_channel_the_broker_closes_is_let_go_and_the_session_goes_on(
    rig: Rig,
) -> None:
    """A channel error on a quorum key's own channel (here: an ack of a delivery tag it
    never had) loses only that key: its hold is let go and reported once its handler is
    done, the session's lost flag stays down, and the broker has the messages back, in
    order."""
    await rig.handoff.acquire(rig.assignment)
    await publish(rig, b"1", b"2", b"3")
    await eventually(lambda: rig.seen == [b"1"])
    [owned] = rig.handoff.holds()
    assert owned.channel is not None and owned.channel is not rig.handoff._consume
    await owned.channel.basic_ack(10_000)  # PRECONDITION_FAILED: the broker closes it
    await eventually(lambda: owned.state is HoldState.RELEASING)
    assert rig.reported == []
    rig.gate.set()
    await eventually(lambda: rig.reported == [[rig.assignment]])
    assert owned.state is HoldState.RELEASED and rig.handoff.holds() == []
    assert not rig.handoff._lost.is_set()
    # 1 was never acked: the broker put it back with the rest, in its place
    assert await left_in_queue(rig) == [b"1", b"2", b"3"]


# quorum only: classic keys share the session's consume channel
@pytest.mark.parametrize("rig", ["quorum"], indirect=True)
async def test_a_quorum_worker_hands_back_a_key_beyond_its_connections_channels(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """With room for one key's channel left, a second key is handed back (reported after a
    pause), with a log that names channel_max; once the first is let go, it is taken."""
    rig.handoff._channel_limit = 1
    ref = KeyRef.of("k2")
    other = KeyAssignment(
        key_id=ref.id,
        job_type=ref.job_type,
        key=ref.key,
        queue=Names(rig.settings.namespace).key_queue(ref),
    )
    await rig.side.declare_queue(
        other.queue,
        durable=True,
        arguments=key_queue_arguments(rig.settings.key_queue_expires, "quorum"),
    )
    await rig.handoff.acquire(rig.assignment)
    await rig.handoff.acquire(other)
    assert [owned.key_id for owned in rig.handoff.holds()] == [rig.assignment.key_id]
    await eventually(lambda: rig.reported == [[other]])
    assert "channel_max" in caplog.text
    await rig.handoff.release_and_report([rig.assignment.key_id])
    await rig.handoff.acquire(other)
    assert rig.handoff.holding(other.key_id)
    await rig.handoff.release_and_report([other.key_id])
    await rig.side.queue_delete(other.queue)

"""The worker's side of parking and of failure reports, against the real broker: a real
registry and worker in process. A ``park`` job type whose head fails its last attempt stops
its key with the head and the later messages in the queue, in order, while other keys go on;
the worker tells the registry (``KeyParked``, then ``Released``). Heartbeats list the keys
whose head waits for its next attempt. A job a redrive put back runs as new.

What the worker tells the registry is read from a queue of the test's own bound to the
membership exchange (fanout): the registry's own queue is the registry's. Until the registry
knows ``KeyParked`` (``book.key_parked``, built beside this), it drops it and places the
key again after the ``Released``: the worker then takes it, fails the head again and parks
it again. The assertions below hold either way; the ones that need the registry's part are
in :func:`test_the_registry_keeps_a_parked_key_unowned_and_unconsumed`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys._broker.amqp import ChannelPool, TaskSet
from rabbitkeys._observe.metrics import WorkerMetrics
from rabbitkeys._registry.keybook import KeyState
from rabbitkeys._wire.envelope import HEADER_BATCH, HEADER_REDRIVE, HEADER_SEQUENCE, encode_envelope
from rabbitkeys._wire.protocol import (
    ControlMessage,
    KeyAssignment,
    KeyFailure,
    KeyParked,
    Released,
    WorkerHeartbeat,
    decode_control,
)
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments
from rabbitkeys._worker.execution import Executor, Park
from rabbitkeys._worker.handoff import Handoff

from ..support import eventually, make_settings, running_registry, running_worker
from .test_worker_batches import PUBLISHER, raw_key


class MembershipTap:
    """Every message workers sent to the registry, in order, decoded."""

    def __init__(self) -> None:
        self.messages: list[ControlMessage] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(decode_control(message.body))

    def parked(self, key: str) -> list[KeyParked]:
        return [m for m in self.messages if isinstance(m, KeyParked) and m.key.key == key]

    def heartbeats(self) -> list[WorkerHeartbeat]:
        return [m for m in self.messages if isinstance(m, WorkerHeartbeat)]

    def released_after_first_park(self, key: str) -> bool:
        """Whether the worker's first ``KeyParked`` of ``key`` is followed by its
        ``Released`` of the key (the same channel: in this order)."""
        [first, *_] = self.parked(key) or [None]
        if first is None:
            return False
        after = self.messages[self.messages.index(first) + 1 :]
        return any(
            isinstance(m, Released)
            and m.worker_id == first.worker_id
            and any(k.key == key for k in m.keys)
            for m in after
        )


@contextlib.asynccontextmanager
async def membership_tap(settings: Settings) -> AsyncIterator[MembershipTap]:
    """A queue of the test's own on the membership exchange (the registry declared it)."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(Names(settings.namespace).membership_exchange)
        tap = MembershipTap()
        await queue.consume(tap.on_message, no_ack=True)
        yield tap
    finally:
        await connection.close()


async def queued(
    settings: Settings, key: str
) -> tuple[list[aio_pika.abc.AbstractIncomingMessage], int]:
    """The messages in ``key``'s queue, head first (taken out), and how many consumers it
    had before."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Names(settings.namespace).key_queue(KeyRef.of(key)), passive=True
        )
        consumers = queue.declaration_result.consumer_count or 0
        count = queue.declaration_result.message_count or 0
        # consumed, not got: a quorum queue with a single active consumer refuses basic.get
        found: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            found.append(message)

        await queue.consume(take, no_ack=True)
        await eventually(lambda: len(found) >= count)
        return found, consumers
    finally:
        await connection.close()


def parked_total(metrics: CollectorRegistry) -> float:
    return metrics.get_sample_value("rabbitkeys_parked_total") or 0.0


def picky_app(seen: list[tuple[str, bytes]]) -> App:
    """A ``park`` job type whose handler fails on the body ``poison``, always."""
    app = App()

    @app.handler(on_failure="park")
    async def picky(message: Message) -> None:
        seen.append((message.key, message.body))
        if message.body == b"poison":
            raise ValueError("cannot parse comment")

    return app


class _NoGauges:
    def gauge_values(self) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_hold_that_parks_puts_its_head_back_first_and_reports_parked_then_released(
    amqp_url: str, namespace: str, queue_type: str
) -> None:
    """The handoff alone on a real consume channel, no registry to assign the key again:
    after the park nobody consumes the queue, which holds the head and the messages after
    it, in order (the worker had them all delivered); the park is reported before the
    release, and counted once."""
    settings = make_settings(
        amqp_url,
        namespace,
        max_retries=1,
        retry_backoff=0.5,
        prefetch=10,
        queue_type=queue_type,
        durable=True,
    )
    seen: list[tuple[str, bytes]] = []
    reports: list[tuple[str, Any]] = []

    async def released(keys: list[KeyAssignment]) -> None:
        reports.append(("released", keys))

    async def parked(assignment: KeyAssignment, park: Park) -> None:
        reports.append(("parked", (assignment, park)))

    stopping = asyncio.Event()
    metrics = WorkerMetrics(_NoGauges(), CollectorRegistry())
    tasks = TaskSet(logging.getLogger("test"), "test task")
    executor = Executor(picky_app(seen), settings, metrics, stopping)
    handoff = Handoff(settings, executor, metrics, tasks, stopping, released, parked=parked)
    ref = KeyRef.of("k")
    assignment = KeyAssignment(
        key_id=ref.id,
        job_type=ref.job_type,
        key=ref.key,
        queue=Names(namespace).key_queue(ref),
    )
    connection = await aio_pika.connect(amqp_url)
    try:
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=settings.prefetch)
        handoff.begin(
            cast(aiormq.Channel, await consume.get_underlay_channel()),
            ChannelPool(connection, size=1),
            asyncio.Event(),
            global_cap=False,
        )
        side = await connection.channel()
        # the registry's part: the worker only checks that the queue exists
        await side.declare_queue(
            assignment.queue,
            durable=True,
            arguments=key_queue_arguments(settings.key_queue_expires, queue_type),
        )
        for body in (b"1", b"poison", b"3", b"4"):
            await side.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=assignment.queue,
            )
        await handoff.acquire(assignment)
        [owned] = handoff.holds()
        await eventually(lambda: seen == [("k", b"1"), ("k", b"poison")])
        # while the head waits for its last attempt, the worker holds the rest too
        await eventually(lambda: [d.body for d in owned.buffer] == [b"poison", b"3", b"4"])
        assert reports == []
        await eventually(lambda: len(reports) == 2)
        assert reports == [
            ("parked", (assignment, Park("ValueError: cannot parse comment", 2, 0))),
            ("released", [assignment]),
        ]
        assert handoff.holds() == [] and handoff.parked == 1
        assert metrics.parked._value.get() == 1
        assert seen == [("k", b"1"), ("k", b"poison"), ("k", b"poison")]
        messages, consumers = await queued(settings, "k")
        assert consumers == 0
        assert [m.body for m in messages] == [b"poison", b"3", b"4"]
    finally:
        await asyncio.gather(*tasks, *handoff.runners(), return_exceptions=True)
        handoff.end()
        await connection.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_parked_key_stops_with_its_messages_in_order_and_other_keys_go_on(
    amqp_url: str, namespace: str, queue_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The head is put back first, then what the worker held after it, in order: a classic
    queue puts each back in its place, a quorum queue delivers returned messages first in
    the order they were returned."""
    settings = make_settings(
        amqp_url, namespace, max_retries=1, queue_type=queue_type, durable=True
    )
    seen: list[tuple[str, bytes]] = []
    metrics = CollectorRegistry()
    async with running_registry(settings), membership_tap(settings) as tap:
        async with running_worker(settings, picky_app(seen), metrics_registry=metrics) as worker:
            async with Publisher(settings) as publisher:
                for body in (b"1", b"poison", b"3", b"4"):
                    await publisher.publish("post 1", body)
                for n in range(5):
                    await publisher.publish("post 2", str(n).encode())
            await eventually(lambda: tap.released_after_first_park("post 1"))
            await eventually(lambda: len([k for k, _ in seen if k == "post 2"]) == 5)
            first = tap.parked("post 1")[0]
            assert first.worker_id == worker.worker_id
            assert (first.error, first.attempts, first.job_index) == (
                "ValueError: cannot parse comment",
                2,
                0,
            )
            assert first.key.job_type == "default" and first.key.key_id == KeyRef.of("post 1").id
            assert parked_total(metrics) >= 1 and worker.parked >= 1
            assert worker.dead_lettered == 0
        # the worker stopped (its drain puts back whatever it held)
    assert [body for key, body in seen if key == "post 1" and body != b"poison"] == [b"1"]
    assert [body for key, body in seen if key == "post 2"] == [b"0", b"1", b"2", b"3", b"4"]
    messages, _ = await queued(settings, "post 1")
    assert [m.body for m in messages] == [b"poison", b"3", b"4"]
    assert [m.headers[HEADER_SEQUENCE] for m in messages] == [2, 3, 4]
    assert "rabbitkeys resume default 'post 1'" in caplog.text
    assert "rabbitkeys skip default 'post 1'" in caplog.text


async def test_the_registry_keeps_a_parked_key_unowned_and_unconsumed(
    amqp_url: str, namespace: str
) -> None:
    """With the registry's part: the key is parked in its book, with the worker's error,
    unowned; nobody consumes its queue, and it is parked once."""
    settings = make_settings(amqp_url, namespace, max_retries=1)
    seen: list[tuple[str, bytes]] = []
    metrics = CollectorRegistry()
    key_id = KeyRef.of("post 1").id
    async with running_registry(settings) as registry, membership_tap(settings) as tap:
        async with running_worker(settings, picky_app(seen), metrics_registry=metrics) as worker:
            async with Publisher(settings) as publisher:
                for body in (b"1", b"poison", b"3"):
                    await publisher.publish("post 1", body)
                await publisher.publish("post 2", b"after")
            await eventually(lambda: ("post 2", b"after") in seen)
            await eventually(lambda: registry._book.keys[key_id].parked is not None)
            parked = registry._book.keys[key_id].parked
            assert parked is not None
            assert (parked.error, parked.attempts, parked.job_index) == (
                "ValueError: cannot parse comment",
                2,
                0,
            )
            assert parked.worker_id == worker.worker_id
            # several heartbeats later: still let go, still parked, parked once
            beats = len(tap.heartbeats())
            await eventually(lambda: len(tap.heartbeats()) >= beats + 5)
            key = registry._book.keys[key_id]
            assert key.state is KeyState.UNOWNED and key.owner is None
            assert KeyRef.of("post 1").id not in worker.owned_keys
            assert parked_total(metrics) == 1 and len(tap.parked("post 1")) == 1
            messages, consumers = await queued(settings, "post 1")
            assert consumers == 0
            assert [m.body for m in messages] == [b"poison", b"3"]


async def test_a_batch_whose_job_1_of_3_fails_parks_with_the_whole_batch_at_the_head(
    amqp_url: str, namespace: str
) -> None:
    """Job 0 handled (once: recorded, so a retake skips it), job 2 never run; the batch is
    put back whole, at the head, before the key's next message."""
    settings = make_settings(amqp_url, namespace, max_retries=0)
    seen: list[tuple[str, bytes]] = []
    async with running_registry(settings), membership_tap(settings) as tap:
        async with running_worker(settings, picky_app(seen)), raw_key(settings, "k") as key:
            await key.batch((1, b"1"), (2, b"poison"), (3, b"3"))
            await key.plain(4, b"4")
            await eventually(lambda: tap.released_after_first_park("k"))
            first = tap.parked("k")[0]
            assert (first.error, first.attempts, first.job_index) == (
                "ValueError: cannot parse comment",
                1,
                1,
            )
    assert [body for _, body in seen if body != b"poison"] == [b"1"]
    [batch, plain], _ = await queued(settings, "k")
    assert batch.headers[HEADER_BATCH] == 1 and plain.body == b"4"
    assert plain.headers[HEADER_SEQUENCE] == 4


async def test_a_redriven_job_runs_again_where_its_sequence_was_handled(
    settings: Settings,
) -> None:
    """The worker's history has publisher and sequence 1 of the key: the same job again is a
    copy, dropped; with the redrive header it runs, as new."""
    seen: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message.body)

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with raw_key(settings, "k") as key:
            await key.plain(1, b"first")
            await eventually(lambda: seen == [b"first"])
            await key.plain(1, b"copy")
            await eventually(lambda: worker.duplicates_dropped == 1)
            properties = encode_envelope(
                key.ref,
                publisher_id=PUBLISHER,
                sequence=1,
                delivery_mode=2,
                user_id=settings.amqp_user,
            )
            properties.headers = {**(properties.headers or {}), HEADER_REDRIVE: "redrive-1"}
            await key.send(b"redriven", properties)
            await key.plain(2, b"second")
            await eventually(lambda: len(seen) == 3)
    assert seen == [b"first", b"redriven", b"second"]
    assert worker.duplicates_dropped == 1 and worker.order_violations == 0


async def test_heartbeats_list_a_key_while_its_head_waits_for_its_next_attempt(
    amqp_url: str, namespace: str
) -> None:
    """Attempts so far and the last error while it retries; no longer listed once its job
    succeeded."""
    settings = make_settings(
        amqp_url, namespace, max_retries=50, retry_backoff=0.3, retry_backoff_max=0.3
    )
    busy = True
    handled: list[bytes] = []
    app = App()

    @app.handler(on_failure="park")
    async def flaky(message: Message) -> None:
        if busy:
            raise ConnectionError("database busy")
        handled.append(message.body)

    key_id = KeyRef.of("k").id

    def failing_beats() -> list[list[KeyFailure]]:
        return [beat.failing for beat in tap.heartbeats() if beat.failing]

    async with running_registry(settings), membership_tap(settings) as tap:
        async with running_worker(settings, app), Publisher(settings) as publisher:
            await publisher.publish("k", b"x")
            await eventually(lambda: len(failing_beats()) >= 2)
            attempts = []
            for failing in failing_beats():
                [failure] = failing
                assert failure.key_id == key_id
                assert failure.error == "ConnectionError: database busy"
                attempts.append(failure.attempts)
            assert attempts[0] >= 1 and attempts == sorted(attempts)
            busy = False
            await eventually(lambda: handled == [b"x"])
            # the next heartbeat may have been made before the success, and be on its way
            beats = len(tap.heartbeats()) + 1
            await eventually(lambda: len(tap.heartbeats()) >= beats + 3)
            assert all(beat.failing == [] for beat in tap.heartbeats()[beats:])


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_park_keeps_the_order_of_a_queue_deeper_than_the_prefetch(
    amqp_url: str, namespace: str, queue_type: str
) -> None:
    """The worker holds one delivery (``prefetch=1``) and the queue holds the rest: after the
    park, the head is still first, the others after it in order. A quorum queue puts a
    message rejected after its consumer's cancel at its back (docs/probes/redrive_rotation.py):
    there, the worker closes the key's channel instead, which puts each back in its place."""
    settings = make_settings(
        amqp_url, namespace, max_retries=1, queue_type=queue_type, durable=True, prefetch=1
    )
    seen: list[tuple[str, bytes]] = []
    async with running_registry(settings), membership_tap(settings) as tap:
        async with running_worker(settings, picky_app(seen)):
            async with Publisher(settings) as publisher:
                for body in (b"1", b"poison", b"3", b"4", b"5", b"6"):
                    await publisher.publish("k", body)
            await eventually(lambda: tap.released_after_first_park("k"))
    assert [body for _, body in seen if body != b"poison"] == [b"1"]
    messages, _ = await queued(settings, "k")
    assert [m.body for m in messages] == [b"poison", b"3", b"4", b"5", b"6"]

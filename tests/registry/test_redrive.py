"""The registry's broker procedures for redrive and skip (``rabbitkeys._registry.redrive``), against
the real broker with no registry running: each test declares a namespace's dead-letter
queue and exchange (as the registry does, ``declare_control_topology``) and one key's jobs
exchange and queue, bound with a fresh routing key (``_commands._declare_and_bind``).

What is shown: a rearrangement puts the dead letters first, in their order, then what
waited, in its order, each message once; a recovery finishes a rotation cut part way; the
dead-letter queue keeps what a redrive does not take, in place; a skip dead-letters the
parked jobs of the head and removes it."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from pamqp import commands as spec

from rabbitkeys._broker.control import declare_control_topology
from rabbitkeys._registry import redrive as _redrive
from rabbitkeys._registry.redrive import (
    REGISTRY_WORKER_ID,
    DeadLetteredMessage,
    RearrangeError,
    _take,
    read_dead_letters,
    rearrange,
    skip_head,
)
from rabbitkeys._wire.batch import Record
from rabbitkeys._wire.envelope import (
    BATCH_CONTENT_TYPE,
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_FAILED_AT,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_REDRIVE,
    HEADER_SEQUENCE,
    HEADER_WORKER,
    dead_letter_headers,
    decode_envelope,
    encode_batch,
    encode_envelope,
    jobs_of,
)
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments, new_routing_key

from ..conftest import Broker

REDRIVE_ID = "rd-0123456789abcdef"


@dataclass
class Got:
    """A message read back from a queue (acked)."""

    body: bytes
    properties: spec.Basic.Properties
    redelivered: bool

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


@dataclass
class Key:
    """One key's queue, bound to its jobs exchange, in a namespace with a dead-letter queue."""

    connection: AbstractConnection
    channel: aiormq.abc.AbstractChannel
    names: Names
    ref: KeyRef
    queue: str
    routing_key: str

    @property
    def exchange(self) -> str:
        return self.names.jobs_exchange(self.ref.job_type)

    async def publish(self, body: bytes, properties: spec.Basic.Properties) -> None:
        confirmed = await self.channel.basic_publish(
            body,
            exchange=self.exchange,
            routing_key=self.routing_key,
            properties=properties,
            mandatory=True,
        )
        assert isinstance(confirmed, spec.Basic.Ack)

    async def wait(self, *bodies: str, key: KeyRef | None = None) -> None:
        """Messages waiting in the key queue, as a publisher sends them (sequence n)."""
        for n, body in enumerate(bodies):
            await self.publish(body.encode(), self.properties(n, key))

    def properties(self, sequence: int, key: KeyRef | None = None) -> spec.Basic.Properties:
        return encode_envelope(
            key or self.ref,
            publisher_id="pub-1",
            sequence=sequence,
            delivery_mode=2,
            user_id="guest",
            headers={"app": "kept"},
        )

    async def dead_letter(
        self, body: bytes, *, key: KeyRef | None = None, failed_at: int | None = None, n: int = 0
    ) -> None:
        """A dead letter in NS.dead-letter, as a worker makes it."""
        headers = dead_letter_headers(
            decode_envelope(self.properties(n, key)),
            error=ValueError("boom"),
            attempts=3,
            worker_id="worker-1",
            failed_at=failed_at,
        )
        await self.raw_dead_letter(body, headers)

    async def raw_dead_letter(self, body: bytes, headers: dict[str, Any], **props: Any) -> None:
        confirmed = await self.channel.basic_publish(
            body,
            exchange=self.names.dead_letter_exchange,
            properties=spec.Basic.Properties(
                headers=headers, delivery_mode=2, user_id="guest", **props
            ),
            mandatory=True,
        )
        assert isinstance(confirmed, spec.Basic.Ack)

    async def drain(self, queue: str | None = None, expect: int | None = None) -> list[Got]:
        """Everything in ``queue`` (the key's), in order, acked (taken by a consumer: a
        quorum queue with single active consumer refuses basic.get). ``expect``: how many
        messages the queue must come to hold first (what a closed channel gave back)."""
        if expect is not None:
            await self.until_count(expect, queue)
        taken = await _take(self.channel, queue or self.queue, await self.count(queue))
        if taken:
            await self.channel.basic_ack(taken[-1].delivery_tag or 0, multiple=True)
        return [Got(got.body, got.header.properties, bool(got.redelivered)) for got in taken]

    async def bodies(self, queue: str | None = None, expect: int | None = None) -> list[bytes]:
        return [got.body for got in await self.drain(queue, expect)]

    async def until_count(self, expect: int, queue: str | None = None) -> None:
        """Wait until ``queue`` (the key's) holds ``expect`` messages: what a closed
        channel gives back may take a moment to show in a quorum queue's count."""
        deadline = asyncio.get_running_loop().time() + 10
        while (found := await self.count(queue)) != expect:
            assert asyncio.get_running_loop().time() < deadline, (found, expect)
            await asyncio.sleep(0.05)

    async def count(self, queue: str | None = None) -> int:
        declared = await self.channel.queue_declare(queue or self.queue, passive=True)
        assert declared is not None and declared.message_count is not None
        return declared.message_count

    async def dead_letters(self, key: KeyRef | None = None) -> list[DeadLetteredMessage]:
        """Every dead letter of ``key`` (this key), read and acked at once."""
        ref = key or self.ref
        selection = await read_dead_letters(
            self.connection,
            self.names,
            lambda job_type, key: (job_type, key) == (ref.job_type, ref.key),
        )
        found = selection.selected.get((ref.job_type, ref.key), [])
        await selection.settle(ref.job_type, ref.key, ok=True)
        await selection.close()
        return found

    async def rearrange(self, dead_letters: list[DeadLetteredMessage] | None) -> list[str]:
        return await rearrange(
            self.connection,
            self.names,
            self.ref,
            self.queue,
            [self.routing_key],
            REDRIVE_ID,
            dead_letters,
            grace=0.05,
        )


async def _declare_key(
    connection: AbstractConnection, names: Names, ref: KeyRef, queue_type: str = "classic"
) -> Key:
    admin = await connection.channel()
    await declare_control_topology(connection, admin, names, queue_type)
    await admin.close()
    channel = await (await connection.channel(publisher_confirms=True)).get_underlay_channel()
    exchange = names.jobs_exchange(ref.job_type)
    await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
    queue = names.key_queue(ref)
    arguments = key_queue_arguments(120, queue_type)
    await channel.queue_declare(queue, durable=True, arguments=arguments)
    routing_key = new_routing_key(ref)
    await channel.queue_bind(queue, exchange, routing_key=routing_key)
    return Key(connection, channel, names, ref, queue, routing_key)


@pytest.fixture
async def key(request: pytest.FixtureRequest, amqp_url: str, namespace: str) -> AsyncIterator[Key]:
    """Key ``k-1`` of job type ``default`` (a classic queue, or of the type a test's
    ``queue_type`` parameter names); the namespace fixture deletes its queues."""
    queue_type = getattr(request, "param", "classic")
    connection = await aio_pika.connect(amqp_url)
    try:
        yield await _declare_key(connection, Names(namespace), KeyRef.of("k-1"), queue_type)
    finally:
        await connection.close()


#: a test run with classic and with quorum key queues and dead-letter queue (a quorum
#: queue refuses basic.get with single active consumer, and puts a message nacked with
#: requeue at its back)
BOTH_QUEUE_TYPES = pytest.mark.parametrize("key", ["classic", "quorum"], indirect=True)


def _redriven(got: Got) -> bool:
    return got.headers.get(HEADER_REDRIVE) == REDRIVE_ID


# --- rearrange --------------------------------------------------------------------------


@BOTH_QUEUE_TYPES
async def test_dead_letters_go_before_the_waiting_messages_each_once_in_order(
    key: Key, broker: Broker, session_vhost: str
) -> None:
    await key.wait("w0", "w1", "w2", "w3", "w4")
    for n in range(3):
        await key.dead_letter(f"d{n}".encode(), failed_at=1_000 + n, n=n)
    removed = await key.rearrange(await key.dead_letters())
    assert removed == [key.routing_key]
    found = await key.drain()
    assert [got.body for got in found] == [b"d0", b"d1", b"d2", b"w0", b"w1", b"w2", b"w3", b"w4"]
    assert [_redriven(got) for got in found] == [True] * 3 + [False] * 5
    # the rotated messages are as they were published: headers, persistence, the user
    for n, got in enumerate(found[3:]):
        assert got.headers[HEADER_SEQUENCE] == n and got.headers["app"] == "kept"
        assert got.properties.delivery_mode == 2 and got.properties.user_id == "guest"
        assert not got.redelivered
    # unbound: the old routing key no longer routes, nor does any private one
    assert await _bindings(broker, session_vhost, key) == []
    returned = await key.channel.basic_publish(
        b"late", exchange=key.exchange, routing_key=key.routing_key, mandatory=True
    )
    assert isinstance(returned, aiormq.abc.DeliveredMessage)  # came back
    assert await key.count() == 0
    assert await key.count(key.names.dead_letter_queue) == 0


async def test_redriven_copies_carry_the_redrive_id_and_lose_the_failure_headers(
    key: Key,
) -> None:
    await key.dead_letter(b"d0", failed_at=5)
    (dead,) = await key.dead_letters()
    assert dead.failed_at == 5 and dead.key == "k-1" and dead.job_type == "default"
    await key.rearrange([dead])
    (got,) = await key.drain()
    headers = got.headers
    assert headers[HEADER_REDRIVE] == REDRIVE_ID
    for name in (HEADER_ERROR, HEADER_ATTEMPTS, HEADER_FAILED_AT, HEADER_WORKER):
        assert name not in headers
    assert headers[HEADER_KEY] == "k-1" and headers[HEADER_JOB_TYPE] == "default"
    assert headers[HEADER_SEQUENCE] == 0 and headers["app"] == "kept"
    assert got.properties.delivery_mode == 2
    assert decode_envelope(got.properties).origin is not None


async def test_with_nothing_waiting_the_dead_letters_are_the_queue(key: Key) -> None:
    for n in range(3):
        await key.dead_letter(f"d{n}".encode(), failed_at=10 + n, n=n)
    await key.rearrange(await key.dead_letters())
    assert await key.bodies() == [b"d0", b"d1", b"d2"]


async def test_with_no_dead_letters_the_waiting_messages_keep_their_order(key: Key) -> None:
    await key.wait(*(f"w{n}" for n in range(5)))
    assert await key.rearrange([]) == [key.routing_key]
    found = await key.drain()
    assert [got.body for got in found] == [f"w{n}".encode() for n in range(5)]
    assert not any(got.redelivered for got in found)  # not even got: nothing to move


@BOTH_QUEUE_TYPES
async def test_a_long_queue_rotates_over_several_rounds(key: Key) -> None:
    waiting = [f"w{n}" for n in range(150)]  # more than two rounds of 64
    await key.wait(*waiting)
    for n in range(2):
        await key.dead_letter(f"d{n}".encode(), failed_at=n, n=n)
    await key.rearrange(await key.dead_letters())
    assert await key.bodies() == [b"d0", b"d1", *(body.encode() for body in waiting)]


async def test_batches_keep_their_body(key: Key) -> None:
    """A waiting batch rotates whole; a dead letter that is a whole batch (unreadable by
    the worker that dead-lettered it) goes back whole."""
    records = [
        Record(sequence=n, published_at=1_700_000_000_000_000 + n, body=f"j{n}".encode())
        for n in range(3)
    ]
    body, properties = encode_batch(
        key.ref, records, publisher_id="pub-1", delivery_mode=2, user_id="guest"
    )
    await key.publish(body, properties)
    await key.wait("w-after")
    dead_headers = dict(properties.headers or {})
    dead_headers.update({HEADER_ERROR: "BatchFormatError: x", HEADER_FAILED_AT: 1})
    await key.raw_dead_letter(body, dead_headers, content_type=BATCH_CONTENT_TYPE)
    await key.rearrange(await key.dead_letters())
    found = await key.drain()
    assert [got.body for got in found] == [body, body, b"w-after"]
    for got in found[:2]:
        assert got.properties.content_type == BATCH_CONTENT_TYPE
        jobs = jobs_of(got.properties, got.body)
        assert [(job.body, job.envelope.sequence) for job in jobs] == [
            (b"j0", 0),
            (b"j1", 1),
            (b"j2", 2),
        ]
    assert _redriven(found[0]) and not _redriven(found[1])


@BOTH_QUEUE_TYPES
async def test_recovery_finishes_a_rotation_cut_part_way(key: Key) -> None:
    """A registry crashed after publishing the dead letters and moving 2 of the 5 waiting
    messages: the next one only finishes the rotation."""
    await key.wait("w0", "w1", "w2", "w3", "w4")
    await _cut_rearrangement(key, [b"d0", b"d1"], moved=2)
    assert await _peek(key, 7) == [b"w2", b"w3", b"w4", b"d0", b"d1", b"w0", b"w1"]
    await key.rearrange(None)
    found = await key.drain()
    assert [got.body for got in found] == [b"d0", b"d1", b"w0", b"w1", b"w2", b"w3", b"w4"]
    assert [_redriven(got) for got in found] == [True, True] + [False] * 5


async def test_recovery_before_any_dead_letter_was_published_leaves_the_order(
    key: Key,
) -> None:
    """No message carries the redrive: a full cycle, the queue as it was."""
    await key.wait(*(f"w{n}" for n in range(70)))
    await key.rearrange(None)
    assert await key.bodies() == [f"w{n}".encode() for n in range(70)]


async def test_recovery_of_a_finished_rotation_changes_nothing(key: Key) -> None:
    await key.wait("w0", "w1")
    await _cut_rearrangement(key, [b"d0"], moved=2)
    await key.rearrange(None)
    found = await key.drain()
    assert [got.body for got in found] == [b"d0", b"w0", b"w1"]
    # the redrive's first message was got and put back in its place
    assert found[0].redelivered


async def test_a_failed_rearrangement_says_how_far_it_got(key: Key) -> None:
    gone = Key(
        key.connection,
        key.channel,
        key.names,
        KeyRef.of("missing"),
        key.names.key_queue(KeyRef.of("missing")),
        "",
    )
    with pytest.raises(RearrangeError) as raised:
        await rearrange(
            gone.connection, gone.names, gone.ref, gone.queue, [], REDRIVE_ID, [], grace=0
        )
    assert raised.value.removed == [] and not raised.value.queue_changed
    assert (raised.value.sent, raised.value.published, raised.value.rotated) == (0, 0, 0)
    assert isinstance(raised.value.__cause__, aiormq.exceptions.ChannelNotFoundEntity)


@BOTH_QUEUE_TYPES
async def test_a_key_queue_with_a_consumer_is_not_rearranged(key: Key) -> None:
    """A worker the book does not know of still consumes the key queue: the rearrangement
    fails before it changes anything."""
    await key.wait("w0", "w1")
    await key.dead_letter(b"d0")
    dead_letters = await key.dead_letters()
    intruder = await key.connection.channel()
    await intruder.set_qos(prefetch_count=1)
    await (await intruder.get_queue(key.queue, ensure=False)).consume(_hold)
    with pytest.raises(RearrangeError) as raised:
        await key.rearrange(dead_letters)
    assert raised.value.removed == [key.routing_key] and not raised.value.queue_changed
    assert "consumer" in str(raised.value)
    await intruder.close()
    assert await key.bodies(expect=2) == [b"w0", b"w1"]


@BOTH_QUEUE_TYPES
async def test_a_rearrangement_cut_with_copies_in_the_queue_is_finished_by_a_recovery(
    key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another consumer comes once the dead letters are published: the rotation's
    consumer is a standby and gets nothing; the rearrangement fails and says how far it
    got. Once the intruder is gone, a recovery puts the dead letters first."""
    monkeypatch.setattr(_redrive, "_TAKE_TIMEOUT", 1.0)
    await key.wait("w0", "w1", "w2")
    for n in range(2):
        await key.dead_letter(f"d{n}".encode(), failed_at=n, n=n)
    dead_letters = await key.dead_letters()
    intruder = await key.connection.channel()
    await intruder.set_qos(prefetch_count=1)
    publish = _redrive._Tail.publish

    async def publish_then_intrude(self: Any, messages: Any) -> None:
        await publish(self, messages)
        await (await intruder.get_queue(key.queue, ensure=False)).consume(_hold)

    monkeypatch.setattr(_redrive._Tail, "publish", publish_then_intrude)
    with pytest.raises(RearrangeError) as raised:
        await key.rearrange(dead_letters)
    failed = raised.value
    assert failed.removed == [key.routing_key] and isinstance(failed.__cause__, TimeoutError)
    assert (failed.sent, failed.published, failed.rotated) == (2, 2, 0)
    assert failed.queue_changed
    await intruder.close()  # w0 back at the head
    monkeypatch.setattr(_redrive._Tail, "publish", publish)
    assert await _peek(key, 5) == [b"w0", b"w1", b"w2", b"d0", b"d1"]
    await rearrange(key.connection, key.names, key.ref, key.queue, [], REDRIVE_ID, None, 0)
    # expect=5: what the recovery's closed channel gives back may take a moment to show in a
    # quorum queue (read as three of five once on RabbitMQ 4.0.5 under CI's load)
    assert await key.bodies(expect=5) == [b"d0", b"d1", b"w0", b"w1", b"w2"]


@BOTH_QUEUE_TYPES
async def test_a_rotation_cut_in_a_round_is_finished_by_a_recovery_at_once(
    key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies of the first round of the rotation cannot be published: the round, taken
    and not acked, goes back in place as the rearrangement fails; a recovery run at once
    (a quorum queue counts those messages again only a moment later) puts the dead
    letters first and the 100 waiting messages after them, in order."""
    waiting = [f"w{n}" for n in range(100)]
    await key.wait(*waiting)
    await key.dead_letter(b"d0", failed_at=1)
    publish = _redrive._Tail.publish
    calls = 0

    async def publish_dead_letters_only(self: Any, messages: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("the broker is gone")
        await publish(self, messages)

    monkeypatch.setattr(_redrive._Tail, "publish", publish_dead_letters_only)
    with pytest.raises(RearrangeError) as raised:
        await key.rearrange(await key.dead_letters())
    assert (raised.value.sent, raised.value.published, raised.value.rotated) == (1, 1, 0)
    monkeypatch.setattr(_redrive._Tail, "publish", publish)
    await rearrange(key.connection, key.names, key.ref, key.queue, [], REDRIVE_ID, None, 0)
    assert await key.bodies(expect=101) == [b"d0", *(body.encode() for body in waiting)]


async def _hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """An intruder's consumer that never settles what it receives."""


# --- reading the dead-letter queue ------------------------------------------------------


@BOTH_QUEUE_TYPES
async def test_a_selection_keeps_what_it_does_not_take_in_place_and_in_order(
    key: Key,
) -> None:
    other = KeyRef.of("k-2")
    await key.dead_letter(b"a0", failed_at=3)
    await key.dead_letter(b"b0", key=other, failed_at=1)
    await key.dead_letter(b"a1", failed_at=2)  # failed before a0: sorted first
    await key.raw_dead_letter(b"x", {"no": "key"})
    await key.dead_letter(b"b1", key=other, failed_at=4)
    await key.dead_letter(b"a2", failed_at=2)  # as a1: stays after it
    unsaid = dict(decode_envelope(key.properties(9)).headers)  # no failed-at: first of all
    await key.raw_dead_letter(b"a3", unsaid)
    selection = await read_dead_letters(
        key.connection, key.names, lambda job_type, name: name == "k-1"
    )
    assert list(selection.selected) == [("default", "k-1")]
    selected = selection.selected[("default", "k-1")]
    assert [d.body for d in selected] == [b"a3", b"a1", b"a2", b"a0"]
    assert [d.failed_at for d in selected] == [None, 2, 2, 3]
    assert (selection.not_selected, selection.unreadable, selection.count) == (2, 1, 4)
    # all held while the selection is open; then the selected ones acked, and the rest
    # back in place, in its order
    assert await key.count(key.names.dead_letter_queue) == 0
    await selection.settle("default", "k-1", ok=True)
    await selection.close()
    assert await key.bodies(key.names.dead_letter_queue, 3) == [b"b0", b"x", b"b1"]


@BOTH_QUEUE_TYPES
async def test_settling_not_ok_puts_the_dead_letters_back_in_their_places(key: Key) -> None:
    other = KeyRef.of("k-2")
    bodies = [b"a0", b"b0", b"a1", b"b1"]
    for body in bodies:
        await key.dead_letter(body, key=key.ref if body.startswith(b"a") else other)
    selection = await read_dead_letters(key.connection, key.names, lambda _type, _key: True)
    assert sorted(selection.selected) == [("default", "k-1"), ("default", "k-2")]
    await selection.settle("default", "k-1", ok=False)
    await selection.settle("default", "k-2", ok=True)
    await selection.close()
    assert await key.bodies(key.names.dead_letter_queue, 2) == [b"a0", b"a1"]


async def test_closing_a_selection_puts_everything_back(key: Key) -> None:
    for n in range(5):
        await key.dead_letter(f"a{n}".encode())
    selection = await read_dead_letters(key.connection, key.names, lambda _type, _key: True)
    assert selection.count == 5
    await selection.close()
    bodies = await key.bodies(key.names.dead_letter_queue, 5)
    assert bodies == [f"a{n}".encode() for n in range(5)]


# --- skip -------------------------------------------------------------------------------


async def test_skip_dead_letters_a_plain_head_and_removes_it(key: Key) -> None:
    await key.wait("head", "next")
    made = await skip_head(
        key.connection,
        key.names,
        key.queue,
        error="ValueError: parked",
        attempts=4,
        job_index=0,
        user_id="guest",
    )
    assert made == 1
    assert await key.bodies() == [b"next"]
    (dead,) = await key.drain(key.names.dead_letter_queue)
    assert dead.body == b"head"
    headers = dead.headers
    assert headers[HEADER_ERROR] == "ValueError: parked"
    assert headers[HEADER_ATTEMPTS] == 4 and headers[HEADER_WORKER] == REGISTRY_WORKER_ID
    assert isinstance(headers[HEADER_FAILED_AT], int)
    assert headers[HEADER_KEY] == "k-1" and headers[HEADER_SEQUENCE] == 0
    assert headers["app"] == "kept" and dead.properties.user_id == "guest"


@BOTH_QUEUE_TYPES
async def test_skip_dead_letters_a_batch_from_the_failing_job_on_each_alone(key: Key) -> None:
    records = [
        Record(
            sequence=n,
            published_at=1_700_000_000_000_000 + n,
            body=f"j{n}".encode(),
            content_type="text/plain",
        )
        for n in range(3)
    ]
    body, properties = encode_batch(
        key.ref, records, publisher_id="pub-1", delivery_mode=2, user_id="guest"
    )
    await key.publish(body, properties)
    await key.wait("next")
    made = await skip_head(
        key.connection,
        key.names,
        key.queue,
        error="KeyError: 'x'",
        attempts=2,
        job_index=1,
        user_id="guest",
    )
    assert made == 2
    assert await key.bodies() == [b"next"]
    dead = await key.drain(key.names.dead_letter_queue)
    assert [(d.body, d.headers[HEADER_SEQUENCE]) for d in dead] == [(b"j1", 1), (b"j2", 2)]
    for letter in dead:
        assert letter.properties.content_type == "text/plain"
        assert letter.headers[HEADER_ERROR] == "KeyError: 'x'"
        assert letter.headers[HEADER_KEY] == "k-1"
        # each alone: a plain message, not a batch
        assert len(jobs_of(letter.properties, letter.body)) == 1


async def test_skip_of_an_empty_queue_makes_nothing(key: Key) -> None:
    made = await skip_head(
        key.connection,
        key.names,
        key.queue,
        error="E: x",
        attempts=1,
        job_index=0,
        user_id="guest",
    )
    assert made == 0
    assert await key.count(key.names.dead_letter_queue) == 0


# --- helpers ------------------------------------------------------------------------------


async def _cut_rearrangement(key: Key, dead: list[bytes], moved: int) -> None:
    """What a registry that crashed mid-way leaves: the key unbound, redriven copies of
    ``dead`` at the tail, and ``moved`` of the waiting messages rotated behind them."""
    await key.channel.queue_unbind(key.queue, key.exchange, routing_key=key.routing_key)
    private = f"{key.ref.token}|redrive-cut"
    await key.channel.queue_bind(key.queue, key.exchange, routing_key=private)
    for n, body in enumerate(dead):
        properties = key.properties(100 + n)
        assert properties.headers is not None
        properties.headers[HEADER_REDRIVE] = REDRIVE_ID
        await key.channel.basic_publish(
            body, exchange=key.exchange, routing_key=private, properties=properties
        )
    for got in await _take(key.channel, key.queue, moved):
        await key.channel.basic_publish(
            got.body, exchange=key.exchange, routing_key=private, properties=got.header.properties
        )
        assert got.delivery_tag is not None
        await key.channel.basic_ack(got.delivery_tag)
    await key.channel.queue_unbind(key.queue, key.exchange, routing_key=private)
    # the test's own rearrangement unbinds the key's routing key again: bind it back
    await key.channel.queue_bind(key.queue, key.exchange, routing_key=key.routing_key)


async def _peek(key: Key, expect: int) -> list[bytes]:
    """The key queue's bodies in order, left in place (taken unacked on a channel of their
    own, which is then closed: each goes back to its place), once it holds ``expect``."""
    await key.until_count(expect)
    channel = await key.connection.channel()
    try:
        underlay = await channel.get_underlay_channel()
        return [got.body for got in await _take(underlay, key.queue, expect)]
    finally:
        await channel.close()


async def _bindings(broker: Broker, vhost: str, key: Key) -> list[str]:
    """The routing keys ``key``'s queue is bound with on its jobs exchange."""
    path = (
        f"bindings/{urllib.parse.quote(vhost, safe='')}/e/{urllib.parse.quote(key.exchange)}"
        f"/q/{urllib.parse.quote(key.queue, safe='')}"
    )
    return sorted(binding["routing_key"] for binding in broker.api(path))

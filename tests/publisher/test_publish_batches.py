"""The publisher's batches on the wire: a raw aio-pika consumer reads the key queue and
decodes each delivery with ``jobs_of``, so what is checked is what a worker (in any
language) receives: jobs of one key in call order, grouped into batches when published back
to back, within the bounds, and neither lost nor reordered by a lost connection or a
returned message."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from pamqp import commands as spec
from prometheus_client import CollectorRegistry

from rabbitkeys import Publisher, Settings
from rabbitkeys._publisher.lane import Batch, Lane
from rabbitkeys._wire.envelope import HEADER_BATCH, HEADER_KEY, Job, jobs_of
from rabbitkeys._wire.topology import KeyRef, Names

from ..proxy import TcpProxy
from ..support import eventually, make_settings, running_registry


@dataclass
class Delivery:
    """One AMQP message as the key queue delivered it."""

    batch: bool
    body_size: int
    jobs: list[Job]


class KeyQueueReader:
    """Every message of one key's queue, in delivery order, decoded with ``jobs_of``."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    @property
    def jobs(self) -> list[Job]:
        return [job for delivery in self.deliveries for job in delivery.jobs]

    def bodies(self) -> list[bytes]:
        return [job.body for job in self.jobs]

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        properties = spec.Basic.Properties(
            headers=dict(message.headers),
            content_type=message.content_type,
            user_id=message.user_id,
        )
        jobs = jobs_of(properties, message.body)
        self.deliveries.append(Delivery(HEADER_BATCH in message.headers, len(message.body), jobs))
        await message.ack()


@contextlib.asynccontextmanager
async def reading(amqp_url: str, namespace: str, key: str) -> AsyncIterator[KeyQueueReader]:
    """Consume ``key``'s queue (it must exist: publish to the key first)."""
    reader = KeyQueueReader()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(Names(namespace).key_queue(KeyRef.of(key)), ensure=False)
        await queue.consume(reader.on_message)
        yield reader
    finally:
        await connection.close()


def confirmed_jobs(publisher: Publisher) -> set[int]:
    """Sequence numbers of the jobs whose message the broker acked, as the acks come in."""
    acked: set[int] = set()
    carrier = publisher._carrier
    original = carrier._on_answer

    def spy(lane: Lane, batch: Batch, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            if isinstance(task.result(), spec.Basic.Ack):
                acked.update(entry.sequence for entry in batch.entries)
        original(lane, batch, task)

    carrier._on_answer = spy  # type: ignore[method-assign]
    return acked


def batch_jobs(publisher: Publisher) -> tuple[float, float]:
    """(AMQP messages sent, jobs in them) by the ``rabbitkeys_publish_batch_jobs`` metric."""
    [histogram] = publisher.metrics.batch_jobs.collect()
    samples = {sample.name: sample.value for sample in histogram.samples}
    return (
        samples["rabbitkeys_publish_batch_jobs_count"],
        samples["rabbitkeys_publish_batch_jobs_sum"],
    )


async def test_back_to_back_publishes_go_as_batches_in_call_order_each_confirmed(
    settings: Settings, amqp_url: str, namespace: str
) -> None:
    publisher = Publisher(settings, metrics_registry=CollectorRegistry())
    async with running_registry(settings), publisher:
        await publisher.publish("k", b"first")
        acked = confirmed_jobs(publisher)

        async def publish(n: int) -> None:
            sequence = publisher._next_sequence
            await publisher.publish("k", str(n).encode())
            # publish() returns only once the message that carries the job was confirmed
            assert sequence in acked

        async with reading(amqp_url, namespace, "k") as reader:
            await asyncio.gather(*(publish(n) for n in range(300)))
            await eventually(lambda: len(reader.jobs) == 301)
    assert reader.bodies() == [b"first", *(str(n).encode() for n in range(300))]
    # a lone job is a plain message (today's format); what waits behind one goes as batches
    assert not reader.deliveries[0].batch and len(reader.deliveries[0].jobs) == 1
    assert len(reader.deliveries) < 30
    assert max(len(delivery.jobs) for delivery in reader.deliveries) == 100  # batch_max_jobs
    sequences = [job.envelope.sequence or 0 for job in reader.jobs]
    assert sequences == sorted(sequences) and len(set(sequences)) == 301
    # the metric counts jobs per AMQP message sent
    assert batch_jobs(publisher) == (len(reader.deliveries), 301)


async def test_a_batch_carries_each_jobs_content_type_and_headers(
    amqp_url: str, namespace: str
) -> None:
    # a linger so that the three calls, made together, leave as one batch
    settings = make_settings(amqp_url, namespace, batch_linger=0.3)
    async with running_registry(settings), Publisher(settings) as publisher:
        await publisher.publish("k", b"first")
        async with reading(amqp_url, namespace, "k") as reader:
            await asyncio.gather(
                publisher.publish("k", b"\x00raw", headers={"trace": "t-1", "n": 7}),
                publisher.publish("k", "text"),
                publisher.publish("k", {"json": [1, 2]}, headers={"flag": True}),
            )
            await eventually(lambda: len(reader.jobs) == 4)
    first, batch = reader.deliveries
    assert not first.batch and batch.batch and len(batch.jobs) == 3
    raw, text, json = batch.jobs
    assert (raw.body, raw.content_type) == (b"\x00raw", None)
    assert (text.body, text.content_type) == (b"text", "text/plain; charset=utf-8")
    assert (json.body, json.content_type) == (b'{"json":[1,2]}', "application/json")
    # each job has the headers it would have had as a message of its own
    assert raw.envelope.headers["trace"] == "t-1" and raw.envelope.headers["n"] == 7
    assert json.envelope.headers["flag"] is True and "trace" not in json.envelope.headers
    for job in batch.jobs:
        assert job.envelope.headers[HEADER_KEY] == "k"
        assert job.envelope.publisher_id == publisher.publisher_id
    assert [job.envelope.sequence for job in batch.jobs] == [2, 3, 4]


async def test_batches_keep_to_their_bounds_and_a_big_job_goes_alone(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(
        amqp_url, namespace, batch_max_jobs=5, batch_max_bytes=1_000, batch_linger=0.2
    )
    small = [f"small {n}".encode() for n in range(12)]
    mid = [bytes([65 + n]) * 300 for n in range(6)]
    big = b"B" * 5_000
    async with running_registry(settings), Publisher(settings) as publisher:
        await publisher.publish("k", b"first")
        async with reading(amqp_url, namespace, "k") as reader:
            await asyncio.gather(*(publisher.publish("k", body) for body in small))
            await asyncio.gather(*(publisher.publish("k", body) for body in [*mid, big]))
            await eventually(lambda: len(reader.jobs) == 1 + 12 + 7)
    assert reader.bodies() == [b"first", *small, *mid, big]
    for delivery in reader.deliveries:
        assert len(delivery.jobs) <= 5
        if delivery.batch:
            assert delivery.body_size <= 1_000
    # 300-byte jobs: three to a batch (each record adds 25 bytes); the big one alone, plain
    assert [len(d.jobs) for d in reader.deliveries if d.jobs[0].body in mid] == [3, 3]
    last = reader.deliveries[-1]
    assert not last.batch and last.jobs[0].body == big


async def test_batch_max_jobs_1_sends_plain_messages_only(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace, batch_max_jobs=1, max_in_flight_per_key=4)
    async with running_registry(settings), Publisher(settings) as publisher:
        await publisher.publish("k", b"first")
        async with reading(amqp_url, namespace, "k") as reader:
            await asyncio.gather(*(publisher.publish("k", str(n).encode()) for n in range(40)))
            await eventually(lambda: len(reader.jobs) == 41)
    assert not any(delivery.batch for delivery in reader.deliveries)
    assert reader.bodies() == [b"first", *(str(n).encode() for n in range(40))]


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[TcpProxy]:
    parts = urllib.parse.urlsplit(amqp_url)
    with TcpProxy(parts.hostname or "localhost", parts.port or 5672) as tcp_proxy:
        yield tcp_proxy


async def test_a_batch_cut_off_with_its_connection_is_sent_again_in_order(
    settings: Settings, amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    publisher_settings = make_settings(proxy.url(amqp_url), namespace, batch_linger=0.1)
    publisher = Publisher(publisher_settings, metrics_registry=CollectorRegistry())
    async with running_registry(settings), publisher:
        await publisher.publish("k", b"first")
        async with reading(amqp_url, namespace, "k") as reader:
            proxy.stall()
            calls = [
                asyncio.create_task(publisher.publish("k", str(n).encode())) for n in range(50)
            ]
            # the linger runs out: the 50 are written as one batch into the stalled connection
            await eventually(lambda: batch_jobs(publisher) == (2, 51))
            proxy.cut()
            proxy.resume()
            await asyncio.wait_for(asyncio.gather(*calls), 60)
            await eventually(lambda: len(reader.jobs) >= 51)
    assert publisher.resent_messages == 50
    bodies = list(dict.fromkeys(reader.bodies()))  # a worker drops copies: the first counts
    assert bodies == [b"first", *(str(n).encode() for n in range(50))]


async def test_a_returned_batch_is_routed_again_in_order(
    settings: Settings, amqp_url: str, namespace: str
) -> None:
    """The key's binding goes away under the publisher: its batch comes back
    (``basic.return``), the registry binds the key again, and the same jobs go out again, in
    order, on the new routing key."""
    settings = make_settings(amqp_url, namespace, batch_linger=0.2)
    ref = KeyRef.of("k")
    names = Names(namespace)
    async with running_registry(settings), Publisher(settings) as publisher:
        await publisher.publish("k", b"first")
        lane = publisher._lanes.lane(ref, names.jobs_exchange(ref.job_type))
        routing_key = lane.routing_key
        assert routing_key is not None
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(names.key_queue(ref), ensure=False)
            await queue.unbind(names.jobs_exchange(ref.job_type), routing_key)
        async with reading(amqp_url, namespace, "k") as reader:
            await asyncio.gather(*(publisher.publish("k", str(n).encode()) for n in range(20)))
            await eventually(lambda: len(reader.jobs) == 21)
        assert lane.routing_key not in (None, routing_key)
    assert publisher.returned_messages == 20  # counted per job
    assert reader.bodies() == [b"first", *(str(n).encode() for n in range(20))]
    assert [len(delivery.jobs) for delivery in reader.deliveries] == [1, 20]

"""A worker runs batches (several jobs of one key in one message) job by job, against the
real broker: batches are put straight into a key's queue, as any publisher (of any
language) could, through the jobs exchange with the routing key the registry gives."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from pamqp import commands as spec
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Settings
from rabbitkeys._broker.control import ControlClient
from rabbitkeys._wire.batch import Record, encode_headers
from rabbitkeys._wire.envelope import (
    BATCH_CONTENT_TYPE,
    HEADER_ATTEMPTS,
    HEADER_BATCH,
    HEADER_ERROR,
    HEADER_JOBS,
    HEADER_KEY,
    HEADER_SEQUENCE,
    encode_batch,
    encode_envelope,
)
from rabbitkeys._wire.payload import encode_payload
from rabbitkeys._wire.protocol import Ensured, EnsureKey
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys.tools.cluster import LocalCluster
from rabbitkeys.tools.demo import read_records

from ..conftest import Broker
from ..support import Handlings, eventually, make_settings, running_registry, running_worker
from .test_handlers import Comment
from .test_worker import dead_letters

PUBLISHER = "raw-publisher"


class RawKey:
    """One key's queue, fed directly: plain messages and batches of this test's making."""

    def __init__(self, settings: Settings, channel: aio_pika.abc.AbstractChannel, key: str):
        self.settings = settings
        self.channel = channel
        self.ref = KeyRef.of(key)
        self.routing_key = ""

    async def ensure(self, connection: aio_pika.abc.AbstractConnection) -> None:
        client = ControlClient(connection, Names(self.settings.namespace), self.settings.amqp_user)
        await client.start()
        try:
            reply = await client.request(
                EnsureKey(job_type="default", key=self.ref.key), timeout=10
            )
        finally:
            await client.close()
        assert isinstance(reply, Ensured), reply
        self.routing_key = reply.routing_key

    async def send(self, body: bytes, properties: spec.Basic.Properties) -> None:
        exchange = await self.channel.get_exchange(
            Names(self.settings.namespace).jobs_exchange("default"), ensure=False
        )
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=properties.headers,
                content_type=properties.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=properties.user_id,
            ),
            routing_key=self.routing_key,
            mandatory=True,
        )

    async def plain(self, sequence: int, body: bytes) -> None:
        properties = encode_envelope(
            self.ref,
            publisher_id=PUBLISHER,
            sequence=sequence,
            delivery_mode=2,
            user_id=self.settings.amqp_user,
        )
        await self.send(body, properties)

    async def batch(self, *jobs: tuple[int, bytes] | Record) -> None:
        records = [
            job if isinstance(job, Record) else Record(job[0], 1_700_000_000_000_000, job[1])
            for job in jobs
        ]
        body, properties = encode_batch(
            self.ref,
            records,
            publisher_id=PUBLISHER,
            delivery_mode=2,
            user_id=self.settings.amqp_user,
        )
        await self.send(body, properties)

    async def messages_ready(self) -> int:
        queue = await self.channel.declare_queue(
            Names(self.settings.namespace).key_queue(self.ref), passive=True
        )
        count = queue.declaration_result.message_count
        assert count is not None
        return count


@contextlib.asynccontextmanager
async def raw_key(settings: Settings, key: str) -> AsyncIterator[RawKey]:
    """``key`` ensured (the registry declares its queue), and a channel to feed it."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True)
        raw = RawKey(settings, channel, key)
        await raw.ensure(connection)
        yield raw
    finally:
        await connection.close()


def recording_app(handled: list[Message], handlings: Handlings | None = None) -> App:
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        if handlings is None:
            handled.append(message)
            return
        with handlings.handling(message.key, message.sequence or 0):
            await asyncio.sleep(0.002)  # long enough for two handlings to overlap, if they could
        handled.append(message)

    return app


async def test_jobs_of_batches_and_plain_messages_run_one_at_a_time_in_order(
    settings: Settings,
) -> None:
    handled: list[Message] = []
    handlings = Handlings()
    async with running_registry(settings), raw_key(settings, "post-1") as key:
        await key.plain(1, b"1")
        await key.batch((2, b"2"), (3, b"3"), (4, b"4"))
        await key.plain(5, b"5")
        await key.batch(
            Record(6, 1, b"6", "text/plain", encode_headers({"trace": "t-6"})),
            Record(7, 2, b"7"),
        )
        app = recording_app(handled, handlings)
        async with running_worker(settings, app, metrics_registry=CollectorRegistry()) as worker:
            await eventually(lambda: len(handled) == 7)
            assert [m.body for m in handled] == [str(n).encode() for n in range(1, 8)]
            assert [m.sequence for m in handled] == list(range(1, 8))
            assert handlings.overlaps() == []
            # each job is seen as if it had come alone: its own headers, content type
            six = handled[5]
            assert six.headers["trace"] == "t-6" and six.content_type == "text/plain"
            assert six.headers[HEADER_SEQUENCE] == 6 and HEADER_BATCH not in six.headers
            assert six.key == "post-1" and six.publisher_id == PUBLISHER
            assert not any(m.redelivered for m in handled)
            jobs = worker.metrics.delivery_jobs.collect()[0].samples
            assert {s.name: s.value for s in jobs}["rabbitkeys_delivery_jobs_sum"] == 7
            assert {s.name: s.value for s in jobs}["rabbitkeys_delivery_jobs_count"] == 4
        assert await key.messages_ready() == 0  # every delivery was acked


async def test_a_failing_job_is_dead_lettered_alone_and_the_rest_of_its_batch_runs(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=2)
    attempts: list[tuple[bytes, int]] = []
    app = App()

    @app.handler()
    async def picky(message: Message) -> None:
        attempts.append((message.body, message.attempt))
        if message.body == b"poison":
            raise ValueError("cannot parse comment")

    async with running_registry(settings), raw_key(settings, "post-9") as key:
        async with running_worker(settings, app) as worker:
            await key.batch(
                (1, b"a"),
                Record(2, 5, b"poison", "text/plain", encode_headers({"trace": "t-2"})),
                (3, b"b"),
            )
            await key.plain(4, b"c")
            await eventually(lambda: len(attempts) == 6)
            await eventually(lambda: worker.dead_lettered == 1)
        poison = [(b"poison", 1), (b"poison", 2), (b"poison", 3)]
        assert attempts == [(b"a", 1), *poison, (b"b", 1), (b"c", 1)]
        assert await key.messages_ready() == 0  # the batch was acked after its last job
    [dead] = await dead_letters(settings)
    assert dead.body == b"poison" and dead.content_type == "text/plain"
    assert dead.headers[HEADER_KEY] == "post-9" and dead.headers["trace"] == "t-2"
    assert dead.headers[HEADER_SEQUENCE] == 2
    assert dead.headers[HEADER_ATTEMPTS] == 3
    assert dead.headers[HEADER_ERROR] == "ValueError: cannot parse comment"
    assert HEADER_BATCH not in dead.headers and HEADER_JOBS not in dead.headers


async def test_a_job_of_a_batch_whose_body_does_not_fit_its_handler_goes_alone(
    settings: Settings,
) -> None:
    """A typed handler (``Message[Comment]``) in a plain ``def`` (a thread): each job's
    body is decoded on its own; one that does not fit is dead-lettered at once, alone."""
    comments: list[str] = []
    app = App()

    @app.handler()
    def create_comment(message: Message[Comment]) -> None:
        comments.append(message.payload.text)

    def job(sequence: int, payload: object) -> Record:
        body, content_type = encode_payload(payload)
        return Record(sequence, 1, bytes(body), content_type)

    async with running_registry(settings), raw_key(settings, "post A") as key:
        await key.batch(
            job(1, Comment(post="post A", text="first")),
            job(2, {"post": "post A"}),
            job(3, Comment(post="post A", text="third")),
        )
        async with running_worker(settings, app) as worker:
            await eventually(lambda: len(comments) == 2 and worker.dead_lettered == 1)
        assert comments == ["first", "third"]
        assert await key.messages_ready() == 0
    [dead] = await dead_letters(settings)
    assert dead.body == b'{"post":"post A"}' and dead.content_type == "application/json"
    assert dead.headers[HEADER_SEQUENCE] == 2 and dead.headers[HEADER_ATTEMPTS] == 1
    assert str(dead.headers[HEADER_ERROR]).startswith("PayloadError: body is not a valid Comment")


async def test_a_job_sent_again_in_a_later_batch_is_skipped(settings: Settings) -> None:
    """A publisher that resends unconfirmed jobs after a lost connection may group them
    into other batches: a job handled already is known by its publisher and sequence."""
    handled: list[Message] = []
    async with running_registry(settings), raw_key(settings, "k") as key:
        await key.batch((1, b"1"), (2, b"2"), (3, b"3"))
        await key.batch((3, b"3"), (4, b"4"))  # 3 again, regrouped
        await key.plain(2, b"2")  # and 2 again, alone
        await key.batch((4, b"4"), (5, b"5"))
        async with running_worker(settings, recording_app(handled)) as worker:
            await eventually(lambda: len(handled) == 5)
            await eventually(lambda: worker.duplicates_dropped == 3)
            assert [m.body for m in handled] == [b"1", b"2", b"3", b"4", b"5"]
            assert worker.order_violations == 0
        assert await key.messages_ready() == 0


async def test_a_batch_the_worker_cannot_read_is_dead_lettered_whole(settings: Settings) -> None:
    handled: list[Message] = []
    async with running_registry(settings), raw_key(settings, "k") as key:
        body, properties = encode_batch(
            key.ref,
            [Record(1, 1, b"1"), Record(2, 2, b"2")],
            publisher_id=PUBLISHER,
            delivery_mode=2,
            user_id=settings.amqp_user,
        )
        assert properties.headers is not None
        future = dict(properties.headers, **{HEADER_BATCH: 2})
        truncated = dict(properties.headers)
        await key.send(body, spec.Basic.Properties(headers=future, content_type=BATCH_CONTENT_TYPE))
        await key.send(
            body[:-1], spec.Basic.Properties(headers=truncated, content_type=BATCH_CONTENT_TYPE)
        )
        await key.plain(3, b"3")
        async with running_worker(settings, recording_app(handled)) as worker:
            await eventually(lambda: len(handled) == 1)
            await eventually(lambda: worker.dead_lettered == 2)
        assert [m.body for m in handled] == [b"3"]
        assert await key.messages_ready() == 0
    newer, broken = await dead_letters(settings)
    assert (newer.body, broken.body) == (body, body[:-1])  # as received
    assert newer.content_type == broken.content_type == BATCH_CONTENT_TYPE
    assert newer.headers[HEADER_BATCH] == 2 and broken.headers[HEADER_BATCH] == 1
    assert newer.headers[HEADER_JOBS] == broken.headers[HEADER_JOBS] == 2
    assert newer.headers[HEADER_KEY] == "k"
    assert str(newer.headers[HEADER_ERROR]).startswith("BatchFormatError: batch format version 2")
    assert str(broken.headers[HEADER_ERROR]).startswith("BatchFormatError: record 2 of 2")


async def close_connections(broker: Broker, vhost: str, name_prefix: str) -> None:
    """Close (as an operator would) the connections whose name starts with ``name_prefix``;
    the management API lists a connection once its first statistics are in (seconds)."""
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    closed = 0

    def close_them() -> bool:
        nonlocal closed
        for connection in broker.api(f"vhosts/{quoted_vhost}/connections"):
            name = connection.get("client_properties", {}).get("connection_name", "")
            if name.startswith(name_prefix):
                broker.api(
                    f"connections/{urllib.parse.quote(connection['name'], safe='')}", "DELETE"
                )
                closed += 1
        return closed > 0

    await eventually(close_them, timeout=20, interval=0.5)


async def test_a_batch_redelivered_to_the_same_worker_skips_the_jobs_it_handled(
    broker: Broker, session_vhost: str, settings: Settings
) -> None:
    """The worker's connection is closed mid-batch (by an operator, here through the
    management API): the broker requeues the batch, the worker reconnects and takes the key
    back, and it still knows the jobs it handled: only the interrupted one runs again."""
    seen: list[tuple[bytes, bool]] = []
    blocked = asyncio.Event()
    app = App()

    @app.handler()
    async def blocks_on_3_once(message: Message) -> None:
        seen.append((message.body, message.redelivered))
        if message.body == b"3" and not message.redelivered:
            blocked.set()
            await asyncio.Event().wait()  # until the session goes

    async with running_registry(settings), raw_key(settings, "k") as key:
        await key.batch(*((n, str(n).encode()) for n in range(1, 6)))
        async with running_worker(settings, app) as worker:
            await asyncio.wait_for(blocked.wait(), 10)
            await close_connections(
                broker, session_vhost, f"rabbitkeys {settings.namespace} worker "
            )
            await eventually(lambda: len(seen) == 6, timeout=30)
            assert seen == [
                (b"1", False),
                (b"2", False),
                (b"3", False),
                (b"3", True),  # interrupted: run again
                (b"4", True),
                (b"5", True),
            ]
            assert worker.duplicates_dropped == 2  # 1 and 2, handled before the loss
        assert await key.messages_ready() == 0


@pytest.mark.processes
@pytest.mark.slow
async def test_a_batch_of_a_killed_worker_is_run_again_in_order_by_the_next(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """SIGKILL mid-batch: the broker hands the whole batch to the next worker, which knows
    nothing of the jobs handled already; it runs them again (``redelivered``), then the
    rest, in order. Each job is handled at least once."""
    settings = make_settings(amqp_url, namespace)
    env = {
        "RK_DEMO_DIR": str(tmp_path),
        "RK_DEMO_SLOW_SECONDS": "0.2",
        "RABBITKEYS_LOG_LEVEL": "WARNING",
    }
    jobs = list(range(1, 11))
    async with LocalCluster(settings, extra_env=env) as cluster:
        await cluster.start_registry()
        first = await cluster.start_worker("rabbitkeys.tools.demo:app")
        await cluster.wait_for_workers(1)
        async with raw_key(settings, "slow-k") as key:
            await key.batch(*((n, str(n).encode()) for n in jobs))
            await eventually(lambda: len(read_records(tmp_path)) >= 3, timeout=30)
            first.send_signal(signal.SIGKILL)
            await first.wait()
            before = read_records(tmp_path)
            assert 3 <= len(before) < len(jobs)  # killed mid-batch
            await cluster.start_worker("rabbitkeys.tools.demo:app")
            await eventually(lambda: len(read_records(tmp_path)) == len(before) + len(jobs), 60)
            assert await key.messages_ready() == 0
    records = read_records(tmp_path)
    by_first = [r for r in records if r["pid"] == first.pid]
    by_next = [r for r in records if r["pid"] != first.pid]
    assert [r["seq"] for r in by_first] == jobs[: len(by_first)]
    assert not any(r["redelivered"] for r in by_first)
    assert [r["seq"] for r in by_next] == jobs  # the whole batch again, in order
    assert all(r["redelivered"] for r in by_next)
    assert sorted(r["started"] for r in by_next) == [r["started"] for r in by_next]

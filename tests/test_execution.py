"""Running one delivery: the verdict (new / copy / out of order) and the executor's handler
slots, retries and dedup, fed deliveries as the worker's runner would, without a broker; its
dead letters against the real broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.header import ContentHeader
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Settings
from rabbitkeys._batch import Record, encode_headers
from rabbitkeys._control import declare_control_topology
from rabbitkeys._dedup import SequenceHistory, Verdict
from rabbitkeys._envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_WORKER,
    encode,
    encode_batch,
)
from rabbitkeys._execution import Executor, verdict
from rabbitkeys._metrics import WorkerMetrics
from rabbitkeys._protocol import KeyAssignment
from rabbitkeys._topology import KeyRef, Names

from .support import eventually

# --- the verdict: pure --------------------------------------------------------------------


def test_a_delivery_without_origin_is_always_new() -> None:
    history = SequenceHistory()
    history.record("p", 1)
    assert verdict(history, None) is Verdict.NEW


@given(st.lists(st.tuples(st.sampled_from("pq"), st.integers(1, 40)), max_size=60))
def test_the_verdict_follows_what_was_handled_before(deliveries: list[tuple[str, int]]) -> None:
    """A copy of a handled message is a duplicate; above a publisher's highest is new; an
    unseen number below it is out of order (handled, never dropped)."""
    history, handled = SequenceHistory(), set[tuple[str, int]]()
    for origin in deliveries:
        highest = max((seq for pub, seq in handled if pub == origin[0]), default=0)
        expected = (
            Verdict.DUPLICATE
            if origin in handled
            else Verdict.NEW
            if origin[1] > highest
            else Verdict.OUT_OF_ORDER
        )
        assert verdict(history, origin) is expected
        if expected is not Verdict.DUPLICATE:
            history.record(*origin)
            handled.add(origin)


# --- the executor, fed by hand --------------------------------------------------------------


class _NoGauges:
    def gauge_values(self) -> dict[str, float]:
        return {}


def executor(app: App, stopping: asyncio.Event, **settings: Any) -> Executor:
    metrics = WorkerMetrics(_NoGauges(), CollectorRegistry())
    return Executor(app, Settings(**settings), metrics, stopping)


def assignment(key: str) -> KeyAssignment:
    ref = KeyRef.of(key)
    return KeyAssignment(
        key_id=ref.id, job_type=ref.job_type, key=key, queue=Names("ns").key_queue(ref)
    )


def delivery(key: str, body: bytes, sequence: int, publisher: str = "p") -> DeliveredMessage:
    properties = encode(KeyRef.of(key), publisher_id=publisher, sequence=sequence, delivery_mode=2)
    return DeliveredMessage(
        delivery=spec.Basic.Deliver("ctag", sequence, False, "", "q"),
        header=ContentHeader(0, len(body), properties),
        body=body,
        channel=None,  # type: ignore[arg-type]  # the executor never touches it
    )


def batch(
    key: str, jobs: list[tuple[int, bytes]], redelivered: bool = False, publisher: str = "p"
) -> DeliveredMessage:
    records = [Record(n, n, body, "text/plain", encode_headers({"n": n})) for n, body in jobs]
    body, properties = encode_batch(
        KeyRef.of(key), records, publisher_id=publisher, delivery_mode=2
    )
    return DeliveredMessage(
        delivery=spec.Basic.Deliver("ctag", jobs[0][0], redelivered, "", "q"),
        header=ContentHeader(0, len(body), properties),
        body=body,
        channel=None,  # type: ignore[arg-type]  # the executor never touches it
    )


async def test_the_jobs_of_a_batch_run_in_order_each_as_if_it_had_come_alone() -> None:
    seen: list[Message] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message)

    run, history, key = executor(app, asyncio.Event()), SequenceHistory(), assignment("k")
    assert await run.execute(key, history, delivery("k", b"1", 1))
    assert await run.execute(key, history, batch("k", [(2, b"2"), (3, b"3")], redelivered=True))
    assert [(m.body, m.sequence, m.redelivered) for m in seen] == [
        (b"1", 1, False),
        (b"2", 2, True),  # the delivery's flag, on each of its jobs
        (b"3", 3, True),
    ]
    assert seen[2].headers["n"] == 3 and seen[2].content_type == "text/plain"
    assert seen[2].key == "k" and seen[2].publisher_id == "p"


async def test_a_stop_in_a_retry_of_a_batch_leaves_it_unacked_and_its_handled_jobs_known() -> None:
    """Shutdown interrupts the retry wait of job 2: the delivery stays unacked. Run again
    on the same worker (its history still there), job 1 is a known copy and skipped."""
    stopping = asyncio.Event()
    calls: list[tuple[bytes, int]] = []
    app = App()

    @app.handler()
    async def fails_once_on_2(message: Message) -> None:
        calls.append((message.body, message.attempt))
        if message.body == b"2" and not message.redelivered:
            raise RuntimeError("busy")

    run = executor(app, stopping, retry_backoff=3600.0, retry_backoff_max=3600.0)
    history, key = SequenceHistory(), assignment("k")
    running = asyncio.create_task(run.execute(key, history, batch("k", [(1, b"1"), (2, b"2")])))
    await eventually(lambda: calls == [(b"1", 1), (b"2", 1)])
    stopping.set()
    assert await running is False
    stopping.clear()
    again = batch("k", [(1, b"1"), (2, b"2"), (3, b"3")], redelivered=True)
    assert await run.execute(key, history, again)
    assert calls[2:] == [(b"2", 1), (b"3", 1)] and run.duplicates_dropped == 1


async def test_a_retry_waiting_out_its_backoff_leaves_the_only_slot_to_other_keys() -> None:
    stopping = asyncio.Event()
    calls: list[tuple[str, int]] = []
    app = App()

    @app.handler()
    async def fails_on_a(message: Message) -> None:
        calls.append((message.key, message.attempt))
        if message.key == "a":
            raise RuntimeError("busy")

    run = executor(app, stopping, concurrency=1, retry_backoff=3600.0, retry_backoff_max=3600.0)
    first = run.execute(assignment("a"), SequenceHistory(), delivery("a", b"", 1))
    failing = asyncio.create_task(first)
    await eventually(lambda: calls == [("a", 1)])
    others = SequenceHistory()
    for n in (1, 2, 3):  # each gets the one slot while "a" waits for its retry
        assert await run.execute(assignment("b"), others, delivery("b", b"", n))
    assert calls == [("a", 1), ("b", 1), ("b", 1), ("b", 1)]
    assert not failing.done() and run.in_flight == 0
    stopping.set()  # a stop interrupts the wait: the delivery must stay unacked
    assert await failing is False
    assert calls[-1] == ("b", 1) and run.dead_lettered == 0


async def test_a_copy_is_dropped_an_old_message_is_handled_and_counted() -> None:
    seen: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message.body)

    run, history, key = executor(app, asyncio.Event()), SequenceHistory(), assignment("k")
    for body, sequence in ((b"5", 5), (b"5 again", 5), (b"3", 3), (b"6", 6)):
        assert await run.execute(key, history, delivery("k", body, sequence))
    assert seen == [b"5", b"3", b"6"]
    assert (run.duplicates_dropped, run.order_violations) == (1, 1)

    without_dedup = executor(app, asyncio.Event(), dedup=False)
    assert await without_dedup.execute(key, SequenceHistory(), delivery("k", b"x", 1))
    assert await without_dedup.execute(key, SequenceHistory(), delivery("k", b"x", 1))
    assert seen[-2:] == [b"x", b"x"] and without_dedup.duplicates_dropped == 0


async def test_retries_run_as_the_policy_says_and_each_attempt_is_numbered() -> None:
    attempts: list[int] = []
    app = App()

    @app.handler()
    async def flaky(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt < 3:
            raise RuntimeError("busy")

    run = executor(app, asyncio.Event(), max_retries=5, retry_backoff=0.0)
    assert await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"", 1))
    assert attempts == [1, 2, 3] and run.dead_lettered == 0


async def test_a_delivery_of_a_job_type_without_handler_is_dead_lettered_at_once(
    amqp_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No retry can add a handler: the first attempt dead-letters it, and says so."""
    app = App()

    @app.handler("comments")
    async def comment(message: Message) -> None:
        raise AssertionError("not this job type's handler")

    run = executor(app, asyncio.Event(), namespace=namespace, max_retries=5)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        # the registry's part
        await declare_control_topology(connection, channel, Names(namespace), "classic")
        queue = await channel.get_queue(Names(namespace).dead_letter_queue)
        run.begin(channel, "w-1", "guest")
        with caplog.at_level(logging.ERROR, "rabbitkeys.worker"):
            assert await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"b", 1))
        assert run.dead_lettered == 1
        dead = await queue.get(fail=False, no_ack=True)
        assert dead is not None and dead.body == b"b"
        assert dead.user_id == "guest"  # the broker checked who sent it
        assert dead.headers[HEADER_ATTEMPTS] == 1
        assert dead.headers[HEADER_KEY] == "k" and dead.headers[HEADER_WORKER] == "w-1"
        assert dead.headers[HEADER_ERROR] == (
            "HandlerNotFoundError: no handler for job type 'default'"
        )
        assert "key default/k: not retried, dead-lettering" in caplog.text
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()

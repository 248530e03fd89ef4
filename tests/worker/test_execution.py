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
from pydantic import BaseModel

from rabbitkeys import App, Message, Settings
from rabbitkeys._broker.control import declare_control_topology
from rabbitkeys._observe.metrics import WorkerMetrics
from rabbitkeys._wire.batch import Record, encode_headers
from rabbitkeys._wire.envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_REDRIVE,
    HEADER_WORKER,
    encode_batch,
    encode_envelope,
)
from rabbitkeys._wire.protocol import KeyAssignment, KeyFailure
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys._worker.dedup import SequenceHistory, Verdict
from rabbitkeys._worker.execution import Executor, Outcome, Park, verdict

from ..support import eventually

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


def delivery(
    key: str,
    body: bytes,
    sequence: int,
    publisher: str = "p",
    extra_headers: dict[str, Any] | None = None,
) -> DeliveredMessage:
    """A plain message as the broker delivers it; ``extra_headers``: rabbitkeys' own ones a
    publisher does not set (a redrive's)."""
    properties = encode_envelope(
        KeyRef.of(key), publisher_id=publisher, sequence=sequence, delivery_mode=2
    )
    if extra_headers:
        properties.headers = {**(properties.headers or {}), **extra_headers}
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
    assert await run.execute(key, history, delivery("k", b"1", 1)) is Outcome.DONE
    assert (
        await run.execute(key, history, batch("k", [(2, b"2"), (3, b"3")], redelivered=True))
        is Outcome.DONE
    )
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
    assert await running is Outcome.INTERRUPTED
    stopping.clear()
    again = batch("k", [(1, b"1"), (2, b"2"), (3, b"3")], redelivered=True)
    assert await run.execute(key, history, again) is Outcome.DONE
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
        assert await run.execute(assignment("b"), others, delivery("b", b"", n)) is Outcome.DONE
    assert calls == [("a", 1), ("b", 1), ("b", 1), ("b", 1)]
    assert not failing.done() and run.in_flight == 0
    stopping.set()  # a stop interrupts the wait: the delivery must stay unacked
    assert await failing is Outcome.INTERRUPTED
    assert calls[-1] == ("b", 1) and run.dead_lettered == 0


async def test_a_copy_is_dropped_an_old_message_is_handled_and_counted() -> None:
    seen: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message.body)

    run, history, key = executor(app, asyncio.Event()), SequenceHistory(), assignment("k")
    for body, sequence in ((b"5", 5), (b"5 again", 5), (b"3", 3), (b"6", 6)):
        assert await run.execute(key, history, delivery("k", body, sequence)) is Outcome.DONE
    assert seen == [b"5", b"3", b"6"]
    assert (run.duplicates_dropped, run.order_violations) == (1, 1)

    without_dedup = executor(app, asyncio.Event(), dedup=False)
    assert (
        await without_dedup.execute(key, SequenceHistory(), delivery("k", b"x", 1)) is Outcome.DONE
    )
    assert (
        await without_dedup.execute(key, SequenceHistory(), delivery("k", b"x", 1)) is Outcome.DONE
    )
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
    assert (
        await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"", 1)) is Outcome.DONE
    )
    assert attempts == [1, 2, 3] and run.dead_lettered == 0


async def test_a_delivery_of_a_job_type_without_handler_is_dead_lettered_at_once(
    amqp_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No retry can add a handler: the first attempt dead-letters it, and says so; also
    where another job type parks (no route of its own says park)."""
    app = App()

    @app.handler("comments", on_failure="park")
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
            assert (
                await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"b", 1))
                is Outcome.DONE
            )
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


# --- park, failing keys, redriven jobs: fed by hand ------------------------------------------


class Comment(BaseModel):
    text: str


def parking_app(fails_on: bytes, seen: list[tuple[bytes, int]]) -> App:
    """A ``park`` job type whose handler fails, always, on the body ``fails_on``."""
    app = App()

    @app.handler(on_failure="park")
    async def picky(message: Message) -> None:
        seen.append((message.body, message.attempt))
        if message.body == fails_on:
            raise ValueError(f"cannot take {message.body.decode()}")

    return app


async def test_a_park_job_type_after_its_last_attempt_parks_instead_of_dead_lettering() -> None:
    """No dead-letter copy (the executor has no channel to make one: it would fail), the job
    not recorded as handled, the error as ``Type: text``."""
    seen: list[tuple[bytes, int]] = []
    run = executor(parking_app(b"bad", seen), asyncio.Event(), max_retries=2, retry_backoff=0.0)
    history, key = SequenceHistory(), assignment("k")
    assert await run.execute(key, history, delivery("k", b"ok", 1)) is Outcome.DONE
    outcome = await run.execute(key, history, delivery("k", b"bad", 2))
    assert outcome == Park(error="ValueError: cannot take bad", attempts=3, job_index=0)
    assert seen == [(b"ok", 1), (b"bad", 1), (b"bad", 2), (b"bad", 3)]
    assert run.dead_lettered == 0 and run.failing == {}
    assert history.check("p", 1) is Verdict.DUPLICATE  # handled: recorded
    assert history.check("p", 2) is Verdict.NEW  # parked: not handled, not recorded


async def test_a_batch_parked_at_job_1_of_3_has_job_0_handled_and_job_2_never_run() -> None:
    seen: list[tuple[bytes, int]] = []
    run = executor(parking_app(b"2", seen), asyncio.Event(), max_retries=1, retry_backoff=0.0)
    history, key = SequenceHistory(), assignment("k")
    outcome = await run.execute(key, history, batch("k", [(1, b"1"), (2, b"2"), (3, b"3")]))
    assert outcome == Park(error="ValueError: cannot take 2", attempts=2, job_index=1)
    assert seen == [(b"1", 1), (b"2", 1), (b"2", 2)]
    assert [history.check("p", n) for n in (1, 2, 3)] == [
        Verdict.DUPLICATE,
        Verdict.NEW,
        Verdict.NEW,
    ]
    # the same batch back (put back by the park, taken again by this worker): job 0 is a
    # known copy, the run starts at the failed job
    seen.clear()
    again = batch("k", [(1, b"1"), (2, b"2"), (3, b"3")], redelivered=True)
    assert await run.execute(key, history, again) == Park("ValueError: cannot take 2", 2, 1)
    assert seen == [(b"2", 1), (b"2", 2)] and run.duplicates_dropped == 1


async def test_the_error_of_a_park_is_cut_to_1000_characters() -> None:
    app = App()

    @app.handler(on_failure="park")
    async def loud(message: Message) -> None:
        raise RuntimeError("x" * 5000)

    run = executor(app, asyncio.Event(), max_retries=0)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"", 1))
    assert isinstance(outcome, Park) and outcome.attempts == 1
    assert outcome.error == ("RuntimeError: " + "x" * 5000)[:1000] and len(outcome.error) == 1000


async def test_a_body_a_park_handler_cannot_read_parks_its_key_at_once() -> None:
    """A payload error is not retried (no retry changes the body); under ``park`` the key
    stops there, like after any last attempt."""
    app = App()

    @app.handler(on_failure="park")
    async def typed(message: Message[Comment]) -> None:
        raise AssertionError("never called: the body is not a Comment")

    run = executor(app, asyncio.Event(), max_retries=5)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"{}", 1))
    assert isinstance(outcome, Park) and (outcome.attempts, outcome.job_index) == (1, 0)
    assert outcome.error.startswith("PayloadError: body is not a valid Comment")


async def test_a_key_is_failing_from_its_first_failure_until_its_job_ends() -> None:
    """Listed with the attempts so far and the last error while it waits for its next
    attempt; gone once the job is handled, and gone if a stop interrupts the wait."""
    stopping, gate = asyncio.Event(), asyncio.Event()
    attempts: list[int] = []
    app = App()

    @app.handler(on_failure="park")
    async def flaky(message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt < 3:
            raise ConnectionError(f"attempt {message.attempt}")
        await gate.wait()

    run = executor(app, stopping, max_retries=5, retry_backoff=0.05, retry_backoff_max=0.05)
    key = assignment("k")
    running = asyncio.create_task(run.execute(key, SequenceHistory(), delivery("k", b"", 1)))
    await eventually(lambda: attempts == [1, 2, 3])
    assert run.failing == {
        key.key_id: KeyFailure(key_id=key.key_id, attempts=2, error="ConnectionError: attempt 2")
    }
    gate.set()
    assert await running is Outcome.DONE and run.failing == {}

    slow = executor(app, stopping, max_retries=5, retry_backoff=3600.0, retry_backoff_max=3600.0)
    attempts.clear()
    running = asyncio.create_task(slow.execute(key, SequenceHistory(), delivery("k", b"", 1)))
    await eventually(lambda: key.key_id in slow.failing)
    assert slow.failing[key.key_id].attempts == 1
    stopping.set()
    assert await running is Outcome.INTERRUPTED and slow.failing == {}


async def test_a_parked_or_dead_lettered_job_is_no_longer_failing() -> None:
    seen: list[tuple[bytes, int]] = []
    run = executor(parking_app(b"bad", seen), asyncio.Event(), max_retries=1, retry_backoff=0.0)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"bad", 1))
    assert isinstance(outcome, Park) and run.failing == {}


async def test_a_redriven_job_runs_as_new_and_is_not_recorded() -> None:
    """Its publisher and sequence were recorded when it failed: without the redrive header
    it would be dropped as a copy. It is not recorded either, so the history stays what the
    publisher's own messages made it."""
    seen: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message.body)

    run, history, key = executor(app, asyncio.Event()), SequenceHistory(), assignment("k")
    redriven = {HEADER_REDRIVE: "r-1"}
    assert await run.execute(key, history, delivery("k", b"1", 1)) is Outcome.DONE
    assert await run.execute(key, history, delivery("k", b"1 again", 1)) is Outcome.DONE
    assert await run.execute(key, history, delivery("k", b"1 redriven", 1, extra_headers=redriven))
    assert await run.execute(key, history, delivery("k", b"7 redriven", 7, extra_headers=redriven))
    assert seen == [b"1", b"1 redriven", b"7 redriven"]
    assert run.duplicates_dropped == 1 and run.order_violations == 0
    assert history.check("p", 7) is Verdict.NEW  # not recorded

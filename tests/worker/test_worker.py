"""Worker behaviour against the real broker: retries, dead letters, moves between workers."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys._wire.envelope import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_KEY
from rabbitkeys._wire.topology import KeyRef, Names

from ..support import Handlings, eventually, make_settings, running_registry, running_worker


async def dead_letters(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Names(settings.namespace).dead_letter_queue, durable=True
        )
        found = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(message)
        return found
    finally:
        await connection.close()


async def test_a_failing_handler_is_retried_while_later_messages_of_its_key_wait(
    settings: Settings,
) -> None:
    calls: list[tuple[int, int]] = []
    app = App()

    @app.handler()
    async def flaky(message: Message) -> None:
        calls.append((int(message.body), message.attempt))
        if int(message.body) == 2 and message.attempt < 3:
            raise RuntimeError("database busy")

    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            await asyncio.gather(*(publisher.publish("k", str(n).encode()) for n in (1, 2, 3)))
        await eventually(lambda: len(calls) == 5)
    assert calls == [(1, 1), (2, 1), (2, 2), (2, 3), (3, 1)]
    assert await dead_letters(settings) == []


async def test_after_the_last_attempt_the_message_is_dead_lettered_and_the_key_moves_on(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=2)
    handled: list[bytes] = []
    app = App()

    @app.handler()
    async def picky(message: Message) -> None:
        if message.body == b"poison":
            raise ValueError("cannot parse comment")
        handled.append(message.body)

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with Publisher(settings) as publisher:
            for body in (b"a", b"poison", b"b"):
                await publisher.publish("post-9", body)
        await eventually(lambda: len(handled) == 2)
        await eventually(lambda: worker.dead_lettered == 1)
    assert handled == [b"a", b"b"]
    [dead] = await dead_letters(settings)
    assert dead.body == b"poison"
    assert dead.headers[HEADER_KEY] == "post-9"
    assert dead.headers[HEADER_ATTEMPTS] == 3
    assert dead.headers[HEADER_ERROR] == "ValueError: cannot parse comment"


async def test_keys_of_a_job_type_without_worker_wait_until_one_serves_it(
    settings: Settings,
) -> None:
    handled: list[str] = []
    comments = App()

    @comments.handler("comments")
    async def comment(message: Message) -> None:
        handled.append(message.body.decode())

    others = App()
    wrongly_handled: list[Message] = []

    @others.handler("emails")
    async def email(message: Message) -> None:
        wrongly_handled.append(message)  # an emails worker must never get comments

    async with running_registry(settings) as registry, running_worker(settings, others):
        await eventually(lambda: len(registry._book.workers) == 1)
        async with Publisher(settings) as publisher:
            for n in range(5):
                await publisher.publish("post-1", str(n).encode(), job_type="comments")
        # the registry knows the key and has placed it nowhere: no worker serves comments
        [key] = registry._book.keys.values()
        assert key.ref.job_type == "comments" and key.owner is None
        async with running_worker(settings, comments):
            await eventually(lambda: len(handled) == 5)
            assert key.owner is not None
    assert handled == ["0", "1", "2", "3", "4"]
    assert wrongly_handled == []


@pytest.mark.parametrize("change", ["join", "leave"])
async def test_keys_move_between_workers_without_duplicates_or_reordering(
    settings: Settings, change: str
) -> None:
    """A worker joins (keys move to it) or leaves gracefully (its keys move away) while
    messages flow: every message is handled once, each key in order, and one at a time:
    no two handlings of a key overlap in time, also across the move."""
    handlings = Handlings()
    by_worker: Counter[str] = Counter()

    def app_for(worker_name: str) -> App:
        app = App()

        @app.handler()
        async def record(message: Message) -> None:
            with handlings.handling(message.key, int(message.body)):
                await asyncio.sleep(0.005)  # long enough for a move to meet a running handler
            by_worker[worker_name] += 1

        return app

    keys = [f"k{i}" for i in range(40)]
    rounds = 0
    stop = asyncio.Event()
    async with running_registry(settings) as registry:
        async with running_worker(settings, app_for("a")):
            async with Publisher(settings) as publisher:

                async def publish_until_stopped() -> None:
                    nonlocal rounds
                    while not stop.is_set():
                        await asyncio.gather(
                            *(publisher.publish(k, str(rounds).encode()) for k in keys)
                        )
                        rounds += 1
                        await asyncio.sleep(0.02)

                if change == "join":
                    publishing = asyncio.create_task(publish_until_stopped())
                    await eventually(lambda: by_worker["a"] > 0)
                    async with running_worker(settings, app_for("b")):
                        # keys moved to b while messages flowed
                        await eventually(lambda: by_worker["b"] >= 100, timeout=30)
                        stop.set()
                        await publishing
                        await eventually(lambda: handlings.total() == rounds * len(keys))
                else:
                    async with running_worker(settings, app_for("b")):
                        await eventually(lambda: len(registry._book.workers) == 2)
                        publishing = asyncio.create_task(publish_until_stopped())
                        await eventually(lambda: by_worker["b"] >= 100, timeout=30)
                    # b has left; its keys moved to a while messages flowed
                    handled_by_a = by_worker["a"]
                    await eventually(lambda: by_worker["a"] >= handled_by_a + 100, timeout=30)
                    stop.set()
                    await publishing
                    await eventually(lambda: handlings.total() == rounds * len(keys))
    assert by_worker["a"] > 0 and by_worker["b"] > 0
    for key in keys:
        assert handlings.values[key] == list(range(rounds)), key
    assert handlings.overlaps() == []


async def test_an_exact_copy_of_a_handled_message_is_dropped_and_counted(
    settings: Settings,
) -> None:
    """A publisher that lost its connection sends unconfirmed messages again; the broker may
    have had them. The copy (same publisher id and sequence number) is not handled twice."""
    handled: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(message.body)

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with Publisher(settings) as publisher:
            await publisher.publish("k", b"first")
            await eventually(lambda: handled == [b"first"])
            # the copy, as a resend would put it in the key's queue (from the same user)
            connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"first",
                    headers={
                        "x-rabbitkeys-key": "k",
                        "x-rabbitkeys-publisher": publisher.publisher_id,
                        "x-rabbitkeys-seq": 1,
                    },
                    user_id=settings.amqp_user,
                ),
                routing_key=Names(settings.namespace).key_queue(KeyRef.of("k")),
            )
            await connection.close()
            await publisher.publish("k", b"second")
        await eventually(lambda: handled == [b"first", b"second"])
        await eventually(lambda: worker.duplicates_dropped == 1)
    assert worker.order_violations == 0


async def test_a_message_published_around_rabbitkeys_is_handled_under_its_queues_key(
    amqp_url: str, namespace: str
) -> None:
    """Anyone who can publish into a key queue can put anything there. A message without
    rabbitkeys' headers, or with garbled ones, crashes nothing and is no duplicate: it is
    handled under the key of its queue, and dead-lettered with an empty key header."""
    settings = make_settings(amqp_url, namespace, max_retries=0)
    seen: list[Message] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message)
        if message.body == b"fails":
            raise ValueError("not a job")

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with Publisher(settings) as publisher:
            await publisher.publish("k", b"routed")  # the key's queue exists and is consumed
            await eventually(lambda: len(seen) == 1)
            connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
            channel = await connection.channel()  # confirmed: queued before "after" below
            garbled = {
                "x-rabbitkeys-key": 42,
                "x-rabbitkeys-publisher": "",
                "x-rabbitkeys-seq": "7",
                "x-rabbitkeys-published-at": 1.5,
                "tenant": "t1",
            }
            for message in (
                aio_pika.Message(b"bare"),
                aio_pika.Message(b"garbled", headers=garbled),
                aio_pika.Message(b"fails"),
            ):
                await channel.default_exchange.publish(
                    message, routing_key=Names(settings.namespace).key_queue(KeyRef.of("k"))
                )
            await connection.close()
            await publisher.publish("k", b"after")
        await eventually(lambda: len(seen) == 5)
        await eventually(lambda: worker.dead_lettered == 1)
    assert [m.body for m in seen] == [b"routed", b"bare", b"garbled", b"fails", b"after"]
    for message in seen[1:4]:
        assert message.key == "k"
        assert not message.publisher_id and message.sequence is None
    assert seen[2].headers["tenant"] == "t1"
    assert (worker.duplicates_dropped, worker.order_violations) == (0, 0)
    [dead] = await dead_letters(settings)
    assert dead.body == b"fails"
    assert dead.headers[HEADER_KEY] == ""
    assert dead.headers[HEADER_ATTEMPTS] == 1
    assert dead.headers[HEADER_ERROR] == "ValueError: not a job"


async def test_a_worker_with_other_queue_settings_still_consumes_its_keys(
    amqp_url: str, namespace: str
) -> None:
    """During a rolling configuration change the worker's declare is refused
    (PRECONDITION_FAILED): it consumes the queue as it is instead of giving the key back
    (which would loop between registry and worker without ever consuming)."""
    registry_settings = make_settings(amqp_url, namespace, key_queue_expires=120.0)
    worker_settings = make_settings(amqp_url, namespace, key_queue_expires=60.0)
    handled: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(message.body)

    async with running_registry(registry_settings), running_worker(worker_settings, app):
        async with Publisher(registry_settings) as publisher:
            await publisher.publish("k", b"one")
            await publisher.publish("k", b"two")
        await eventually(lambda: handled == [b"one", b"two"])


async def test_a_retry_waiting_out_its_backoff_holds_no_handler_slot(
    amqp_url: str, namespace: str
) -> None:
    """One handler slot. Key "failing" fails and waits a minute for its retry; meanwhile the
    other key's messages take the slot and are handled, while the failing key's later
    message waits behind it (order per key). Stopped mid-wait, the worker hands the failing
    message back, and the next worker handles both of that key's messages, in order."""
    settings = make_settings(
        amqp_url, namespace, concurrency=1, retry_backoff=60.0, retry_backoff_max=60.0
    )
    calls: list[tuple[str, bytes, int]] = []
    app = App()

    @app.handler()
    async def fails_first_time_round(message: Message) -> None:
        calls.append((message.key, message.body, message.attempt))
        if message.key == "failing":
            raise RuntimeError("database busy")

    async with running_registry(settings):
        async with running_worker(settings, app) as worker, Publisher(settings) as publisher:
            await publisher.publish("failing", b"1")
            await publisher.publish("failing", b"2")
            await eventually(lambda: calls == [("failing", b"1", 1)])
            # the retry now waits its minute: the slot is free for the other key
            for n in (1, 2, 3):
                await publisher.publish("other", str(n).encode())
            await eventually(lambda: len(calls) == 4, timeout=30)
            assert calls[1:] == [("other", b"1", 1), ("other", b"2", 1), ("other", b"3", 1)]
            assert worker.gauge_values()["rabbitkeys_in_flight_messages"] == 0
        # stopped mid-wait: the failing key's messages went back to its queue, in order
        assert [call for call in calls if call[0] == "failing"] == [("failing", b"1", 1)]

        handled: list[bytes] = []
        recovered = App()

        @recovered.handler()
        async def record(message: Message) -> None:
            handled.append(message.body)

        async with running_worker(settings, recovered):
            await eventually(lambda: handled == [b"1", b"2"], timeout=30)
    assert await dead_letters(settings) == []


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("change", ["join", "leave"])
async def test_keys_deeper_than_the_prefetch_move_in_order(
    amqp_url: str, namespace: str, queue_type: str, change: str
) -> None:
    """30 messages a key, a worker holding 4 (its prefetch), a slow-ish handler: a second
    worker joins (keys move to it: a Release), or leaves (its drain on stop), while the
    keys' queues still hold most of their messages. Every message is handled once, each
    key in order, one at a time. On a quorum queue a reject after the cancel would put the
    held ones at the queue's back: the worker closes the key's own channel instead."""
    settings = make_settings(amqp_url, namespace, queue_type=queue_type, durable=True)
    handlings = Handlings()
    workers_of: dict[str, set[str]] = {}
    by_worker: Counter[str] = Counter()

    def app_for(worker_name: str) -> App:
        app = App()

        @app.handler()
        async def record(message: Message) -> None:
            with handlings.handling(message.key, int(message.body)):
                await asyncio.sleep(0.03)
            workers_of.setdefault(message.key, set()).add(worker_name)
            by_worker[worker_name] += 1

        return app

    keys = [f"k{i}" for i in range(6)]
    depth = 30

    async def publish_all() -> None:
        async with Publisher(settings) as publisher:
            for n in range(depth):
                await asyncio.gather(*(publisher.publish(k, str(n).encode()) for k in keys))

    async with running_registry(settings) as registry, running_worker(settings, app_for("a")):
        if change == "join":
            await publish_all()
            # every key started on a (not a count of jobs: a few keys' jobs could make it
            # while the others, asked of the registry together, start a moment later)
            await eventually(lambda: all(key in workers_of for key in keys))
            async with running_worker(settings, app_for("b")):
                await eventually(lambda: handlings.total() == depth * len(keys), timeout=30)
        else:
            async with running_worker(settings, app_for("b")):
                await eventually(lambda: len(registry._book.workers) == 2)
                await publish_all()
                await eventually(lambda: by_worker["b"] >= 2)
            # b drained and left: its keys moved to a, deep
            await eventually(lambda: handlings.total() == depth * len(keys), timeout=30)
    for key in keys:
        assert handlings.values[key] == list(range(depth)), key
    assert handlings.overlaps() == []
    assert any(len(workers) == 2 for workers in workers_of.values()), workers_of

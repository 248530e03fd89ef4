"""The new-key path at speed: the registry's commands to a worker are merged while one is in
flight (pure, first), a burst of new keys is consumed with no check of their just-declared
queues, a key adopted after a failover is still checked, and batched ``Assign``s round-trip
through a worker's inbox (an oversized or ill-typed one refused)."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher, Settings, Worker
from rabbitkeys._broker.amqp import ChannelPool
from rabbitkeys._registry.runner import merge_commands, split_command
from rabbitkeys._wire.protocol import (
    MAX_KEYS_PER_MESSAGE,
    Assign,
    KeyAssignment,
    Release,
    Sync,
    decode_control,
)
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments

from ..support import eventually, running_registry, running_worker

# --- a worker's outbox (no broker) ---------------------------------------------------------


def key_assignment(namespace: str, key: str, *, fresh: bool = False) -> KeyAssignment:
    ref = KeyRef.of(key)
    return KeyAssignment(
        key_id=ref.id,
        job_type=ref.job_type,
        key=key,
        queue=Names(namespace).key_queue(ref),
        routing_key=f"{ref.token}|0123456789abcdef",
        fresh=fresh,
    )


def test_commands_queued_for_a_worker_merge_only_with_their_own_kind_and_keep_order() -> None:
    a, b, c = (key_assignment("ns", k) for k in "abc")
    outbox: list[Assign | Release | Sync] = []
    for command in (
        Assign(keys=[a]),
        Assign(keys=[b]),
        Release(key_ids=[a.key_id]),
        Release(key_ids=[b.key_id]),
        Assign(keys=[a, c]),
        Sync(),
        Sync(),
        Assign(keys=[b]),
    ):
        merge_commands(outbox, command)
    # a Release never overtakes the Assign of its key, nor an Assign the Release before it
    assert outbox == [
        Assign(keys=[a, b]),
        Release(key_ids=[a.key_id, b.key_id]),
        Assign(keys=[a, c]),
        Sync(),
        Assign(keys=[b]),
    ]


def test_a_merged_command_is_sent_in_messages_within_the_protocols_bounds() -> None:
    keys = [key_assignment("ns", f"k{i}", fresh=i % 2 == 0) for i in range(10_000)]
    outbox: list[Assign | Release | Sync] = []
    for chunk in (keys[i : i + 7] for i in range(0, len(keys), 7)):
        merge_commands(outbox, Assign.model_construct(keys=chunk))
    [merged] = outbox
    messages = split_command(merged)
    assert len(messages) == 3
    sent = [decode_control(message.model_dump_json().encode()) for message in messages]
    assert [k for m in sent if isinstance(m, Assign) for k in m.keys] == keys  # fresh kept


# --- against the broker ----------------------------------------------------------------------


class AssignSpy:
    """Counts the Assign commands a worker receives and the keys in them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = Worker._run_command

        async def run_command(worker: Worker, command: Any) -> None:
            if isinstance(command, Assign):
                self.sizes.append(len(command.keys))
            await original(worker, command)

        monkeypatch.setattr(Worker, "_run_command", run_command)


async def test_a_burst_of_new_keys_is_consumed_unchecked_in_few_commands_each_message_once_in_order(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 300 new keys at once wait behind each other's declares: on a loaded broker that is
    # more than the tests' usual 10 s; this test is about what happens, not how fast
    settings = settings.model_copy(update={"ensure_timeout": 120.0, "publish_timeout": 120.0})
    spy = AssignSpy(monkeypatch)
    handled: dict[str, list[int]] = collections.defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    keys = [f"burst-{i}" for i in range(300)]
    async with (
        running_registry(settings) as registry,
        running_worker(settings, app) as one,
        running_worker(settings, app) as two,
        Publisher(settings) as publisher,
    ):
        # both joined before the burst: no key moves (a moved key is checked by its target)
        await eventually(lambda: len(registry._book.workers) == 2)
        moved_before = registry.metrics.keys_moved._value.get()
        # every key new, three messages each, all 900 publishes at once
        await asyncio.gather(
            *(publisher.publish(key, str(n).encode()) for n in range(3) for key in keys)
        )
        await eventually(lambda: sum(map(len, handled.values())) >= 900, timeout=120)
        await asyncio.sleep(0.3)  # nothing more comes
        assert {key: handled[key] for key in keys} == {key: [0, 1, 2] for key in keys}
        workers = (one, two)
        assert sum(len(w.owned_keys) for w in workers) == 300
        # the registry had just declared each queue: no worker checked one on its first
        # assignment; a key a rebalance moved during the burst is checked by its target
        moved = registry.metrics.keys_moved._value.get() - moved_before
        assert sum(w.checks_skipped for w in workers) == 300
        assert sum(w.queues_checked for w in workers) == moved
        # while one command to a worker was in flight, the next keys' Assigns merged (a
        # moved key is assigned once more, to its target)
        assert sum(spy.sizes) == 300 + moved and len(spy.sizes) < 300, spy.sizes


async def test_a_key_adopted_after_a_registry_failover_is_checked_before_it_is_consumed(
    settings: Settings,
) -> None:
    handled: list[tuple[str, bytes]] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append((message.key, message.body))

    async with Publisher(settings) as publisher:
        async with running_registry(settings) as first:
            # no worker yet: the key is declared and waits unowned with its message
            await publisher.publish("adopted", b"1")
            assert first.gauge_values()["rabbitkeys_unassigned_keys"] == 1
        async with running_registry(settings) as second:
            # the new leader learns the key from the broker's listing, not from a declare
            await eventually(lambda: KeyRef.of("adopted").id in second._book.keys, timeout=20)
            async with running_worker(settings, app) as worker:
                await eventually(lambda: handled == [("adopted", b"1")], timeout=20)
                assert worker.queues_checked == 1 and worker.checks_skipped == 0
                await publisher.publish("adopted", b"2")
                await publisher.publish("brand new", b"3")
                await eventually(lambda: len(handled) == 3)
                assert handled[1:] == [("adopted", b"2"), ("brand new", b"3")]
                assert worker.queues_checked == 1 and worker.checks_skipped == 1


async def test_batched_assigns_round_trip_and_an_oversized_or_ill_typed_one_is_refused(
    settings: Settings,
) -> None:
    names = Names(settings.namespace)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        pass

    keys = [key_assignment(settings.namespace, f"batch-{i}") for i in range(200)]
    async with running_registry(settings), running_worker(settings, app) as worker:
        await eventually(lambda: worker.ready)
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel()
            for assignment in keys:  # as the registry declares them
                await channel.declare_queue(
                    assignment.queue,
                    durable=settings.durable,
                    arguments=key_queue_arguments(settings.key_queue_expires),
                )
            commands = await channel.get_exchange(names.commands_exchange)
            route = names.worker_route(worker.worker_id, worker._secret)

            async def send(payload: bytes) -> None:
                await commands.publish(aio_pika.Message(payload, user_id="guest"), route)

            # one command with 200 keys, not fresh: each queue checked, then consumed
            await send(Assign(keys=keys).model_dump_json().encode())
            await eventually(lambda: len(worker.owned_keys) == 200, timeout=30)
            assert worker.queues_checked == 200 and worker.checks_skipped == 0
            # refused whole, counted once each; the worker keeps its keys
            one_too_many = [key_assignment(settings.namespace, "x").model_dump()] * (
                MAX_KEYS_PER_MESSAGE + 1
            )
            ill_typed = key_assignment(settings.namespace, "y").model_dump() | {"fresh": "yes"}
            for payload in (
                {"type": "assign", "keys": one_too_many},
                {"type": "assign", "keys": [ill_typed]},
            ):
                await send(json.dumps(payload).encode())
            await eventually(lambda: worker.malformed_messages == 2)
            assert len(worker.owned_keys) == 200 and worker.ready

            # the broker agrees: each queue has its one consumer (a key counts as owned from
            # its consume on, so the last consume-oks may still be on their way)
            async def consumers() -> list[int]:
                counts = []
                for assignment in keys:
                    queue = await channel.declare_queue(assignment.queue, passive=True)
                    counts.append(queue.declaration_result.consumer_count or 0)
                return counts

            for _ in range(100):
                counts = await consumers()
                if counts == [1] * len(keys):
                    break
                await asyncio.sleep(0.1)
            assert counts == [1] * len(keys)
        finally:
            await connection.close()


async def test_a_burst_of_calls_on_an_empty_channel_pool_opens_one_channel_per_slot(
    settings: Settings,
) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        pool = ChannelPool(connection, size=4)
        channels = await asyncio.gather(*(pool.get() for _ in range(100)))
        assert len({id(channel) for channel in channels}) == 4
        # and no other channel was opened on the connection (each call opened its own)
        assert len(connection.transport.connection.channels) == 4
    finally:
        await connection.close()

"""Idle keys are retired by the registry with nothing lost, and revive on the next publish."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import aio_pika
import aiormq
import pytest

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys._registry.keybook import RETIRING
from rabbitkeys._wire.topology import KeyRef, Names

from ..support import Handlings, eventually, make_settings, running_registry, running_worker


async def queue_exists(settings: Settings, name: str) -> bool:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()


@pytest.fixture
def idle_settings(amqp_url: str, namespace: str) -> Settings:
    return make_settings(amqp_url, namespace, idle_period=0.4, retire_grace=0.1)


async def test_idle_key_is_retired_and_revived_by_a_later_publish(
    idle_settings: Settings,
) -> None:
    settings = idle_settings
    seen: list[int] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(int(message.body))

    queue = Names(settings.namespace).key_queue(KeyRef.of("post-1"))
    async with running_registry(settings) as registry, running_worker(settings, app):
        async with Publisher(settings) as publisher:
            for n in range(1, 6):
                await publisher.publish("post-1", str(n).encode())
            await eventually(lambda: len(seen) == 5)
            await eventually(lambda: not registry._book.keys, timeout=10)
            assert not await queue_exists(settings, queue)
            # The publisher still holds the old routing key: the message comes back, the
            # key is ensured again, and the message is routed in its place.
            await asyncio.gather(
                *(publisher.publish("post-1", str(n).encode()) for n in range(6, 11))
            )
            await eventually(lambda: len(seen) == 10)
            assert await queue_exists(settings, queue)
    assert seen == list(range(1, 11))


async def test_publishing_across_retirements_loses_and_reorders_nothing(
    idle_settings: Settings,
) -> None:
    """Bursts separated by pauses around the idle period, so retirements race publishes."""
    settings = idle_settings
    seen: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen[message.key].append(int(message.body))

    rng = random.Random(7)
    keys = [f"k{i}" for i in range(20)]
    counters = dict.fromkeys(keys, 0)
    async with running_registry(settings) as registry, running_worker(settings, app):
        async with Publisher(settings) as publisher:

            async def burst_then_pause(key: str) -> None:
                for _ in range(6):
                    for _ in range(rng.randint(1, 5)):
                        counters[key] += 1
                        await publisher.publish(key, str(counters[key]).encode())
                    await asyncio.sleep(rng.uniform(0.3, 0.9))

            await asyncio.gather(*(burst_then_pause(key) for key in keys))
        total = sum(counters.values())
        await eventually(lambda: sum(map(len, seen.values())) >= total, timeout=20)
    assert registry.keys_retired >= len(keys)  # the pauses did let keys retire
    assert publisher.returned_messages > 0  # and publishes met retired keys
    for key in keys:
        assert seen[key] == list(range(1, counters[key] + 1)), key


async def test_bursts_across_retirements_keep_the_fence_every_message_once_in_order(
    amqp_url: str, namespace: str
) -> None:
    """The routing-key fence with many messages in flight per key: bursts (``gather`` of
    many publishes per key, several keys) meet retired keys (stale routing keys: all come
    back) and keys in the middle of their retirement (unbound, the registry holding the
    lock). Every message is handled once, in call order, one at a time per key."""
    # a long grace keeps each retirement open long enough for a burst to arrive in it
    settings = make_settings(amqp_url, namespace, idle_period=0.4, retire_grace=0.5)
    handlings = Handlings()
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        with handlings.handling(message.key, int(message.body)):
            await asyncio.sleep(0.001)

    keys = [f"k{i}" for i in range(6)]
    during, after = keys[:3], keys[3:]  # bursts while retiring / once retired
    counters = dict.fromkeys(keys, 0)
    burst = 25
    async with running_registry(settings) as registry, running_worker(settings, app):

        def state(key: str) -> Any:
            return next((k for k in registry._book.keys.values() if k.ref.key == key), None)

        def retiring(key: str) -> bool:
            found = state(key)
            return found is not None and found.state in RETIRING and not found.routing_keys

        async def send_burst(publisher: Publisher, key: str) -> None:
            values = range(counters[key], counters[key] + burst)
            counters[key] += burst
            await asyncio.gather(*(publisher.publish(key, str(n).encode()) for n in values))

        async def bursts(publisher: Publisher, key: str) -> None:
            for _ in range(3):
                await send_burst(publisher, key)
                await eventually(lambda: len(handlings.values[key]) == counters[key], timeout=30)
                if key in during:  # the next burst arrives inside the retirement
                    await eventually(lambda: retiring(key), timeout=30)
                else:  # the next burst meets a retired key with a stale routing key
                    await eventually(lambda: state(key) is None, timeout=30)
            await send_burst(publisher, key)

        async with Publisher(settings) as publisher:
            await asyncio.gather(*(bursts(publisher, key) for key in keys))
        await eventually(lambda: handlings.total() == sum(counters.values()), timeout=30)
    print(f"retired {registry.keys_retired}, returned {publisher.returned_messages}")
    assert registry.keys_retired >= 3 * len(after)  # the keys waited for did retire
    # Every burst after the first met an unbound routing key: what it had sent came back
    # (the fence) and was sent again, with what waited behind it (max_in_flight_per_key
    # holds the rest of a burst in the lane until the first message is answered).
    assert publisher.returned_messages >= 3 * len(keys)
    for key in keys:
        assert handlings.values[key] == list(range(counters[key])), key
    assert handlings.overlaps() == []

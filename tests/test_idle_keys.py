"""Idle keys are retired by the registry with nothing lost, and revive on the next publish."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import aio_pika
import aiormq
import pytest

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys._topology import KeyRef, Names

from .support import eventually, make_settings, running_registry, running_worker


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
            await eventually(lambda: not registry._keys, timeout=10)
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

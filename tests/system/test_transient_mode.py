"""``RABBITKEYS_DURABLE=false`` on every broker: transient messages, in transient key queues
on RabbitMQ 3.x and in durable ones from 4.0 on (4.3 refuses transient non-exclusive queues
by default and closes the connection that declares one: a registry that did so hung its
publishers until their timeout)."""

from __future__ import annotations

import urllib.parse
from collections import defaultdict

import aio_pika

from rabbitkeys import App, Message, Publisher
from rabbitkeys._broker.amqp import broker_version
from rabbitkeys._wire.topology import KeyRef, Names

from ..conftest import Broker
from ..support import eventually, make_settings, running_registry, running_worker

KEYS = ["post A", "user/42", "https://example.com/p?q=1", "été 🐇"]


async def test_transient_mode_runs_every_key_in_order_on_this_broker(
    amqp_url: str, namespace: str, broker: Broker, session_vhost: str
) -> None:
    settings = make_settings(amqp_url, namespace, durable=False)
    connection = await aio_pika.connect(amqp_url)
    version = broker_version(connection)
    await connection.close()
    handled: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            for n in range(5):
                for key in KEYS:
                    await publisher.publish(key, str(n).encode())
        await eventually(lambda: sum(map(len, handled.values())) == 5 * len(KEYS), 30)
    assert dict(handled) == {key: list(range(5)) for key in KEYS}
    vhost = urllib.parse.quote(session_vhost, safe="")
    queue = urllib.parse.quote(Names(namespace).key_queue(KeyRef.of("post A")), safe="")
    info = broker.api(f"queues/{vhost}/{queue}")
    assert info["durable"] is (version >= (4, 0))


async def test_transient_mode_publishes_transient_messages(amqp_url: str, namespace: str) -> None:
    """Nothing is written to disk for a job: its message is transient (delivery mode 1)."""
    settings = make_settings(amqp_url, namespace, durable=False)
    modes: list[int | None] = []
    connection = await aio_pika.connect(amqp_url)
    try:
        async with running_registry(settings):
            async with Publisher(settings) as publisher:
                await publisher.publish("post A", b"1")
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Names(namespace).key_queue(KeyRef.of("post A")), passive=True
            )
            message = await queue.get(timeout=10)
            modes.append(int(message.delivery_mode) if message.delivery_mode else None)
            await message.nack(requeue=True)
    finally:
        await connection.close()
    assert modes == [1]

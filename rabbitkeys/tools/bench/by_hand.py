"""New keys by hand: what a user gets from plain aio-pika for the work rabbitkeys does per
new key, measured beside the churn workload on the same broker.

Each new key, in one of 16 lanes running in parallel (each lane a channel on a "worker"
connection and a confirming channel on a "publisher" connection): declare a single-active-
consumer queue (durable; on RabbitMQ 3.x transient with ``RABBITKEYS_DURABLE=false``, as
``key_queue_durable`` decides for rabbitkeys' own key queues), bind it by the key to a direct
exchange, consume it, publish one message (persistent unless transient) with a confirm, and
wait until the consumer has it and acks it. The rate is keys over the time from the first
declare to the last ack: rabbitkeys' churn rate (first publish to last handler) is compared
with it; so is the broker's CPU per key over that time (on a machine whose cores the broker
shares, the rates follow it). The run has a vhost of its own, deleted at the end with
every queue in it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import aio_pika
import aio_pika.abc

from ..._broker.amqp import broker_version
from ..._settings import Settings
from ..._wire.topology import key_queue_durable
from .broker import broker_cpu_seconds, broker_pids, run_vhost

__all__ = ["BY_HAND_LANES", "ByHand", "measure_by_hand_new_keys"]

#: keys handled at once, each lane one after another (issue 25's hand-made row)
BY_HAND_LANES = 16


@dataclass(frozen=True)
class ByHand:
    """New keys done by hand: how many a second, and the broker's CPU for each (None where
    its process is not on this host)."""

    rate: float
    broker_cpu_ms: float | None = None


async def measure_by_hand_new_keys(
    settings: Settings, keys: int, lanes: int = BY_HAND_LANES, timeout: float = 300.0
) -> ByHand:
    """New keys done by hand (the module docstring's steps), ``keys`` of them over
    ``lanes`` lanes, in a vhost of its own."""
    async with run_vhost(settings, "by-hand") as run_settings:
        url = run_settings.amqp_urls[0]
        worker = await aio_pika.connect(url)
        try:
            publisher = await aio_pika.connect(url)
            try:
                return await asyncio.wait_for(
                    _run_lanes(run_settings, worker, publisher, keys, lanes), timeout
                )
            finally:
                await publisher.close()
        finally:
            await worker.close()


async def _run_lanes(
    settings: Settings,
    worker: aio_pika.abc.AbstractConnection,
    publisher: aio_pika.abc.AbstractConnection,
    keys: int,
    lanes: int,
) -> ByHand:
    prefix = f"bench-by-hand-{uuid.uuid4().hex[:6]}"
    durable = key_queue_durable(settings.durable, broker_version(worker))
    setup = await worker.channel()
    exchange_name = f"{prefix}.x"
    await setup.declare_exchange(exchange_name, "direct", durable=settings.durable)
    consuming = []
    publishing = []
    for _ in range(lanes):
        channel = await worker.channel()
        await channel.set_qos(prefetch_count=4)
        consuming.append(channel)
        publishing.append(await publisher.channel(publisher_confirms=True))
    names = [f"{prefix}.k{i}" for i in range(keys)]
    brokers = await asyncio.to_thread(broker_pids, settings)
    cpu_before = broker_cpu_seconds(brokers) if brokers else None
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _lane(consuming[i], publishing[i], exchange_name, names[i::lanes], durable, settings)
            for i in range(lanes)
        )
    )
    rate = keys / (time.perf_counter() - started)
    cpu_after = broker_cpu_seconds(brokers) if brokers else None
    if cpu_before is None or cpu_after is None:
        return ByHand(rate)
    return ByHand(rate, 1000.0 * (cpu_after - cpu_before) / keys)


async def _lane(
    consuming: aio_pika.abc.AbstractChannel,
    publishing: aio_pika.abc.AbstractChannel,
    exchange_name: str,
    names: list[str],
    durable: bool,
    settings: Settings,
) -> None:
    """One key after another: declare, bind, consume, publish, acked."""
    exchange = await publishing.get_exchange(exchange_name, ensure=False)
    delivery_mode = (
        aio_pika.DeliveryMode.PERSISTENT
        if settings.durable
        else aio_pika.DeliveryMode.NOT_PERSISTENT
    )
    loop = asyncio.get_running_loop()
    for name in names:
        queue = await consuming.declare_queue(
            name, durable=durable, arguments={"x-single-active-consumer": True}
        )
        await queue.bind(exchange_name, routing_key=name)
        acked: asyncio.Future[None] = loop.create_future()

        async def handle(
            message: aio_pika.abc.AbstractIncomingMessage, acked: asyncio.Future[None] = acked
        ) -> None:
            await message.ack()
            if not acked.done():
                acked.set_result(None)

        await queue.consume(handle)
        await exchange.publish(
            aio_pika.Message(b"x", delivery_mode=delivery_mode), routing_key=name
        )
        await acked

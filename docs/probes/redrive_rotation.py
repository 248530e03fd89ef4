# Probe: what a redrive's rotation (rabbitkeys/_registry/redrive.py) relies on, on classic and quorum
# queues: how a message taken unacked can be put back in its place, and whether a key queue
# (single active consumer) can be read with basic.get.
#
# Each case: 6 messages 0..5 in a fresh durable queue (quorum cases: x-queue-type quorum);
# the first 3 are taken unacked, one more message "new" is published, then the 3 are given
# back one way or another; the queue is then read to its end.
#
#   python docs/probes/redrive_rotation.py [amqp-url]
#
# Measured on RabbitMQ 3.10.8, aiormq 7.2.4 (see the printout at the end of this file).
import asyncio
import sys
import uuid

import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"


async def read_all(connection: aiormq.abc.AbstractConnection, queue: str) -> list[str]:
    """The queue's messages in order (a consumer: basic.get is refused on a quorum queue
    with single active consumer), once it has given back what a closed channel held."""
    await asyncio.sleep(0.3)
    channel = await connection.channel()
    out: list[str] = []

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        out.append(message.body.decode())

    await channel.basic_consume(queue, on_message, no_ack=True)
    await asyncio.sleep(0.5)
    await channel.close()
    return out


async def take(
    channel: aiormq.abc.AbstractChannel, queue: str, how: str, count: int
) -> tuple[list[int], str | None]:
    """``count`` messages unacked, with basic.get or with a consumer of exact prefetch."""
    if how == "get":
        tags = []
        for _ in range(count):
            got = await channel.basic_get(queue, no_ack=False)
            assert got.delivery_tag is not None
            tags.append(got.delivery_tag)
        return tags, None
    taken: list[int] = []
    enough = asyncio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        taken.append(message.delivery_tag)
        if len(taken) >= count:
            enough.set()

    await channel.basic_qos(prefetch_count=count)
    ok = await channel.basic_consume(queue, on_message)
    await asyncio.wait_for(enough.wait(), 5)
    return sorted(taken), ok.consumer_tag


async def case(connection: aiormq.abc.AbstractConnection, queue_type: str, how: str, back: str):
    setup = await connection.channel()
    queue = f"probe.redrive.{uuid.uuid4().hex[:8]}"
    arguments = {"x-queue-type": queue_type}
    if how == "consume":
        arguments["x-single-active-consumer"] = True
    await setup.queue_declare(queue, durable=True, arguments=arguments)
    for n in range(6):
        await setup.basic_publish(str(n).encode(), routing_key=queue)
    channel = await connection.channel()
    try:
        tags, consumer = await take(channel, queue, how, 3)
    except aiormq.exceptions.AMQPError as exc:
        print(f"{queue_type:8} {how:8} refused: {exc}")
        await setup.queue_delete(queue)
        return
    await setup.basic_publish(b"new", routing_key=queue)
    if consumer is not None:
        await channel.basic_cancel(consumer)
    if back == "nack":
        for tag in tags:
            await channel.basic_nack(tag, requeue=True)
        await channel.close()
    else:
        await channel.close()
    print(f"{queue_type:8} {how:8} {back:14} -> {await read_all(connection, queue)}")
    await setup.queue_delete(queue)


async def main() -> None:
    connection = await aiormq.connect(URL)
    try:
        for queue_type in ("classic", "quorum"):
            await case(connection, queue_type, "get", "nack")
            await case(connection, queue_type, "get", "close channel")
            await case(connection, queue_type, "consume", "nack")
            await case(connection, queue_type, "consume", "close channel")
        # basic.get on a quorum queue with single active consumer
        setup = await connection.channel()
        queue = f"probe.redrive.{uuid.uuid4().hex[:8]}"
        await setup.queue_declare(
            queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-single-active-consumer": True},
        )
        await setup.basic_publish(b"0", routing_key=queue)
        try:
            await (await connection.channel()).basic_get(queue)
            print("quorum SAC basic.get: allowed")
        except aiormq.exceptions.AMQPError as exc:
            print(f"quorum SAC basic.get: {exc}")
        await setup.queue_delete(queue)
    finally:
        await connection.close()


asyncio.run(main())

# RabbitMQ 3.10.8, aiormq 7.2.4 (2026-11-28); "consume" cancels its consumer before giving
# the messages back, as a rotation does:
#
# classic  get      nack           -> ['0', '1', '2', '3', '4', '5', 'new']
# classic  get      close channel  -> ['0', '1', '2', '3', '4', '5', 'new']
# classic  consume  nack           -> ['0', '1', '2', '3', '4', '5', 'new']
# classic  consume  close channel  -> ['0', '1', '2', '3', '4', '5', 'new']
# quorum   get      nack           -> ['3', '4', '5', 'new', '0', '1', '2']
# quorum   get      close channel  -> ['0', '1', '2', '3', '4', '5', 'new']
# quorum   consume  nack           -> ['3', '4', '5', 'new', '0', '1', '2']
# quorum   consume  close channel  -> ['0', '1', '2', '3', '4', '5', 'new']
# quorum SAC basic.get: RESOURCE_LOCKED - cannot obtain access to locked queue ... basic.get
#   operations are not supported by quorum queues with single active consumer
#
# So: closing the channel puts unacked messages back in their places on both queue types;
# a nack with requeue does so on classic queues only (a quorum queue appends the message,
# after anything published meanwhile). A quorum key queue (single active consumer) can
# only be read by a consumer. rabbitkeys/_registry/redrive.py therefore takes from key queues with
# a consumer whose prefetch is exactly what it wants, never nacks with requeue, and gives
# back what it must by closing the channel.

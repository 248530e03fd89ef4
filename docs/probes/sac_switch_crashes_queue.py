# Probe: RabbitMQ < 3.10.13 / 3.11.10 (rabbitmq-server #5460, fixed by "CQ: Remove an assert
# causing issues on SAC switch"). On a classic single-active-consumer queue, cancelling the
# active consumer hands the queue to the standby without delivering the backlog to it; the
# next publish then crashes the queue process (badmatch in attempt_delivery), the publisher
# gets a nack and every consumer is cancelled. rabbitkeys therefore never keeps a standby:
# the old owner lets go first, then the registry assigns the key to the new owner.
import asyncio
import logging

import aio_pika

logging.disable(logging.CRITICAL)
URL = "amqp://guest:guest@localhost/"
NAME = "probe.sac-switch"


async def main() -> None:
    connection = await aio_pika.connect(URL)
    setup = await connection.channel()
    queue = await setup.declare_queue(
        NAME, durable=True, arguments={"x-single-active-consumer": True, "x-expires": 60000}
    )
    await queue.purge()
    publisher = await connection.channel(publisher_confirms=True)
    for n in range(5):
        await publisher.default_exchange.publish(aio_pika.Message(str(n).encode()), NAME)

    active_channel = await connection.channel()
    await active_channel.set_qos(prefetch_count=1)
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    first = asyncio.Event()

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held.append(message)
        first.set()

    active_queue = await active_channel.get_queue(NAME, ensure=False)
    tag = await active_queue.consume(hold)
    await first.wait()

    standby_channel = await connection.channel()
    await standby_channel.set_qos(prefetch_count=1)
    standby_got: list[bytes] = []

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        standby_got.append(message.body)

    standby_queue = await standby_channel.get_queue(NAME, ensure=False)
    await standby_queue.consume(take)

    await active_queue.cancel(tag)  # the standby becomes active; nothing is delivered to it
    outcome = "confirmed"
    try:
        await publisher.default_exchange.publish(aio_pika.Message(b"after-switch"), NAME)
    except Exception as exc:
        outcome = f"refused: {exc!r}"
    await asyncio.sleep(0.5)
    check = await connection.channel()
    ready = (await check.declare_queue(NAME, passive=True)).declaration_result.message_count
    print(f"publish after the switch: {outcome}; standby received {standby_got}; ")
    print(f"queue now holds {ready} ready messages of the 6 published, 1 held unacked")
    await check.queue_delete(NAME)
    await connection.close()


asyncio.run(main())

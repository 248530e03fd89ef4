# Probe: on a classic SAC queue, deliveries rejected with requeue=True after the consumer was
# cancelled go back to their original place, whatever order they are rejected in; the next
# consumer then receives the queue in publish order.
import asyncio

import aio_pika

URL = "amqp://guest:guest@localhost/"


async def main() -> None:
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    queue = await channel.declare_queue(
        "probe.requeue", arguments={"x-single-active-consumer": True, "x-expires": 60000}
    )
    await queue.purge()
    for n in range(10):
        await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), "probe.requeue")
    await channel.set_qos(prefetch_count=5)
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    got_five = asyncio.Event()

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held.append(message)
        if len(held) == 5:
            got_five.set()

    tag = await queue.consume(hold)
    await got_five.wait()
    await held[0].ack()
    await queue.cancel(tag)
    for message in reversed(held[1:]):
        await message.reject(requeue=True)
    again: list[int] = []
    done = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        again.append(int(message.body))
        await message.ack()
        if len(again) == 9:
            done.set()

    await queue.consume(take)
    await asyncio.wait_for(done.wait(), 5)
    print("after cancel + requeue in reverse, the next consumer got:", again)
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()


asyncio.run(main())

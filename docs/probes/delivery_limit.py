# Probe: how often can a quorum queue's message be let go (its consumer's channel closed
# with the delivery unacked: what a key move, park, drain or crash does) before the broker
# drops it, by x-delivery-limit value and broker version; and does a redeclare with another
# x-delivery-limit pass the equivalence check?
#
#   python docs/probes/delivery_limit.py [amqp-url]
#
# Results at the end of this file.
import asyncio
import sys
import uuid

import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
ROUNDS = 25


async def let_go(arguments: dict[str, object]) -> None:
    connection = await aiormq.connect(URL)
    channel = await connection.channel()
    queue = f"probe.delivery-limit.{uuid.uuid4().hex[:6]}"
    await channel.queue_declare(
        queue, durable=True, arguments={"x-queue-type": "quorum", **arguments}
    )
    await channel.confirm_delivery()
    await channel.basic_publish(
        b"x", routing_key=queue, properties=aiormq.spec.Basic.Properties(delivery_mode=2)
    )
    counts = []
    for round_ in range(ROUNDS):
        consumer = await connection.channel()
        got: asyncio.Future[aiormq.abc.DeliveredMessage] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_message(message: aiormq.abc.DeliveredMessage, got=got) -> None:
            if not got.done():
                got.set_result(message)

        await consumer.basic_qos(prefetch_count=1)
        await consumer.basic_consume(queue, on_message)
        try:
            message = await asyncio.wait_for(got, 2)
        except TimeoutError:
            print(f"{arguments}: dropped after {round_} lets-go (x-delivery-count {counts[-3:]})")
            break
        counts.append((message.header.properties.headers or {}).get("x-delivery-count"))
        await consumer.close()  # let it go: unacked, its channel closed
    else:
        print(f"{arguments}: kept after {ROUNDS} lets-go (x-delivery-count {counts[-3:]})")
    await channel.queue_delete(queue)
    await connection.close()


async def redeclare() -> None:
    connection = await aiormq.connect(URL)
    channel = await connection.channel()
    queue = f"probe.delivery-limit.{uuid.uuid4().hex[:6]}"
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        await channel.queue_declare(
            queue, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": -1}
        )
        print("redeclare with x-delivery-limit -1: accepted")
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        print("redeclare with x-delivery-limit -1:", str(exc)[:120])
        channel = await connection.channel()
    await channel.queue_delete(queue)
    await connection.close()


async def main() -> None:
    for arguments in (
        {},
        {"x-delivery-limit": -1},
        {"x-delivery-limit": 0},
        {"x-delivery-limit": 10**6},
    ):
        await let_go(arguments)
    await redeclare()


asyncio.run(main())

# 2026-12-06, aiormq 7.2.4:
#
# RabbitMQ 4.0.5 (Debian 13):
#   {}: dropped after 21 lets-go (x-delivery-count [18, 19, 20])
#   {'x-delivery-limit': -1}: kept after 25 lets-go (x-delivery-count [22, 23, 24])
#   {'x-delivery-limit': 0}: dropped after 1 lets-go
#   {'x-delivery-limit': 1000000}: kept after 25 lets-go
#   redeclare with x-delivery-limit -1: PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'
#   (and with {} declared first, then a policy {"delivery-limit": -1}, user or operator policy,
#   applied to quorum_queues: kept after 25 lets-go)
#
# RabbitMQ 3.10.8 (Debian 12):
#   {}: kept after 25 lets-go
#   {'x-delivery-limit': -1}: dropped after 1 lets-go   <- -1 is NOT "unlimited" on 3.x
#   {'x-delivery-limit': 0}: dropped after 1 lets-go
#   {'x-delivery-limit': 1000000}: kept after 25 lets-go
#   redeclare with x-delivery-limit -1: PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'
#
# So: -1 from 4.0 on, nothing on 3.x; a queue declared without the argument on 4.x keeps the
# default limit of 20 until an (operator) policy lifts it.

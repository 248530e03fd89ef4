# Probe: how a worker can let go of a quorum key queue without reordering it, when the
# queue holds more than the worker's prefetch (rabbitkeys/_worker/handoff.py, _close_key_channel).
#
# Each round: 8 messages 1..8 in a fresh quorum queue with single active consumer; a
# consumer with prefetch 4 on a channel of its own receives 1..4; it acks 1 (which frees
# room: the broker sends 5) and at once lets go, one of three ways:
#   reject:       basic.cancel, then basic.reject(requeue) of 2..4 and what else arrived
#                 (the worker's path before issue 16's fix)
#   cancel+close: basic.cancel, then channel.close, rejecting nothing
#   close:        channel.close alone
# then the queue is read to its end. Rounds in order, or not, out of ROUNDS.
#
# Then what a passive declare (the registry's check before it retires a key) sees while
# such a channel closes: 100 messages all held by a consumer (prefetch 100), the channel
# closed, 30 passive declares from another channel meanwhile and after; any answer with
# fewer than 100 ready and no consumer would let a retirement delete held messages.
#
#   python docs/probes/quorum_let_go.py [amqp-url] [rounds]
import asyncio
import sys
import uuid

import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ARGUMENTS = {"x-queue-type": "quorum", "x-single-active-consumer": True}


async def read_all(connection: aiormq.abc.AbstractConnection, queue: str) -> list[str]:
    await asyncio.sleep(0.2)
    channel = await connection.channel()
    out: list[str] = []

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        out.append(message.body.decode())

    await channel.basic_consume(queue, on_message, no_ack=True)
    await asyncio.sleep(0.4)
    await channel.close()
    return out


async def round_(connection: aiormq.abc.AbstractConnection, how: str) -> list[str]:
    setup = await connection.channel()
    queue = f"probe.letgo.{uuid.uuid4().hex[:8]}"
    await setup.queue_declare(queue, durable=True, arguments=ARGUMENTS)
    for n in range(1, 9):
        await setup.basic_publish(str(n).encode(), routing_key=queue)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=4)
    tags: list[int] = []
    four = asyncio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        tags.append(message.delivery_tag)
        if len(tags) >= 4:
            four.set()

    ok = await channel.basic_consume(queue, on_message)
    await asyncio.wait_for(four.wait(), 5)
    await channel.basic_ack(tags[0])
    if how != "close":
        await channel.basic_cancel(ok.consumer_tag)
    if how == "reject":
        for tag in tags[1:]:
            await channel.basic_reject(tag, requeue=True)
    await channel.close()
    out = await read_all(connection, queue)
    await setup.queue_delete(queue)
    await setup.close()
    return out


async def snapshots(connection: aiormq.abc.AbstractConnection) -> None:
    setup = await connection.channel()
    seen: set[tuple[int, int]] = set()
    for _ in range(ROUNDS):
        queue = f"probe.letgo.{uuid.uuid4().hex[:8]}"
        await setup.queue_declare(queue, durable=True, arguments=ARGUMENTS)
        for n in range(100):
            await setup.basic_publish(str(n).encode(), routing_key=queue)
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=100)
        held: list[int] = []
        all_held = asyncio.Event()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            held.append(1)
            if len(held) >= 100:
                all_held.set()

        await channel.basic_consume(queue, on_message)
        await asyncio.wait_for(all_held.wait(), 5)
        closing = asyncio.ensure_future(channel.close())
        for _ in range(30):
            ok = await setup.queue_declare(queue, passive=True)
            seen.add((ok.message_count or 0, ok.consumer_count or 0))
        await closing
        await setup.queue_delete(queue)
    unsafe = sorted((ready, consumers) for ready, consumers in seen if ready < 100 and not consumers)
    print(f"passive declares during a close (ready, consumers): {sorted(seen)}; unsafe: {unsafe}")


async def main() -> None:
    connection = await aiormq.connect(URL)
    try:
        for how in ("reject", "cancel+close", "close"):
            outcomes = [await round_(connection, how) for _ in range(ROUNDS)]
            in_order = sum(out == [str(n) for n in range(2, 9)] for out in outcomes)
            others = sorted({" ".join(out) for out in outcomes} - {"2 3 4 5 6 7 8"})
            print(f"{how:13} in order {in_order}/{ROUNDS}; otherwise: {others}")
        await snapshots(connection)
    finally:
        await connection.close()


asyncio.run(main())

# RabbitMQ 3.10.8, aiormq 7.2.4 (2026-11-28), 20 rounds (two runs):
#
# reject        in order 0/20; otherwise: ['6 7 8 2 3 4 5', '6 7 8 5 2 3 4']
# cancel+close  in order 2/20, 0/20; otherwise: ['2 3 4 6 7 8 5']
# close         in order 20/20; otherwise: []
# passive declares during a close (ready, consumers): [(0, 1), (100, 0)]; unsafe: []
#
# A quorum queue appends what comes back after its consumer's cancel: the rejected ones,
# and the delivery the broker sent as the ack freed room (it crosses the cancel: the
# channel returns it at once). A channel's close alone returns everything the consumer had,
# 2..5, in its place. So rabbitkeys lets go of a quorum key by closing its own channel.
# The broker drops the consumer and makes its messages ready again in one step: a passive
# declare sees the consumer with the messages held, or neither (600 answers), so the
# registry's check before a retirement (no ready message, no consumer) stays sound.

# Probe (issue 14): retiring a quorum key queue without `if_empty` loses nothing, provided
# routing stops first. Quorum queues refuse queue.delete with if_empty / if_unused, the
# broker-side check the registry uses on classic queues. This races publishers (confirms,
# mandatory, through a direct exchange, as rabbitkeys publishes) against two ways to delete:
#
#   naive:      delete the queue while it is bound (what x-expires or an operator does)
#   rabbitkeys: unbind, wait the grace, the consumer settles everything and cancels, a
#               passive declare shows no message and no consumer, then delete (no flags)
#
# and counts messages the broker confirmed that no consumer ever received.
#
#   python docs/probes/quorum_retire_race.py [AMQP_URL] [TRIALS]
#
# Quorum queues run on a single node too (one member), so the local broker will do; on a
# cluster, pass a node's URL. Everything it declares is deleted at the end.
import asyncio
import contextlib
import logging
import sys
import time

import aio_pika
import aiormq

logging.disable(logging.CRITICAL)
URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
TRIALS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
VERBOSE = "-v" in sys.argv
GRACE = 0.2  # rabbitkeys' retire_grace in the tests; the default is 1 s
ARGS = {"x-queue-type": "quorum", "x-single-active-consumer": True, "x-expires": 600_000}


async def trial(conn: aio_pika.abc.AbstractConnection, i: int, how: str) -> dict[str, int]:
    name, rk = f"probe.qqretire.{how}.{i}", f"k.{how}.{i}"
    setup = await conn.channel()
    exchange = await setup.declare_exchange("probe.qqretire", "direct")
    queue = await setup.declare_queue(name, durable=True, arguments=ARGS)
    await queue.bind(exchange, rk)
    consume = await conn.channel()
    await consume.set_qos(prefetch_count=4)
    got: set[int] = set()

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        got.add(int(message.body))
        await message.ack()

    consumed = await consume.get_queue(name, ensure=False)
    tag = await consumed.consume(handle)
    # the publisher's own connection: a naive delete can make the broker close it
    publishing = await aio_pika.connect(URL)
    publish = await publishing.channel(publisher_confirms=True)
    pub_exchange = await publish.get_exchange("probe.qqretire", ensure=False)
    acked: set[int] = set()
    returned = 0
    outcome = {"deleted": 0, "kept": 0, "publisher closed": 0, "unanswered": 0}

    async def publisher() -> None:
        nonlocal returned
        try:
            for n in range(300):
                try:
                    answer = await asyncio.wait_for(
                        pub_exchange.publish(
                            aio_pika.Message(str(n).encode(), delivery_mode=2),
                            rk,
                            mandatory=True,
                        ),
                        5,
                    )
                except TimeoutError:
                    outcome["unanswered"] += 1  # no confirm, no return, no close
                    return
                if isinstance(answer, aiormq.spec.Basic.Ack):
                    acked.add(n)
                else:
                    returned += 1
        except aiormq.exceptions.AMQPError as exc:
            if VERBOSE:
                print(f"trial {i} ({how}): publisher: {exc!r}")
            outcome["publisher closed"] += 1  # the broker closed it (INTERNAL_ERROR seen)

    async def retire() -> None:
        await asyncio.sleep(0.05 + 0.01 * (i % 10))
        deleter = await conn.channel()
        if how == "naive":
            await (await deleter.get_queue(name, ensure=False)).delete(
                if_unused=False, if_empty=False
            )
            outcome["deleted"] += 1
            return
        target = await deleter.get_queue(name, ensure=False)
        await target.unbind("probe.qqretire", rk)  # 1: stop routing
        await asyncio.sleep(GRACE)  # 2: what was routed before the unbind lands
        # 3: the owner settles every delivery (the handler acks), then cancels
        deadline = time.monotonic() + 5
        while len(got) < len(acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await consumed.cancel(tag)
        ok = await deleter.declare_queue(name, passive=True)  # 4: check, then delete
        result = ok.declaration_result
        if not result.message_count and not result.consumer_count:
            await target.delete(if_unused=False, if_empty=False)
            outcome["deleted"] += 1
        else:
            outcome["kept"] += 1

    await asyncio.gather(publisher(), retire())
    await asyncio.sleep(0.3)
    lost = acked - got
    if outcome["kept"]:
        # kept queues are not a loss: count what still waits in them
        ok = await setup.declare_queue(name, passive=True)
        lost = set() if ok.declaration_result.message_count >= len(lost) else lost
        await setup.queue_delete(name)
    for channel in (consume, setup):
        if not channel.is_closed:
            await channel.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(publishing.close(), 5)
    return {"acked": len(acked), "returned": returned, "lost": len(lost), **outcome}


async def main() -> None:
    conn = await aio_pika.connect(URL)
    try:
        for how in ("naive", "rabbitkeys"):
            total: dict[str, int] = {}
            for i in range(TRIALS):
                for field, value in (await trial(conn, i, how)).items():
                    total[field] = total.get(field, 0) + value
            print(
                f"{how:>10}: {TRIALS} trials, {total['acked']} confirmed, {total['returned']} "
                f"returned, {total['deleted']} deleted, {total['kept']} kept, "
                f"{total['publisher closed']} publisher connections closed by the broker, "
                f"{total['unanswered']} publishers left without an answer, "
                f"confirmed and never delivered: {total['lost']}"
            )
    finally:
        cleanup = await conn.channel()
        await cleanup.exchange_delete("probe.qqretire")
        await conn.close()


asyncio.run(main())

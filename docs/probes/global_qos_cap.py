# Probe: RabbitMQ reinterprets basic.qos(global=True) as a limit per *channel*, shared by
# all consumers on it, next to the per-consumer prefetch (global=False). Does it hold with
# many consumers, and what does a later basic.qos(global=False) do to it?
#
# Each case: 8 queues of 20 messages, one consumer per queue on one channel, nothing acked.
# We count what the broker delivered (unacked) once it stops sending, then ack some and
# count again: a cap that holds keeps the unacked count at the cap.
#
#   python docs/probes/global_qos_cap.py [amqp-url]
#
# Measured on RabbitMQ 3.10.8, aiormq 7.2.4 (see the printout at the end of this file).
import asyncio
import sys
import uuid
from collections import Counter

import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
QUEUES, MESSAGES, PREFETCH, CAP = 8, 20, 4, 10


async def settle(held: list[int]) -> int:
    """Wait until no delivery arrived for 0.5 s; return how many are held."""
    while True:
        before = len(held)
        await asyncio.sleep(0.5)
        if len(held) == before:
            return before


async def case(name: str, setup: list[tuple[int, bool]], after: list[tuple[int, bool]]) -> None:
    """``setup``: qos calls (prefetch_count, global) before the consumers; ``after``: qos
    calls made once the consumers hold their deliveries (a handoff's round trip)."""
    connection = await aiormq.connect(URL)
    admin = await connection.channel()
    channel = await connection.channel()
    prefix = f"probe.qos.{uuid.uuid4().hex[:6]}"
    queues = [f"{prefix}.{n}" for n in range(QUEUES)]
    for queue in queues:
        await admin.queue_declare(queue, durable=True, arguments={"x-expires": 60_000})
        for m in range(MESSAGES):
            await admin.basic_publish(str(m).encode(), routing_key=queue)
    for count, global_ in setup:
        await channel.basic_qos(prefetch_count=count, global_=global_)
    held: list[int] = []
    per_queue: Counter[str] = Counter()

    async def on_message(queue: str, message: aiormq.abc.DeliveredMessage) -> None:
        tag = message.delivery.delivery_tag
        assert isinstance(tag, int)
        held.append(tag)
        per_queue[queue] += 1

    for queue in queues:
        await channel.basic_consume(queue, lambda m, q=queue: on_message(q, m))
    first = await settle(held)
    per_queue_max = max(per_queue.values())
    for count, global_ in after:
        await channel.basic_qos(prefetch_count=count, global_=global_)
    # ack 5, one by one: a cap that holds lets exactly 5 more in
    acked = 0
    for tag in held[:5]:
        await channel.basic_ack(tag)
        acked += 1
    second = await settle(held)
    print(
        f"{name:<58} unacked at first: {first:>3} (max per queue {per_queue_max}); "
        f"after the later qos and {acked} acks: {second - acked:>3} unacked"
    )
    await channel.close()  # first: deleting consumed queues would cancel our consumers
    for queue in queues:
        await admin.queue_delete(queue)
    await connection.close()


async def main() -> None:
    none: list[tuple[int, bool]] = []
    await case("per-consumer 4 only", [(PREFETCH, False)], none)
    await case(f"per-consumer 4, then global {CAP}", [(PREFETCH, False), (CAP, True)], none)
    await case(f"global {CAP}, then per-consumer 4", [(CAP, True), (PREFETCH, False)], none)
    await case(
        f"per-consumer 4, global {CAP}; later qos(4, global=False)",
        [(PREFETCH, False), (CAP, True)],
        [(PREFETCH, False)],
    )
    await case(
        f"per-consumer 4, global {CAP}; later qos({CAP}, global=True)",
        [(PREFETCH, False), (CAP, True)],
        [(CAP, True)],
    )


asyncio.run(main())

# RabbitMQ 3.10.8, aiormq 7.2.4 (2026-11-28):
#
# per-consumer 4 only                                        unacked at first:  32 (max per queue 4); after the later qos and 5 acks:  32 unacked
# per-consumer 4, then global 10                             unacked at first:  10 (max per queue 4); after the later qos and 5 acks:  10 unacked
# global 10, then per-consumer 4                             unacked at first:  32 (max per queue 4); after the later qos and 5 acks:  32 unacked
# per-consumer 4, global 10; later qos(4, global=False)      unacked at first:  10 (max per queue 4); after the later qos and 5 acks:  32 unacked
# per-consumer 4, global 10; later qos(10, global=True)      unacked at first:  10 (max per queue 4); after the later qos and 5 acks:  10 unacked
#
# So: both limits hold at once (at most 4 per consumer, 10 over the channel) only when the
# per-consumer qos comes FIRST. A basic.qos(global=False) removes the channel-wide cap, on
# 3.10.8 as in the broker source (rabbit_channel calls rabbit_limiter:unlimit_prefetch for
# it): issued after the cap, it silently lifts it. A repeated qos(global=True) with the
# same count keeps it, and is a round trip like any other.

# RabbitMQ 4.0.5 with deprecated_features.permit.global_qos = false (what 4.3 does by
# default), durable queues (it refuses transient shared ones), 2026-12-06:
#
# per-consumer 4 only                                        unacked at first:  32 (max per queue 4)
# per-consumer 4, then global 10                             unacked at first:  80 (max per queue 10)
# global 10, then per-consumer 4                             unacked at first:  32 (max per queue 4)
# per-consumer 4, global 10; later qos(4, global=False)      unacked at first:  80 (max per queue 10)
# per-consumer 4, global 10; later qos(10, global=True)      unacked at first:  80 (max per queue 10)
#
# So there a global qos is a per-consumer one: the cap of 10 became each queue's prefetch
# (80 held, not 10). rabbitkeys sends none from 4.0 on; the worker takes each key's
# prefetch out of its cap instead (_handoff.PrefetchBudget).

# Probe: what a channel of its own per key costs a worker, against one consume channel
# shared by all keys (rabbitkeys/_handoff.py gives each quorum key a channel of its own).
#
# N quorum queues (single active consumer) are consumed, then let go, two ways:
#   shared:  basic.consume on one channel (qos set once), then basic.cancel each;
#   own:     per key: channel.open, basic.qos, basic.consume; then basic.cancel, channel.close.
# Keys are taken 16 at a time (a worker takes the keys of an Assign concurrently). Also the
# broker's memory (connection_other + queue_procs + other_proc) before and after, read with
# rabbitmqctl when it is on the PATH.
#
#   python docs/probes/key_channel_cost.py [amqp-url] [N]
import asyncio
import sys
import time
import uuid

import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
AT_ONCE = 16


async def in_batches(jobs: list, run) -> float:
    started = time.perf_counter()
    for i in range(0, len(jobs), AT_ONCE):
        await asyncio.gather(*(run(job) for job in jobs[i : i + AT_ONCE]))
    return time.perf_counter() - started


async def main() -> None:
    connection = await aiormq.connect(URL)
    setup = await connection.channel()
    prefix = f"probe.keychan.{uuid.uuid4().hex[:6]}"
    queues = [f"{prefix}.{n}" for n in range(N)]
    arguments = {"x-queue-type": "quorum", "x-single-active-consumer": True}
    for queue in queues:
        await setup.queue_declare(queue, durable=True, arguments=arguments)

    async def nothing(message: aiormq.abc.DeliveredMessage) -> None:
        pass

    try:
        for _ in range(2):  # twice: the second round is warm
            shared = await connection.channel()
            await shared.basic_qos(prefetch_count=4)
            tags: dict[str, str] = {}

            async def consume_shared(queue: str) -> None:
                tags[queue] = (await shared.basic_consume(queue, nothing)).consumer_tag

            async def cancel_shared(queue: str) -> None:
                await shared.basic_cancel(tags[queue])

            take = await in_batches(queues, consume_shared)
            let_go = await in_batches(queues, cancel_shared)
            await shared.close()
            print(f"shared channel: take {N / take:6.0f} keys/s, let go {N / let_go:6.0f} keys/s")

            own: dict[str, tuple[aiormq.abc.AbstractChannel, str]] = {}

            async def consume_own(queue: str) -> None:
                channel = await connection.channel()
                await channel.basic_qos(prefetch_count=4)
                own[queue] = (channel, (await channel.basic_consume(queue, nothing)).consumer_tag)

            async def let_go_own(queue: str) -> None:
                channel, tag = own.pop(queue)
                await channel.basic_cancel(tag)
                await channel.close()

            take = await in_batches(queues, consume_own)
            let_go = await in_batches(queues, let_go_own)
            print(f"own channels:   take {N / take:6.0f} keys/s, let go {N / let_go:6.0f} keys/s")
    finally:
        for queue in queues:
            await setup.queue_delete(queue)
        await connection.close()


asyncio.run(main())

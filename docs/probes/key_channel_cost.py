# Probe: what a channel of its own per key costs a worker, against one consume channel
# shared by all keys (rabbitkeys/_worker/handoff.py gives each quorum key a channel of its own).
#
# N quorum queues (single active consumer) are consumed, then let go, two ways:
#   shared:  basic.consume on one channel (qos set once), then basic.cancel each;
#   own:     per key: channel.open, basic.qos, basic.consume; then channel.close.
# Keys are taken 16 at a time (a worker takes the keys of an Assign concurrently). Then the
# broker's memory per key held (connection_channels + connection_other + other_proc, from
# `rabbitmq-diagnostics memory_breakdown`, when it is on the PATH), both ways.
#
#   python docs/probes/key_channel_cost.py [amqp-url] [N]
import asyncio
import shutil
import subprocess
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


def broker_memory_kb() -> float:
    out = subprocess.run(
        ["rabbitmq-diagnostics", "-q", "memory_breakdown", "--unit", "kb"],
        capture_output=True,
        text=True,
    ).stdout
    kinds = {"connection_channels", "connection_other", "other_proc"}
    return sum(
        float(line.split(":")[1].split()[0])
        for line in out.splitlines()
        if line.split(":")[0] in kinds
    )


async def memory_per_key(connection, queues, nothing) -> None:
    await asyncio.sleep(2)
    before = broker_memory_kb()
    shared = await connection.channel()
    await shared.basic_qos(prefetch_count=4)
    for queue in queues:
        await shared.basic_consume(queue, nothing)
    await asyncio.sleep(2)
    with_shared = broker_memory_kb()
    await shared.close()
    await asyncio.sleep(2)
    before_own = broker_memory_kb()
    channels = []
    for queue in queues:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=4)
        await channel.basic_consume(queue, nothing)
        channels.append(channel)
    await asyncio.sleep(2)
    with_own = broker_memory_kb()
    for channel in channels:
        await channel.close()
    n = len(queues)
    print(
        f"broker memory per key held: shared channel {(with_shared - before) / n:.1f} KB, "
        f"own channel {(with_own - before_own) / n:.1f} KB"
    )


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
                channel, _ = own.pop(queue)
                await channel.close()

            take = await in_batches(queues, consume_own)
            let_go = await in_batches(queues, let_go_own)
            print(f"own channels:   take {N / take:6.0f} keys/s, let go {N / let_go:6.0f} keys/s")
        if shutil.which("rabbitmq-diagnostics"):
            await memory_per_key(connection, queues, nothing)
    finally:
        for queue in queues:
            await setup.queue_delete(queue)
        await connection.close()


asyncio.run(main())

# RabbitMQ 3.10.8, aiormq 7.2.4, this 2-core machine (broker and client share it), N=1000:
#
# shared channel: take   1842 keys/s, let go   2054 keys/s
# own channels:   take   2065 keys/s, let go   2681 keys/s
# shared channel: take   1829 keys/s, let go   2079 keys/s
# own channels:   take   1849 keys/s, let go   2826 keys/s
# broker memory per key held: shared channel 1.3 KB, own channel 21.4 KB
#
# (N=500, another run: take 1,830-1,850 vs 2,210-2,290 keys/s.) A channel per key costs no
# time (taking and letting go are as fast or faster: the channels work in parallel), but
# ~20 KB of broker memory per key held, about what the key's classic queue itself costs
# (~19 KB, rabbitmq-facts.md), and a classic worker's cap over all its keys is a qos on
# one channel (global=True). So classic keys keep the shared channel (a reject puts a
# message back in its place there); quorum keys, whose queue costs far more than 20 KB
# anyway, get a channel each.

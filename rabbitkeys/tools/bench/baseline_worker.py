"""A worker process for the baseline strategies, on plain aio-pika (the same client library).

``python -m rabbitkeys.tools.bench.baseline_worker MODE QUEUE [QUEUE ...]``

* ``concurrent``: one shared queue, handlers run concurrently up to the prefetch (the usual
  "many workers on one queue" setup: fastest, and it breaks per-key order);
* ``sequential``: each queue handled one message at a time, in order (one queue with one
  worker; or Kafka-style partitions, single-active-consumer queues, one at a time each);
* ``raw``: the same on many per-key queues, as rabbitkeys consumes them: one channel, one
  consumer per queue with a prefetch of 4 (``RAW_PREFETCH``), each queue one at a time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ..._settings import split_urls
from .recording import HEADER_PUBLISHED, HEADER_SEQ, Recorder

PREFETCH = 100
#: per consumer in ``raw`` mode: rabbitkeys' default ``prefetch`` per key
RAW_PREFETCH = 4


async def main(mode: str, queues: list[str]) -> None:
    recorder = Recorder()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(split_urls(os.environ["RABBITKEYS_AMQP_URL"])[0])

    async def handle(message: AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = dict(message.headers)
        await recorder.handle(
            str(headers["bench-key"]),
            int(headers[HEADER_SEQ]),
            int(headers[HEADER_PUBLISHED]) / 1e6,
        )
        await message.ack()

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    readers: list[asyncio.Task[None]] = []
    if mode == "concurrent":
        for name in queues:
            await (await channel.get_queue(name, ensure=False)).consume(handle)
    elif mode == "raw":
        # basic.qos without global applies to each consumer the channel starts afterwards
        await channel.set_qos(prefetch_count=RAW_PREFETCH)
        for name in queues:
            queue = await channel.get_queue(name, ensure=False)
            readers.append(loop.create_task(_in_order(queue, handle)))
    else:
        for name in queues:
            queue_channel = await connection.channel()
            await queue_channel.set_qos(prefetch_count=PREFETCH)
            queue = await queue_channel.get_queue(name, ensure=False)
            readers.append(loop.create_task(_in_order(queue, handle)))
    await stop.wait()
    recorder.flush()
    await connection.close()
    recorder.flush()


async def _in_order(queue: aio_pika.abc.AbstractQueue, handle: object) -> None:
    async with queue.iterator() as messages:
        async for message in messages:
            await handle(message)  # type: ignore[operator]


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))

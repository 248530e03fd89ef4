"""Probe: a channel the broker closed (NOT_FOUND, RESOURCE_LOCKED...) frees its number in
aiormq as soon as the broker's Channel.Close is read; aiormq's Channel.CloseOk may follow
later, or never (aiormq 7.2 drops it when the connection's 10-frame write queue is full, and
the broker then keeps the channel open). A channel opened with that number makes the broker
close the whole connection: "CHANNEL_ERROR - second 'channel.open' seen".

    python docs/probes/channel_number_reuse.py [AMQP_URL]

Prints how many of 20 connections lost the connection with automatic numbering, and with
numbers that are not reused soon (what rabbitkeys does, ``_amqp.open_channel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid

import aio_pika
import aiormq

from rabbitkeys._broker.amqp import open_channel

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost/"


async def tries(fresh_numbers: bool, count: int = 20) -> int:
    """``count`` connections; on each, 50 tasks open a channel, get it closed by the broker
    (a passive declare of a missing queue) and open the next, 10 times."""
    lost = 0
    for _ in range(count):
        connection = await aio_pika.connect(URL)

        async def churn(connection: aio_pika.abc.AbstractConnection = connection) -> None:
            for _ in range(10):
                if fresh_numbers:
                    channel = await open_channel(connection)
                else:
                    channel = await connection.channel()
                with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(f"missing-{uuid.uuid4().hex}", passive=True)

        try:
            await asyncio.gather(*(churn() for _ in range(50)))
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError):
            lost += 1
        finally:
            await connection.close()
    return lost


async def main() -> None:
    print(f"automatic numbers: {await tries(False)} of 20 connections lost")
    print(f"fresh numbers:     {await tries(True)} of 20 connections lost")


if __name__ == "__main__":
    asyncio.run(main())

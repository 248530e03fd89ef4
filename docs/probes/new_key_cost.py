"""Probe: what a new key costs the broker with no rabbitkeys at all, step by step.

For N new keys, over 16 channels (one connection), in a vhost of its own that is deleted at
the end: (1) declare a durable single-active-consumer queue and bind it to a direct
exchange; (2) consume it (a second connection, prefetch 4); (3) publish one persistent
message per key with confirms; (4) wait until each is delivered and acked. The broker's CPU
time (its ``os_pid`` from the management API, read from /proc) is printed per key for each
step, and the end-to-end new-key rate. Compare with ``rabbitkeys bench --workloads churn``.

    python docs/probes/new_key_cost.py [N] [--transient]
        [--amqp-url amqp://guest:guest@localhost:5672/] [--management-url http://localhost:15672]

``--amqp-url``: the broker (its vhost is replaced by the probe's own); ``--management-url``:
its management API (credentials in the URL or guest/guest). Both default to the local broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import urllib.parse
import urllib.request
import uuid

import aio_pika

API = "http://localhost:15672/api"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
LANES = 16


def configure(amqp_url: str, management_url: str) -> str:
    """Point the probe at a broker; return the AMQP URL with ``{vhost}`` for its path."""
    global API, AUTH
    parts = urllib.parse.urlsplit(management_url)
    user, password = parts.username or "guest", parts.password or "guest"
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    API = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    API = API if API.endswith("/api") else API + "/api"
    AUTH = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    amqp = urllib.parse.urlsplit(amqp_url)
    return urllib.parse.urlunsplit((amqp.scheme, amqp.netloc, "/{vhost}", amqp.query, ""))


def api(path: str, method: str = "GET", body: object = None) -> object:
    request = urllib.request.Request(
        f"{API}/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def broker_cpu() -> float:
    pid = api("nodes")[0]["os_pid"]  # type: ignore[index]
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(
    keys: int, durable: bool, amqp_url: str = "amqp://guest:guest@localhost/{vhost}"
) -> None:
    vhost = f"probe-new-keys-{uuid.uuid4().hex[:6]}"
    api(f"vhosts/{vhost}", "PUT", {})
    api(f"permissions/{vhost}/guest", "PUT", {"configure": ".*", "write": ".*", "read": ".*"})
    url = amqp_url.replace("{vhost}", urllib.parse.quote(vhost, safe=""))
    try:
        setup = await aio_pika.connect(url)
        consumer_connection = await aio_pika.connect(url)
        publisher_connection = await aio_pika.connect(url)
        channels = [await setup.channel() for _ in range(LANES)]
        exchange = await channels[0].declare_exchange("jobs", "direct", durable=True)
        consume_channels = [await consumer_connection.channel() for _ in range(LANES)]
        for channel in consume_channels:
            await channel.set_qos(prefetch_count=4)
        publish_channel = await publisher_connection.channel(publisher_confirms=True)
        publish_exchange = await publish_channel.get_exchange("jobs")
        done: asyncio.Queue[None] = asyncio.Queue()
        arguments = {"x-single-active-consumer": True, "x-expires": 600_000}
        steps: dict[str, float] = {}

        async def lanes(step: str, work) -> None:  # type: ignore[no-untyped-def]
            cpu, started = broker_cpu(), time.perf_counter()
            await asyncio.gather(*(work(lane) for lane in range(LANES)))
            steps[step] = time.perf_counter() - started
            print(
                f"{step:<22} {keys / steps[step]:>7.0f}/s   broker "
                f"{(broker_cpu() - cpu) / keys * 1000:.2f} ms per key"
            )

        async def declare(lane: int) -> None:
            for n in range(lane, keys, LANES):
                queue = await channels[lane].declare_queue(
                    f"k.{n}", durable=durable, arguments=arguments
                )
                await queue.bind(exchange, routing_key=f"k.{n}")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            done.put_nowait(None)

        async def consume(lane: int) -> None:
            for n in range(lane, keys, LANES):
                queue = await consume_channels[lane].get_queue(f"k.{n}", ensure=False)
                await queue.consume(on_message)

        async def publish(lane: int) -> None:
            mode = (
                aio_pika.DeliveryMode.PERSISTENT
                if durable
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            )
            await asyncio.gather(
                *(
                    publish_exchange.publish(
                        aio_pika.Message(b"x" * 20, delivery_mode=mode), routing_key=f"k.{n}"
                    )
                    for n in range(lane, keys, LANES)
                )
            )

        async def delivered(lane: int) -> None:
            if lane == 0:
                for _ in range(keys):
                    await done.get()

        await lanes("declare + bind", declare)
        await lanes("consume", consume)
        await lanes("publish (confirmed)", publish)
        await lanes("delivered and acked", delivered)
        total = sum(steps.values())
        print(f"end to end: {keys / total:.0f} new keys/s (durable={durable}, {API})")
        for connection in (publisher_connection, consumer_connection, setup):
            await connection.close()
    finally:
        api(f"vhosts/{vhost}", "DELETE")


def option(name: str, default: str) -> str:
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


if __name__ == "__main__":
    count = int(next((a for a in sys.argv[1:] if a.isdigit()), "2000"))
    url = configure(
        option("--amqp-url", "amqp://guest:guest@localhost/"),
        option("--management-url", "http://localhost:15672"),
    )
    asyncio.run(main(count, "--transient" not in sys.argv, url))

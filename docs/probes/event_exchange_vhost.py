# Probe: the rabbitmq_event_exchange plugin and virtual hosts. The plugin declares
# `amq.rabbitmq.event` in ONE vhost (`event_exchange.vhost`, default "/") and publishes the
# events of EVERY vhost there, each with a `vhost` header. So a registry connected to another
# vhost finds no `amq.rabbitmq.event` (passive declare: NOT_FOUND) and falls back on heartbeats;
# and a registry in "/" hears about queues of every vhost.
#
#   python docs/probes/event_exchange_vhost.py [amqp://guest:guest@localhost:5672/] [http://localhost:15672]
import asyncio
import base64
import sys
import urllib.parse
import urllib.request
import uuid

import aio_pika
import aiormq

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@localhost:5672/"
MANAGEMENT = sys.argv[2] if len(sys.argv) > 2 else "http://localhost:15672"


def management(path: str, method: str = "GET", body: bytes | None = None) -> None:
    request = urllib.request.Request(f"{MANAGEMENT}/api/{path}", data=body, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request, timeout=10).read()


async def main() -> None:
    vhost = f"probe-events-{uuid.uuid4().hex[:8]}"
    quoted = urllib.parse.quote(vhost, safe="")
    management(f"vhosts/{quoted}", "PUT", b"{}")
    management(f"permissions/{quoted}/guest", "PUT", b'{"configure":".*","write":".*","read":".*"}')
    in_vhost = URL.rstrip("/") + "/" + quoted
    try:
        root = await aio_pika.connect(URL)
        channel = await root.channel()
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind("amq.rabbitmq.event", routing_key="queue.deleted")
        heard: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await heard.put(dict(message.headers or {}))

        await events.consume(on_event, no_ack=True)

        other = await aio_pika.connect(in_vhost)
        try:
            await (await other.channel()).declare_exchange("amq.rabbitmq.event", passive=True)
            print(f"vhost {vhost!r}: amq.rabbitmq.event exists")
        except aiormq.exceptions.ChannelNotFoundEntity:
            print(f"vhost {vhost!r}: no amq.rabbitmq.event (NOT_FOUND)")
        inbox = f"probe.inbox.{uuid.uuid4().hex[:6]}"
        await (await other.channel()).declare_queue(inbox, exclusive=True)
        await other.close()  # the exclusive queue goes with the connection, as when a worker dies
        while True:
            headers = await asyncio.wait_for(heard.get(), 10)
            name = headers.get("name")
            name = name.decode() if isinstance(name, bytes) else name
            if name == inbox:
                vh = headers.get("vhost")
                vh = vh.decode() if isinstance(vh, bytes) else vh
                print(f"'/' heard queue.deleted for {name!r} of vhost {vh!r}")
                break
        await root.close()
    finally:
        management(f"vhosts/{quoted}", "DELETE")


asyncio.run(main())

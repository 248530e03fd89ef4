# Probe: what a RabbitMQ cluster answers about a *classic* queue whose node is down, and
# what it is once the node is back (4.0.5 differs from 3.10.8 here: docs/internals/broker.md "On a
# RabbitMQ cluster"). Runs against a cluster that is up (it never starts or stops one):
#
#   python -m rabbitkeys.tools.rabbit_cluster start --port-base 5740 [--root R]
#   PORT_BASE=5740 [ROOT=R] python docs/probes/classic_node_down.py
#
# Three classic durable SAC queues pinned on node 2 (declared over node 2's connection, no
# locator), bound to a direct exchange; a confirming, mandatory publisher on node 1; node 2
# is killed, then restarted. Prints: the answer to a publish routed to a down queue (ack,
# nack, return), a passive and an active declare of it, its binding in the listing; then
# the same after the node's return, and whether a message published then is delivered.
import asyncio
import os
import time
from pathlib import Path

import aio_pika
import aiormq

from rabbitkeys.tools.rabbit_cluster import RabbitCluster

PORT_BASE = int(os.environ.get("PORT_BASE", "5740"))
ROOT = Path(os.environ["ROOT"]) if os.environ.get("ROOT") else None
T0 = time.monotonic()
ARGS = {"x-queue-type": "classic", "x-single-active-consumer": True}


def say(*what: object) -> None:
    print(f"{time.monotonic() - T0:6.2f}s", *what, flush=True)


async def publish(exchange: aio_pika.abc.AbstractExchange, rk: str, body: bytes) -> str:
    try:
        answer = await asyncio.wait_for(
            exchange.publish(aio_pika.Message(body, delivery_mode=2), rk, mandatory=True), 10
        )
    except aiormq.exceptions.DeliveryError as exc:
        return f"nack ({exc.frame!r})" if exc.frame else f"DeliveryError {exc!r}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ack" if isinstance(answer, aiormq.spec.Basic.Ack) else "returned (basic.return)"


async def declares(connection: aio_pika.abc.AbstractConnection, name: str) -> None:
    for passive in (True, False):
        channel = await connection.channel()
        try:
            q = await channel.declare_queue(name, passive=passive, durable=True, arguments=ARGS)
            say(f"  declare passive={passive}: ok, {q.declaration_result.message_count} ready")
        except Exception as exc:
            say(f"  declare passive={passive}: {exc}")
        if not channel.is_closed:
            await channel.close()


def bindings(cluster: RabbitCluster, name: str) -> list[str]:
    listed = cluster.api(f"queues/%2F/{name}/bindings")
    return [b["routing_key"] for b in listed if b["source"] == "probe.down"]


async def probe(cluster: RabbitCluster) -> None:
    urls = cluster.amqp_urls()
    one, two = await aio_pika.connect(urls[0]), await aio_pika.connect(urls[1])
    setup = await two.channel()
    exchange = await setup.declare_exchange("probe.down", "direct", durable=True)
    names = [f"probe.down.{i}" for i in range(3)]
    for i, name in enumerate(names):
        q = await setup.declare_queue(name, durable=True, arguments=ARGS)
        await q.purge()
        await q.bind(exchange, f"k{i}")
    say("queues on", set(cluster.queue_nodes("/", "probe.down.").values()))
    confirms = await one.channel(publisher_confirms=True)
    target = await confirms.get_exchange("probe.down", ensure=False)
    say("before the kill, publish:", await publish(target, "k0", b"0"))
    await two.close()
    cluster.kill(2)
    say("node 2 killed")
    for delay in (0.0, 2.0, 5.0):
        await asyncio.sleep(delay)
        say(f"publish to k0 ({delay:g}s later):", await publish(target, "k0", b"1"))
    say("  bindings of probe.down.0 listed:", bindings(cluster, names[0]))
    await declares(one, names[0])
    say("publish to k1 after the declares:", await publish(target, "k1", b"1"))
    await asyncio.get_running_loop().run_in_executor(None, cluster.restart, 2)
    say("node 2 back")
    for delay in (0.0, 1.0, 3.0):
        await asyncio.sleep(delay)
        say(f"publish to k2 ({delay:g}s after the return):", await publish(target, "k2", b"2"))
    say("  bindings of probe.down.0..2:", [bindings(cluster, n) for n in names])
    await declares(one, names[0])
    say("publish to k0 after the declares:", await publish(target, "k0", b"3"))
    listed = {q["name"]: q for q in cluster.api("queues/%2F?columns=name,messages,state,node")}
    for name in names:
        say(" ", name, {k: listed.get(name, {}).get(k) for k in ("messages", "state", "node")})
    cleanup = await one.channel()
    for name in names:
        await cleanup.queue_delete(name)
    await cleanup.exchange_delete("probe.down")
    await one.close()


def main() -> None:
    directory = Path(ROOT or "/") / f"tmp/rabbitkeys-cluster-{PORT_BASE}"
    asyncio.run(probe(RabbitCluster(directory, port_base=PORT_BASE, root=ROOT)))


if __name__ == "__main__":
    main()

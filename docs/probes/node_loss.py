# Probe (issue 14): what a RabbitMQ cluster does to clients when a node is killed (kill -9)
# under traffic, for classic and quorum queues. Six queues spread over three nodes, a
# consumer on node 3's connection, a confirming publisher (mandatory, through a direct
# exchange, as rabbitkeys publishes) on node 1's; node 2 is killed, then restarted.
#
#   python docs/probes/node_loss.py [classic|quorum]     (as root: it starts its own cluster)
#
# Prints, per node: the publish outcomes during the outage and after the return, the
# declare errors for a queue on the lost node, the consumer cancels, and at the end per
# queue: confirmed, received, still queued. Measured on 3.10.8 (docs/internals/broker.md, "On a
# RabbitMQ cluster"): classic: in-flight publishes nacked, later ones returned unrouted,
# declares refused "home node ... is down or inaccessible", consumers cancelled, queues back
# with messages and bindings; quorum: nothing nacked or cancelled, a new leader in ~1 s.
import asyncio
import collections
import sys
import time
from pathlib import Path

import aio_pika
import aiormq

from rabbitkeys.tools.rabbit_cluster import RabbitCluster

QUEUE_TYPE = sys.argv[1] if len(sys.argv) > 1 else "classic"
PORT_BASE = 5860
T0 = time.monotonic()


def now() -> str:
    return f"{time.monotonic() - T0:6.2f}s"


async def probe(cluster: RabbitCluster) -> None:
    urls = cluster.amqp_urls()
    publishing, consuming = await aio_pika.connect(urls[0]), await aio_pika.connect(urls[2])
    setup = await publishing.channel()
    exchange = await setup.declare_exchange("probe.loss", "direct", durable=True)
    locator = (
        {"x-queue-master-locator": "random"}
        if QUEUE_TYPE == "classic"
        else {"x-queue-leader-locator": "balanced"}
    )
    arguments = {"x-queue-type": QUEUE_TYPE, "x-single-active-consumer": True, **locator}
    names = []
    for i in range(6):
        queue = await setup.declare_queue(f"probe.loss.{i}", durable=True, arguments=arguments)
        await queue.bind(exchange, f"k{i}")
        names.append(queue.name)
    await asyncio.sleep(1)
    where = cluster.queue_nodes("/", "probe.loss.")
    print("queues per node:", dict(collections.Counter(where.values())))
    cancels: list[str] = []
    got: dict[str, list[int]] = collections.defaultdict(list)
    channel = await consuming.channel()
    await channel.set_qos(prefetch_count=10)
    underlay = await channel.get_underlay_channel()
    underlay.on_consumer_cancel_callbacks.add(lambda frame: cancels.append(now()))
    for name in names:
        async def handle(message: aio_pika.abc.AbstractIncomingMessage, name: str = name) -> None:
            got[name].append(int(message.body))
            await message.ack()

        await (await channel.get_queue(name, ensure=False)).consume(handle)
    confirms = await publishing.channel(publisher_confirms=True)
    target = await confirms.get_exchange("probe.loss", ensure=False)
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    acked: dict[str, list[int]] = collections.defaultdict(list)
    stop = False

    async def publish(i: int) -> None:
        name, n = names[i], 0
        while not stop:
            try:
                answer = await asyncio.wait_for(
                    target.publish(aio_pika.Message(str(n).encode(), delivery_mode=2), f"k{i}",
                                   mandatory=True), 10)  # fmt: skip
                kind = "ack" if isinstance(answer, aiormq.spec.Basic.Ack) else "returned"
                if kind == "ack":
                    acked[name].append(n)
            except Exception as exc:
                kind = type(exc).__name__  # DeliveryError: a nack
            outcomes[(where[name], kind)] += 1
            n += 1
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(publish(i)) for i in range(6)]
    await asyncio.sleep(2)
    outcomes.clear()
    print(now(), "kill -9 of", cluster.node(2).name)
    cluster.kill(2)
    await asyncio.sleep(6)
    print(now(), "outcomes while it is down:", dict(outcomes))
    print(now(), "consumer cancels:", len(cancels))
    lost_queue = next((name for name in names if where[name] == cluster.node(2).name), None)
    if lost_queue is not None:
        for passive in (True, False):
            try:
                probe_channel = await publishing.channel()
                await probe_channel.declare_queue(
                    lost_queue, passive=passive, durable=True, arguments=arguments
                )
                print(f"declare (passive={passive}) of a queue led by it: ok")
            except Exception as exc:
                print(f"declare (passive={passive}) of a queue led by it: {exc}")
    outcomes.clear()
    await asyncio.get_running_loop().run_in_executor(None, cluster.restart, 2)
    print(now(), "node 2 is back")
    await asyncio.sleep(4)
    stop = True
    await asyncio.gather(*tasks)
    print(now(), "outcomes after its return:", dict(outcomes))
    await asyncio.sleep(2)
    listed = {q["name"]: q for q in cluster.api("queues/%2F") if q["name"] in names}
    for name in names:
        print(f"  {name} on {where[name]}: confirmed {len(acked[name])}, received "
              f"{len(got[name])}, in order {got[name] == sorted(got[name])}, still queued "
              f"{listed.get(name, {}).get('messages')}")  # fmt: skip
    await publishing.close()
    await consuming.close()


def main() -> None:
    with RabbitCluster(Path(f"/tmp/rabbitkeys-probe-cluster-{PORT_BASE}"), port_base=PORT_BASE) as c:
        asyncio.run(probe(c))


if __name__ == "__main__":
    main()

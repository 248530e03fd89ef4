"""Removing a tool's namespace (``rabbitkeys demo``, ``chaos``, ``bench --celery``) from the
broker when its run ends, against the broker."""

from __future__ import annotations

import urllib.parse

import aio_pika

from rabbitkeys._broker.control import declare_control_topology
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments
from rabbitkeys.tools.namespace import remove_namespace

from ..conftest import Broker
from ..support import make_settings


def _left(broker: Broker, vhost: str, namespace: str) -> tuple[list[str], list[str]]:
    """The namespace's queues and exchanges still on the broker."""
    quoted = urllib.parse.quote(vhost, safe="")
    queues = broker.api(f"queues/{quoted}?columns=name")
    exchanges = broker.api(f"exchanges/{quoted}?columns=name")
    return (
        sorted(q["name"] for q in queues if q["name"].startswith(f"{namespace}.")),
        sorted(e["name"] for e in exchanges if e["name"].startswith(f"{namespace}.")),
    )


async def _make_namespace(amqp_url: str, names: Names) -> str:
    """What a registry and one key leave: the control names and a key queue."""
    key_queue = names.key_queue(KeyRef.of("post A"))
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await declare_control_topology(connection, channel, names, "classic")
        await channel.declare_queue(key_queue, durable=True, arguments=key_queue_arguments(120))
    return key_queue


async def test_a_namespace_is_removed_whole(
    broker: Broker, amqp_url: str, session_vhost: str, namespace: str
) -> None:
    await _make_namespace(amqp_url, Names(namespace))
    await remove_namespace(make_settings(amqp_url, namespace))
    assert _left(broker, session_vhost, namespace) == ([], [])


async def test_without_the_management_api_the_control_queues_still_go(
    broker: Broker, amqp_url: str, session_vhost: str, namespace: str
) -> None:
    """A broker on another AMQP port than 5672 and no RABBITKEYS_MANAGEMENT_URL: the
    management API is guessed at port 15672, another broker's or nobody's. The durable
    control queues (which never expire) and the exchanges go by name all the same; only the
    key queue, which nothing lists, is left to its x-expires."""
    key_queue = await _make_namespace(amqp_url, Names(namespace))
    settings = make_settings(amqp_url, namespace, management_url="http://127.0.0.1:1")
    await remove_namespace(settings)
    assert _left(broker, session_vhost, namespace) == ([key_queue], [])

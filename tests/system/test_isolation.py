"""Each test session runs in a vhost of its own, and what a vhost changes for rabbitkeys.

The rabbitmq_event_exchange plugin publishes the events of every vhost into
``amq.rabbitmq.event`` of ONE vhost (``event_exchange.vhost``, default ``/``;
``docs/probes/event_exchange_vhost.py``). A registry in the default vhost hears at once that
a killed worker's inbox is gone; a registry in any other vhost finds no such exchange and
notices the death after ``worker_timeout`` without heartbeat. Both paths are shown here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import uuid
from collections.abc import Iterator

import aio_pika
import aiormq
import pytest

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys._broker.control import control_message
from rabbitkeys._wire.protocol import WorkerJoin
from rabbitkeys._wire.topology import Names
from rabbitkeys.tools.cluster import LocalCluster

from ..conftest import Broker, _remove_vhosts_of_dead_sessions, delete_namespace
from ..support import eventually, make_settings, running_registry, running_worker, skip_or_fail

EVENTS = "amq.rabbitmq.event"


def _vhost_queues(broker: Broker, vhost: str) -> set[str]:
    quoted = urllib.parse.quote(vhost, safe="")
    return {q["name"] for q in broker.api(f"queues/{quoted}?columns=name")}


async def test_the_session_runs_in_a_vhost_of_its_own(
    broker: Broker, session_vhost: str, amqp_url: str, namespace: str
) -> None:
    assert session_vhost != "/"
    assert urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) == session_vhost
    name = f"{namespace}.probe"
    connection = await aio_pika.connect(amqp_url)
    try:
        await (await connection.channel()).declare_queue(name, durable=True)
    finally:
        await connection.close()
    assert name in await asyncio.to_thread(_vhost_queues, broker, session_vhost)
    assert name not in await asyncio.to_thread(_vhost_queues, broker, "/")


def test_a_vhost_left_by_a_dead_session_is_removed_and_a_live_sessions_kept(
    broker: Broker,
) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    host = socket.gethostname()
    made = {
        f"rabbitkeys-test-dead-{uuid.uuid4().hex[:6]}": int(dead.stdout),
        f"rabbitkeys-test-live-{uuid.uuid4().hex[:6]}": os.getpid(),
    }
    try:
        for name, pid in made.items():
            description = f"rabbitkeys test session: pid {pid} on {host}"
            broker.api(f"vhosts/{name}", "PUT", {"description": description})
        _remove_vhosts_of_dead_sessions(broker)
        left = {item["name"] for item in broker.api("vhosts?columns=name")}
        assert [name for name in made if name in left] == [n for n in made if "-live-" in n]
    finally:
        for name in made:
            with contextlib.suppress(urllib.error.HTTPError):
                broker.api(f"vhosts/{name}", "DELETE")


async def test_the_event_exchange_is_in_the_default_vhost_only(
    broker: Broker, amqp_url: str
) -> None:
    """What the registry meets: in the session's vhost a passive declare of the event
    exchange is refused, in ``/`` it exists (when the plugin is enabled)."""
    root = await aio_pika.connect(broker.url_in("/"))
    try:
        await (await root.channel()).declare_exchange(EVENTS, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        skip_or_fail("rabbitmq-plugins enable rabbitmq_event_exchange: the registry needs it")
    finally:
        await root.close()
    connection = await aio_pika.connect(amqp_url)
    try:
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await (await connection.channel()).declare_exchange(EVENTS, passive=True)
    finally:
        await connection.close()


@pytest.fixture
def root_namespace(broker: Broker) -> Iterator[str]:
    """A namespace in the broker's own vhost, removed afterwards (only what it created)."""
    name = f"t-root-{uuid.uuid4().hex[:8]}"
    yield name
    delete_namespace(broker, "/", name)


@pytest.mark.processes
async def test_in_the_default_vhost_a_killed_worker_is_noticed_through_the_event_exchange(
    broker: Broker, root_namespace: str
) -> None:
    """With ``worker_timeout`` at ten minutes, only the event (its inbox deleted with its
    connection) can tell the registry that the worker is gone."""
    settings = make_settings(broker.url_in("/"), root_namespace, worker_timeout=600.0)
    async with running_registry(settings) as registry, LocalCluster(settings) as cluster:
        worker = await cluster.start_worker("rabbitkeys.tools.demo:app")
        await eventually(lambda: len(registry._book.workers) == 1, timeout=30)
        worker.kill()
        await worker.wait()
        await eventually(lambda: not registry._book.workers, timeout=60)


@pytest.mark.processes
async def test_in_another_vhost_a_killed_worker_is_noticed_by_its_missing_heartbeat(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace)  # worker_timeout 1.5 s
    async with running_registry(settings) as registry, LocalCluster(settings) as cluster:
        worker = await cluster.start_worker("rabbitkeys.tools.demo:app")
        await eventually(lambda: len(registry._book.workers) == 1, timeout=30)
        worker.kill()
        await worker.wait()
        await eventually(lambda: not registry._book.workers, timeout=60)


async def test_a_new_registry_adopts_unconsumed_key_queues_through_the_management_api(
    settings: Settings,
) -> None:
    """The rebuild reads the session's vhost, not ``/``: a registry that starts with no
    state, no worker to answer ``Sync`` and no publisher asking, learns the keys from the
    broker's listing alone; a worker then handles their messages in order."""
    handled: dict[str, list[int]] = {"a": [], "b": []}
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    async with running_registry(settings), Publisher(settings) as publisher:
        for n in range(3):
            await asyncio.gather(*(publisher.publish(k, str(n).encode()) for k in handled))
    async with running_registry(settings) as fresh:
        await eventually(lambda: {k.ref.key for k in fresh._book.keys.values()} == set(handled), 30)
        async with running_worker(settings, app):
            await eventually(lambda: sum(map(len, handled.values())) == 6)
    assert handled == {"a": [0, 1, 2], "b": [0, 1, 2]}


async def test_a_registry_ignores_the_events_of_another_vhost(
    broker: Broker, root_namespace: str, amqp_url: str
) -> None:
    """Events carry their vhost: a queue of the same name deleted in another vhost (the same
    namespace used twice on one broker) must not drop our worker."""
    settings = make_settings(broker.url_in("/"), root_namespace, worker_timeout=600.0)
    names = Names(root_namespace)
    app = App()

    @app.handler()
    async def handle(message: Message) -> None:
        pass

    async with running_registry(settings) as registry, running_worker(settings, app) as worker:
        await eventually(lambda: worker.worker_id in registry._book.workers, timeout=30)
        root = await aio_pika.connect(broker.url_in("/"))
        other = await aio_pika.connect(amqp_url)
        try:
            # a marker worker in "/", whose inbox the test deletes last: once the registry has
            # dropped it, the event before it (the broker emits them in order) was handled
            in_root = await root.channel()
            # exclusive, as a worker's inbox is (RabbitMQ 4.3 refuses a transient shared queue)
            await in_root.declare_queue(names.worker_inbox("marker"), exclusive=True)
            join = WorkerJoin(
                worker_id="marker",
                session="0" * 32,
                inbox=names.worker_inbox("marker"),
                job_types=["default"],
            )
            membership = await in_root.get_exchange(names.membership_exchange)
            await membership.publish(control_message(join, user_id="guest"), routing_key="")
            await eventually(lambda: "marker" in registry._book.workers)
            # the live worker's inbox name, in the session's vhost: created and deleted
            in_other = await other.channel()
            await in_other.declare_queue(names.worker_inbox(worker.worker_id), exclusive=True)
            await in_other.queue_delete(names.worker_inbox(worker.worker_id))
            await in_root.queue_delete(names.worker_inbox("marker"))
            await eventually(lambda: "marker" not in registry._book.workers)
            assert worker.worker_id in registry._book.workers
        finally:
            await root.close()
            await other.close()

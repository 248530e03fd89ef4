"""The trust model, tried against the real broker: every party connects as its own user
(``role_users``), a registry and a worker run in-process as theirs, a victim publisher
publishes, and an attacker, a plain aio-pika client holding a publisher's or a worker's
credential, tries each forgery of issue 11 and every control message type.

Each attempt is refused by the broker (ACCESS_REFUSED, PRECONDITION_FAILED) or by the
runtime (counted per reason on ``refused`` and in
``rabbitkeys_refused_control_messages_total``), and afterwards order, ownership (which
worker consumes which key), leadership and data (every confirmed victim message handled once,
in order) are as before. docs/internals/admin.md, "The trust model", points here claim by claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Publisher, Registry, SyncPublisher, Worker
from rabbitkeys._admin.permissions import Role, permissions_for
from rabbitkeys._admin.status import fetch_status
from rabbitkeys._broker.amqp import passive_declare_refusal
from rabbitkeys._broker.control import declare_control_topology, topology_exists
from rabbitkeys._registry.redrive import read_dead_letters, rearrange, skip_head
from rabbitkeys._wire.envelope import (
    HEADER_ERROR,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_PUBLISHER,
    HEADER_SEQUENCE,
)
from rabbitkeys._wire.topology import (
    HOLD_PARKED,
    HOLD_PAUSED,
    KeyRef,
    Names,
    key_queue_arguments,
    new_routing_key,
)

from ..conftest import Broker
from ..support import eventually, running_registry, running_worker
from ..trust_support import (
    REQUESTS,
    WORKER_REPORTS,
    Attacker,
    RoleUsers,
    assignment,
    attacker,
    control,
    forged_messages,
    session,
    settings_as,
)

#: the victim's key: its messages must be handled once each, in order, whatever is forged
VICTIM_KEY = "account-7"
KEY_ID = f"default/{VICTIM_KEY}"
#: victim messages sent before each attack and again after it
BATCH = 5


@dataclass
class Scene:
    """A registry, a worker and a victim publisher, each as its own user, with the victim's
    key owned by the worker and its first messages handled."""

    broker: Broker
    vhost: str
    users: RoleUsers
    names: Names
    registry: Registry
    registry_metrics: CollectorRegistry
    worker: Worker
    worker_metrics: CollectorRegistry
    publisher: Publisher
    #: (key, body, publisher id) of every handling, in handling order
    handled: list[tuple[str, bytes, str | None]]
    #: the broker-checked user each body was published by (Message.user_id)
    users_of: dict[bytes, str | None]
    sent: int = 0
    owners: dict[str, str | None] = field(default_factory=dict)

    @property
    def key_queue(self) -> str:
        return f"{self.names.namespace}.key.default.{VICTIM_KEY}"

    async def send(self, count: int = BATCH) -> None:
        """The victim publishes ``count`` more messages; each confirmed."""
        first, self.sent = self.sent, self.sent + count
        await asyncio.gather(
            *(self.publisher.publish(VICTIM_KEY, f"v{n}".encode()) for n in range(first, self.sent))
        )

    def victim_bodies(self) -> list[bytes]:
        return [body for _, body, _ in self.handled if body.startswith(b"v")]

    async def settled(self) -> None:
        """Every victim message sent so far is handled: once each, in order, as its key."""
        await eventually(lambda: len(self.victim_bodies()) >= self.sent)
        assert self.victim_bodies() == [f"v{n}".encode() for n in range(self.sent)]
        assert {key for key, body, _ in self.handled if body.startswith(b"v")} == {VICTIM_KEY}

    def ownership(self) -> dict[str, str | None]:
        """Which worker owns which key, in the registry's book."""
        return {key_id: key.owner for key_id, key in self.registry._book.keys.items()}

    async def consumer_users(self, queue: str) -> list[str]:
        """The user of each consumer of ``queue``, per the management API (which lists
        consumers from its statistics: seconds late; a consumer whose channel's statistics
        have not come in yet has empty ``channel_details`` and is left out until they do)."""
        vhost = urllib.parse.quote(self.vhost, safe="")
        consumers = await asyncio.to_thread(self.broker.api, f"consumers/{vhost}")
        return sorted(
            c["channel_details"]["user"]
            for c in consumers
            if c["queue"]["name"] == queue and isinstance(c["channel_details"], dict)
        )

    async def consumer_count(self, queue: str) -> int:
        """How many consumers ``queue`` has now, per the broker (a passive declare)."""
        connection = await aio_pika.connect(self.users.registry.url)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.consumer_count is not None
            return declared.declaration_result.consumer_count
        finally:
            await connection.close()

    async def unaffected(self) -> None:
        """Leadership, ownership, order and data are what they were before the attack."""
        assert self.registry.is_leader
        assert self.worker.worker_id in self.registry._book.workers
        assert self.ownership() == self.owners
        assert self.worker.owned_keys == [KEY_ID]
        assert await self.consumer_count(self.key_queue) == 1
        await self.send()
        await self.settled()
        assert self.ownership() == self.owners

    def registry_refused(self, reason: str) -> int:
        return _refusals(self.registry, self.registry_metrics, reason)

    def worker_refused(self, reason: str) -> int:
        return _refusals(self.worker, self.worker_metrics, reason)


def _refusals(party: Registry | Worker, metrics: CollectorRegistry, reason: str) -> int:
    """What ``party`` counted as refused for ``reason``: its ``refused`` counter, which the
    metric must agree with."""
    counted = party.refused[reason]
    exported = metrics.get_sample_value(
        "rabbitkeys_refused_control_messages_total", {"reason": reason}
    )
    assert exported == counted, (reason, exported, counted)
    return counted


@pytest.fixture
async def scene(
    broker: Broker, session_vhost: str, role_users: RoleUsers, namespace: str
) -> AsyncIterator[Scene]:
    handled: list[tuple[str, bytes, str | None]] = []
    app = App()

    users: dict[bytes, str | None] = {}

    @app.handler()
    async def record(message: Message) -> None:
        handled.append((message.key, message.body, message.publisher_id))
        users[message.body] = message.user_id

    registry_metrics, worker_metrics = CollectorRegistry(), CollectorRegistry()
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(
            running_registry(
                settings_as(role_users.registry.url, namespace),
                metrics_registry=registry_metrics,
            )
        )
        worker = await stack.enter_async_context(
            running_worker(
                settings_as(role_users.worker.url, namespace),
                app,
                metrics_registry=worker_metrics,
            )
        )
        await eventually(lambda: worker.worker_id in registry._book.workers)
        publisher = await stack.enter_async_context(
            Publisher(
                settings_as(role_users.publisher.url, namespace),
                metrics_registry=CollectorRegistry(),
            )
        )
        scene = Scene(
            broker,
            session_vhost,
            role_users,
            Names(namespace),
            registry,
            registry_metrics,
            worker,
            worker_metrics,
            publisher,
            handled,
            users,
        )
        await scene.send()
        await scene.settled()
        await eventually(lambda: worker.owned_keys == [KEY_ID])
        scene.owners = scene.ownership()
        assert scene.owners == {KEY_ID: worker.worker_id}
        assert await scene.consumer_count(scene.key_queue) == 1
        yield scene


@pytest.fixture
async def mallory(scene: Scene) -> AsyncIterator[Attacker]:
    """An attacker holding a publisher credential of its own (not the victim's user)."""
    user = scene.users.add(Role.PUBLISHER, "mallory")
    async with attacker(user, scene.names) as connected:
        yield connected


# --- a publisher's credential -----------------------------------------------------------


async def test_a_publisher_can_send_no_control_message_on_any_other_exchange(
    scene: Scene, mallory: Attacker
) -> None:
    """Every control message type, on every exchange but NS.requests and straight into
    every control queue: the broker refuses each (no write permission)."""
    names = scene.names
    inbox = names.worker_inbox(scene.worker.worker_id)
    destinations = [
        (names.membership_exchange, ""),
        (names.commands_exchange, names.worker_route(scene.worker.worker_id, scene.worker._secret)),
        (names.commands_exchange, names.all_workers_route),
        (names.replies_exchange, names.reply_queue("0123456789abcdef")),
        (names.dead_letter_exchange, ""),
        ("", names.registry_queue),
        ("", inbox),
        ("", scene.key_queue),
    ]
    forged = forged_messages(names, scene.worker.worker_id, VICTIM_KEY)
    for kind, payload in forged.items():
        for exchange, routing_key in destinations:
            message = control(payload, user_id=mallory.user.name)
            error = await mallory.publish_refused(exchange, message, routing_key)
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), (kind, exchange)
    await scene.unaffected()


@pytest.mark.parametrize("kind", WORKER_REPORTS)
async def test_a_worker_report_from_a_publisher_is_refused_by_the_registry(
    scene: Scene, mallory: Attacker, kind: str
) -> None:
    """A forged WorkerLeave / WorkerJoin / WorkerHeartbeat (with the victim's key idle) /
    Released for the live worker, through the one exchange a publisher may write: the
    registry sees it came through NS.requests and refuses it (wrong_exchange)."""
    payload = forged_messages(scene.names, scene.worker.worker_id, VICTIM_KEY)[kind]
    before = scene.registry_refused("wrong_exchange")
    message = control(payload, user_id=mallory.user.name)
    await mallory.publish(scene.names.requests_exchange, message)
    await eventually(lambda: scene.registry_refused("wrong_exchange") == before + 1)
    await scene.unaffected()


async def test_a_control_message_without_user_id_is_refused_by_the_registry(
    scene: Scene, mallory: Attacker
) -> None:
    """Without ``user_id`` the broker vouches for no sender: even a request is refused."""
    before = scene.registry_refused("no_user_id")
    forged = forged_messages(scene.names, scene.worker.worker_id, VICTIM_KEY)
    for kind in ("worker_leave", "ensure_key"):
        await mallory.publish(scene.names.requests_exchange, control(forged[kind]))
    await eventually(lambda: scene.registry_refused("no_user_id") == before + 2)
    await scene.unaffected()


async def test_commands_and_replies_sent_to_the_registry_are_refused(
    scene: Scene, mallory: Attacker
) -> None:
    """Assign, Release, Sync and the replies (Ensured, Refused, Status) are no requests:
    the registry refuses each one a publisher sends it (counted as malformed)."""
    forged = forged_messages(scene.names, scene.worker.worker_id, VICTIM_KEY)
    kinds = [kind for kind in forged if kind not in REQUESTS and kind not in WORKER_REPORTS]
    assert kinds == ["assign", "release", "sync", "ensured", "refused", "status"]
    before = scene.registry_refused("malformed")
    for kind in kinds:
        message = control(forged[kind], user_id=mallory.user.name)
        await mallory.publish(scene.names.requests_exchange, message)
    await eventually(lambda: scene.registry_refused("malformed") == before + len(kinds))
    await scene.unaffected()


async def test_a_publisher_cannot_read_the_registry_queue_or_a_key_queue(
    scene: Scene, mallory: Attacker
) -> None:
    """Consuming, getting or purging NS.registry or a key queue, and declaring, binding or
    deleting either: all refused (a publisher may read and configure only its reply queue)."""
    names = scene.names
    for queue in (names.registry_queue, scene.key_queue):
        for action in _queue_takeovers(queue, names.jobs_exchange("default")):
            await mallory.refused(action)
    await scene.unaffected()


async def test_a_reply_to_that_is_not_a_reply_queue_is_refused(
    scene: Scene, mallory: Attacker
) -> None:
    """An EnsureKey whose ``reply_to`` names a key queue (the registry's ``ensured`` reply
    would run as a job), the registry's queue or a worker's inbox: refused (bad_reply_to),
    nothing lands in those queues."""
    names = scene.names
    targets = [scene.key_queue, names.registry_queue, names.worker_inbox(scene.worker.worker_id)]
    before = scene.registry_refused("bad_reply_to")
    for reply_to in targets:
        request = {"type": "ensure_key", "job_type": "default", "key": VICTIM_KEY}
        message = control(
            request, user_id=mallory.user.name, reply_to=reply_to, correlation_id="c1"
        )
        await mallory.publish(names.requests_exchange, message)
    await eventually(lambda: scene.registry_refused("bad_reply_to") == before + len(targets))
    await scene.unaffected()
    assert all(body.startswith(b"v") for _, body, _ in scene.handled)


async def test_raw_publishes_into_a_key_queue_cannot_pass_for_the_victims_messages(
    scene: Scene, mallory: Attacker
) -> None:
    """Issue 11's worst forgery: messages in the victim's key queue carrying the victim
    publisher's id and its next sequence numbers, with a key header of another key.

    Through the default exchange the broker refuses them. Through the jobs exchange, with the
    routing key any publisher can get from EnsureKey, they arrive (a publisher may publish
    to any key), but dedup knows messages by (user, publisher id): the victim's next five
    confirmed messages are not dropped as copies, and the forged ones run as the queue's key,
    not the header's."""
    names = scene.names
    next_sequence = scene.publisher._next_sequence
    victim_id = scene.publisher.publisher_id

    def forged(n: int, **properties: Any) -> aio_pika.Message:
        headers = {
            HEADER_KEY: "account-8",  # another key of the victim's
            HEADER_JOB_TYPE: "default",
            HEADER_PUBLISHER: victim_id,
            HEADER_SEQUENCE: next_sequence + n,
        }
        return aio_pika.Message(f"f{n}".encode(), headers=headers, **properties)

    error = await mallory.publish_refused("", forged(0, user_id=mallory.user.name), scene.key_queue)
    assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)

    routing_key = await mallory.ensure(VICTIM_KEY)
    for n in range(BATCH):
        await mallory.publish(
            names.jobs_exchange("default"), forged(n, user_id=mallory.user.name), routing_key
        )
    # the victim's next messages take exactly the sequence numbers forged above
    await scene.send()
    await scene.settled()
    assert scene.publisher._next_sequence == next_sequence + BATCH
    await eventually(lambda: len(scene.handled) == scene.sent + BATCH)
    forged_runs = [(key, body) for key, body, _ in scene.handled if body.startswith(b"f")]
    assert forged_runs == [(VICTIM_KEY, f"f{n}".encode()) for n in range(BATCH)]
    assert scene.worker.duplicates_dropped == 0
    # a handler sees who really sent each: the header's publisher id, the broker's user
    assert {scene.users_of[f"f{n}".encode()] for n in range(BATCH)} == {mallory.user.name}
    assert scene.users_of[b"v0"] == scene.users.publisher.name
    await scene.unaffected()


async def test_raw_publishes_without_user_id_cannot_pass_for_the_victims_messages(
    scene: Scene, mallory: Attacker
) -> None:
    """The same forgery without ``user_id`` (which the broker lets through unchecked): the
    victim's messages are still all handled, once each and in order."""
    next_sequence = scene.publisher._next_sequence
    routing_key = await mallory.ensure(VICTIM_KEY)
    for n in range(BATCH):
        headers = {
            HEADER_KEY: VICTIM_KEY,
            HEADER_PUBLISHER: scene.publisher.publisher_id,
            HEADER_SEQUENCE: next_sequence + n,
        }
        message = aio_pika.Message(f"f{n}".encode(), headers=headers)
        await mallory.publish(scene.names.jobs_exchange("default"), message, routing_key)
    await scene.send()
    await scene.settled()
    assert scene.worker.duplicates_dropped == 0
    await scene.unaffected()


async def test_a_publisher_claiming_the_victims_binding_stale_costs_it_order_nothing(
    scene: Scene, mallory: Attacker
) -> None:
    """An EnsureKey may name a routing key as stale (what a publisher whose message came
    back sends); any publisher may name the victim's. At worst the binding is renewed and
    the victim's next messages come back and are sent again: still each once, in order."""
    current = scene.registry._book.keys[KEY_ID].routing_key
    assert current is not None
    await mallory.ensure(VICTIM_KEY, stale_routing_key=current)
    await scene.unaffected()


async def test_a_publisher_cannot_publish_as_another_user(scene: Scene, mallory: Attacker) -> None:
    """A ``user_id`` naming anyone but the connection's user: the broker closes the channel
    (PRECONDITION_FAILED), for requests and for job messages alike."""
    names = scene.names
    routing_key = await mallory.ensure(VICTIM_KEY)
    request = {"type": "ensure_key", "job_type": "default", "key": "k"}
    for user in (scene.users.registry, scene.users.worker, scene.users.publisher):
        error = await mallory.publish_refused(
            names.requests_exchange, control(request, user_id=user.name)
        )
        assert isinstance(error, aiormq.exceptions.ChannelPreconditionFailed)
        job = aio_pika.Message(b"f", user_id=user.name, headers={HEADER_KEY: VICTIM_KEY})
        error = await mallory.publish_refused(names.jobs_exchange("default"), job, routing_key)
        assert isinstance(error, aiormq.exceptions.ChannelPreconditionFailed)
    await scene.unaffected()


@pytest.mark.parametrize("role", [Role.PUBLISHER, Role.WORKER], ids=["publisher", "worker"])
async def test_no_publisher_or_worker_can_take_the_leader_lock(
    role_users: RoleUsers, namespace: str, role: Role
) -> None:
    """Declaring NS.registry.leader before any registry runs (which used to stop every
    registry from leading) is refused; the registry then leads."""
    names = Names(namespace)
    async with attacker(role_users.of(role), names) as squatter:
        error = await squatter.refused(
            lambda channel: channel.declare_queue(names.leader_lock, exclusive=True)
        )
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)
        settings = settings_as(role_users.registry.url, namespace)
        async with running_registry(settings, metrics_registry=CollectorRegistry()) as registry:
            assert registry.is_leader
            error = await squatter.refused(
                lambda channel: channel.declare_queue(names.leader_lock, passive=False)
            )
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)
            assert registry.is_leader


# --- a worker's credential --------------------------------------------------------------


async def test_a_worker_cannot_bind_unbind_or_delete_a_key_queue(scene: Scene) -> None:
    """A worker consumes key queues but may not bind one (steal a key's traffic), unbind it,
    delete it, declare it, nor declare or delete a jobs exchange: only the registry may."""
    names = scene.names
    jobs = names.jobs_exchange("default")
    routing_key = scene.registry._book.keys[KEY_ID].routing_key
    assert routing_key is not None
    queue, key_queue = names.registry_queue, scene.key_queue

    async def bind(channel: AbstractChannel) -> None:
        await (await channel.get_queue(key_queue, ensure=False)).bind(jobs, routing_key="stolen")

    async def unbind(channel: AbstractChannel) -> None:
        await (await channel.get_queue(key_queue, ensure=False)).unbind(
            jobs, routing_key=routing_key
        )

    actions = [
        bind,
        unbind,
        lambda channel: channel.queue_delete(key_queue),
        lambda channel: channel.declare_queue(key_queue, durable=True, arguments=None),
        lambda channel: channel.declare_exchange(jobs, aio_pika.ExchangeType.DIRECT),
        lambda channel: channel.exchange_delete(jobs),
        lambda channel: channel.queue_delete(queue),
    ]
    async with attacker(scene.users.worker, names) as worker:
        for action in actions:
            error = await worker.refused(action)
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)
    await scene.unaffected()


async def test_a_worker_cannot_read_the_registry_queue_nor_send_requests_commands_or_replies(
    scene: Scene,
) -> None:
    names = scene.names
    forged = forged_messages(names, scene.worker.worker_id, VICTIM_KEY)
    async with attacker(scene.users.worker, names) as worker:
        for action in _queue_takeovers(names.registry_queue, names.requests_exchange):
            await worker.refused(action)
        sends = [
            (names.requests_exchange, "", "ensure_key"),
            (names.requests_exchange, "", "status_request"),
            (
                names.commands_exchange,
                names.worker_route(scene.worker.worker_id, scene.worker._secret),
                "assign",
            ),
            (names.commands_exchange, names.all_workers_route, "release"),
            (names.commands_exchange, names.all_workers_route, "sync"),
            (names.replies_exchange, names.reply_queue("0123456789abcdef"), "ensured"),
            ("", names.registry_queue, "worker_leave"),
            ("", scene.key_queue, "ensured"),
        ]
        for exchange, routing_key, kind in sends:
            message = control(forged[kind], user_id=worker.user.name)
            error = await worker.publish_refused(exchange, message, routing_key)
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), (exchange, kind)
    await scene.unaffected()


@pytest.mark.parametrize("same_user", [True, False], ids=["same-user", "other-user"])
@pytest.mark.parametrize("kind", WORKER_REPORTS)
async def test_a_worker_speaks_only_for_itself(scene: Scene, kind: str, same_user: bool) -> None:
    """A WorkerJoin, heartbeat (the victim's key idle), Released or WorkerLeave with the live
    worker's id, through NS.membership, from another worker process: with the same worker
    user (another session) or another worker user. The registry refuses it
    (impersonation): the live worker keeps its id, its keys and its job types."""
    user = scene.users.worker if same_user else scene.users.add(Role.WORKER, "mallory")
    payload = forged_messages(scene.names, scene.worker.worker_id, VICTIM_KEY)[kind]
    if kind == "worker_join":
        payload["job_types"] = ["default", "other"]
    before = scene.registry_refused("impersonation")
    async with attacker(user, scene.names) as impostor:
        message = control(payload, user_id=user.name)
        await impostor.publish(scene.names.membership_exchange, message)
        await eventually(lambda: scene.registry_refused("impersonation") == before + 1)
    assert scene.registry._book.workers[scene.worker.worker_id].job_types == {"default"}
    await scene.unaffected()


async def test_a_worker_cannot_release_retire_or_claim_a_key_it_does_not_own(
    scene: Scene,
) -> None:
    """A worker speaking for itself (its own id and session, joined with a job type of its
    own) reports the victim's key idle, released, and among the keys it consumes: the
    registry acts on reports about a key only from the key's owner."""
    names = scene.names
    user = scene.users.add(Role.WORKER, "mallory")
    own = {"worker_id": "mallory", "session": session()}
    victim_key = [assignment(names, VICTIM_KEY)]
    reports = [
        {"type": "worker_join", **own, "inbox": names.worker_inbox("mallory")}
        | {"job_types": ["other"], "keys": []},
        {"type": "worker_heartbeat", **own, "idle_keys": [KEY_ID]},
        {"type": "released", **own, "keys": victim_key},
        {"type": "worker_join", **own, "inbox": names.worker_inbox("mallory")}
        | {"job_types": ["other"], "keys": victim_key},
        {"type": "worker_leave", **own},
    ]
    async with attacker(user, names) as mallory:
        for report in reports:
            await mallory.publish(names.membership_exchange, control(report, user_id=user.name))
            if report["type"] == "worker_join":
                await eventually(lambda: "mallory" in scene.registry._book.workers)
    # the registry takes one message at a time, in order: the leave came last
    await eventually(lambda: "mallory" not in scene.registry._book.workers)
    assert sum(scene.registry.refused.values()) == 0
    await scene.unaffected()


async def test_a_worker_keeps_its_id_across_a_registry_failover(
    role_users: RoleUsers, namespace: str
) -> None:
    """A new leader knows no sessions: a join queued by an impostor (the same worker user,
    another session) while no registry led is heard first and pins the id. The real
    worker's own reports then conflict; its session is the one bound to the worker's
    exclusive inbox (which only the inbox's connection can bind), so it takes the id over
    and the impostor's heartbeats are refused from then on."""
    names = Names(namespace)
    app = App()

    @app.handler()
    async def ignore(message: Message) -> None:
        pass

    registry_settings = settings_as(role_users.registry.url, namespace)
    async with running_worker(
        settings_as(role_users.worker.url, namespace), app, metrics_registry=CollectorRegistry()
    ) as worker:
        async with running_registry(registry_settings, metrics_registry=CollectorRegistry()) as a:
            await eventually(lambda: worker.worker_id in a._book.workers)
        # no registry leads: a join for the live worker's id, from another session of the
        # same worker user, waits in NS.registry for the next leader
        stolen = {"worker_id": worker.worker_id, "session": session()}
        join = {"type": "worker_join", **stolen, "inbox": names.worker_inbox(worker.worker_id)}
        async with attacker(role_users.worker, names) as impostor:
            message = control(join | {"job_types": ["default"]}, user_id=role_users.worker.name)
            await impostor.publish(names.membership_exchange, message)
            async with running_registry(
                registry_settings, metrics_registry=CollectorRegistry()
            ) as b:
                real = (role_users.worker.name, worker._secret)
                # the impostor keeps the id alive, as a live worker would
                beat = {"type": "worker_heartbeat", **stolen}

                async def keep_alive() -> None:
                    while True:
                        await impostor.publish(
                            names.membership_exchange,
                            control(beat, user_id=role_users.worker.name),
                        )
                        await asyncio.sleep(0.2)

                beating = asyncio.create_task(keep_alive())
                try:
                    await eventually(
                        lambda: b._sessions._pins.get(worker.worker_id) == real, timeout=5
                    )
                    await eventually(lambda: b.refused["impersonation"] >= 1)
                    assert worker.worker_id in b._book.workers and worker.ready
                finally:
                    beating.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beating


# --- what a worker obeys (commands come only from a registry's user) -----------------------


async def _command(scene: Scene, payload: dict[str, Any], **properties: Any) -> None:
    """Send ``payload`` to the live worker as a registry credential could."""
    user = scene.users.registry
    async with attacker(user, scene.names) as registry:
        await registry.publish(
            scene.names.commands_exchange,
            control(payload, **properties),
            scene.names.worker_route(scene.worker.worker_id, scene.worker._secret),
        )


async def test_a_worker_refuses_a_command_without_user_id(scene: Scene) -> None:
    before = scene.worker_refused("no_user_id")
    await _command(scene, {"type": "release", "key_ids": [KEY_ID]})
    await eventually(lambda: scene.worker_refused("no_user_id") == before + 1)
    await scene.unaffected()


async def test_a_worker_refuses_to_consume_a_queue_not_named_for_the_key(scene: Scene) -> None:
    """An Assign of the registry's queue, of another namespace's key queue, or of a key
    queue under another key's id: refused (foreign_queue), nothing consumed."""
    names = scene.names
    registry_user = scene.users.registry.name
    foreign = [
        assignment(names, "k1", queue=names.registry_queue),
        assignment(names, "k2", queue="other.key.default.k2"),
        assignment(names, "k3", queue=scene.key_queue),
    ]
    before = scene.worker_refused("foreign_queue")
    await _command(scene, {"type": "assign", "keys": foreign}, user_id=registry_user)
    await eventually(lambda: scene.worker_refused("foreign_queue") == before + len(foreign))
    assert await scene.consumer_count(names.registry_queue) == 1  # the registry's
    await scene.unaffected()


async def test_a_worker_refuses_a_job_type_it_does_not_serve(scene: Scene) -> None:
    assigned = assignment(scene.names, "k1", job_type="emails")
    before = scene.worker_refused("job_type_not_served")
    await _command(scene, {"type": "assign", "keys": [assigned]}, user_id=scene.users.registry.name)
    await eventually(lambda: scene.worker_refused("job_type_not_served") == before + 1)
    await scene.unaffected()


async def test_a_registry_cannot_read_inboxes_or_reply_queues_nor_speak_for_a_worker(
    scene: Scene,
) -> None:
    """The registry's credential configures every shared name but no worker's inbox (it
    only sends to it, through NS.commands); reply queues match its rights (the operator
    commands run with it) but a client's is exclusive to the client's connection: refused
    too. It may not write NS.membership or NS.requests: it cannot pass for a worker or a
    client."""
    names = scene.names
    control_client = scene.publisher._control
    assert control_client is not None
    forged = forged_messages(names, scene.worker.worker_id, VICTIM_KEY)
    async with attacker(scene.users.registry, names) as registry:
        for queue, refusal in (
            # locked (its read: the check of a silent worker's inbox), or refused where its
            # rights end (binding to NS.commands, deleting)
            (
                names.worker_inbox(scene.worker.worker_id),
                (aiormq.exceptions.ChannelLockedResource, aiormq.exceptions.ChannelAccessRefused),
            ),
            (
                control_client._reply_queue,
                (aiormq.exceptions.ChannelLockedResource, aiormq.exceptions.ChannelAccessRefused),
            ),
        ):
            takeovers = _queue_takeovers(queue, names.commands_exchange)
            if refusal is not aiormq.exceptions.ChannelAccessRefused:
                # aio-pika reports a consume refused as locked as a cancelled consume; the
                # other takeovers show the same lock
                takeovers = takeovers[1:]
            for action in takeovers:
                error = await registry.refused(action)
                assert isinstance(error, refusal), (queue, action)
        for exchange, kind in [
            (names.membership_exchange, "worker_leave"),
            (names.requests_exchange, "ensure_key"),
            ("", "worker_leave"),
        ]:
            message = control(forged[kind], user_id=registry.user.name)
            error = await registry.publish_refused(exchange, message, names.registry_queue)
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), exchange
    await scene.unaffected()


# --- what stays within a principal (docs/internals/admin.md, "The trust model": limits) -----------


async def test_within_its_role_a_worker_credential_can_consume_any_key_queue(
    scene: Scene,
) -> None:
    """Consuming is reading: any holder of the worker credential may subscribe to any key
    queue of the namespace (a single-active-consumer queue keeps it standby while the
    owner consumes). The broker cannot tell two workers sharing a user apart."""
    async with attacker(scene.users.worker, scene.names) as worker:
        channel = await worker.channel()
        # no passive declare: RabbitMQ 4.2.6 and 4.3.0 refuse one without configure
        queue = await channel.get_queue(scene.key_queue, ensure=False)

        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        tag = await queue.consume(ignore)
        assert await scene.consumer_count(scene.key_queue) == 2
        # the broker lists it beside the owner's consumer, as the same user's
        await _until(scene.consumer_users, scene.key_queue, [scene.users.worker.name] * 2)
        await queue.cancel(tag)
        await channel.close()
    await scene.unaffected()


async def test_within_its_role_a_publisher_credential_can_bind_for_another_publishers_replies(
    scene: Scene, mallory: Attacker
) -> None:
    """Replies travel on NS.replies by the reply queue's name: a publisher credential that
    knows (or guesses) another client's reply queue name can bind for a copy. The copy holds
    a routing key or a status, which it could ask the registry for itself."""
    control_client = scene.publisher._control
    assert control_client is not None
    victim_reply_queue = control_client._reply_queue
    channel = await mallory.channel()
    spy = await channel.declare_queue(
        scene.names.reply_queue("spy"), exclusive=True, auto_delete=True
    )
    await spy.bind(scene.names.replies_exchange, routing_key=victim_reply_queue)
    # a new key: the victim asks the registry, whose reply is routed to both queues
    await scene.publisher.publish("account-9", b"new key")
    copy = await spy.get(no_ack=True, fail=False)
    assert copy is not None and json.loads(copy.body)["type"] == "ensured"
    await channel.close()


# --- helpers ------------------------------------------------------------------------------


async def _until(read: Any, queue: str, expected: list[str]) -> None:
    """Wait until the management API lists ``expected`` as ``queue``'s consumers' users."""
    deadline = asyncio.get_running_loop().time() + 30
    while (found := await read(queue)) != expected:
        assert asyncio.get_running_loop().time() < deadline, (queue, found, expected)
        await asyncio.sleep(0.5)


def _queue_takeovers(queue: str, exchange: str) -> list[Any]:
    """What reading, squatting or destroying ``queue`` takes: each must be refused."""

    async def consume(channel: AbstractChannel) -> None:
        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        await (await channel.get_queue(queue, ensure=False)).consume(ignore)

    async def get(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue, ensure=False)).get(fail=False)

    async def purge(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue, ensure=False)).purge()

    async def bind(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue, ensure=False)).bind(exchange, routing_key="stolen")

    return [
        consume,
        get,
        purge,
        bind,
        lambda channel: channel.declare_queue(queue, durable=True),
        lambda channel: channel.queue_delete(queue),
    ]


# --- least privilege is enough ------------------------------------------------------------


async def test_each_role_does_its_whole_job_with_nothing_but_its_permissions(
    role_users: RoleUsers, namespace: str, amqp_url: str
) -> None:
    """The other side of the table: with exactly ``permissions_for`` their role, the three
    parties do everything users ask of them: typed publishes from async and sync code, a
    sync handler, a retry and a dead letter, status. Nothing needs more rights."""
    handled: list[tuple[str, int]] = []
    app = App()

    @app.handler()
    def record(message: Message[dict[str, int]]) -> None:  # a sync handler, typed
        if message.payload["n"] < 0:
            raise ValueError("negative")
        handled.append((message.key, message.payload["n"]))

    worker_settings = settings_as(role_users.worker.url, namespace, max_retries=1)
    publisher_settings = settings_as(role_users.publisher.url, namespace)
    async with (
        running_registry(settings_as(role_users.registry.url, namespace)),
        running_worker(worker_settings, app) as worker,
        Publisher(publisher_settings) as publisher,
    ):
        await asyncio.gather(*(publisher.publish("post A", {"n": n}) for n in range(5)))

        def publish_from_sync_code() -> None:
            with SyncPublisher(publisher_settings) as sync:
                for n in range(5, 10):
                    sync.publish("post A", {"n": n})

        await asyncio.to_thread(publish_from_sync_code)
        await publisher.publish("post B", {"n": -1})  # fails twice: dead-lettered
        await eventually(lambda: len(handled) == 10 and worker.dead_lettered == 1)
        assert handled == [("post A", n) for n in range(10)]
        status = await fetch_status(publisher_settings, backlog=False)
        assert [w.worker_id for w in status.workers] == [worker.worker_id]
    # the dead letter, written by the worker's user (read here as the tests' admin)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(Names(namespace).dead_letter_queue)
        dead = await queue.get(fail=True, no_ack=True)
        assert dead is not None and json.loads(dead.body) == {"n": -1}
        assert dead.user_id == role_users.worker.name
    finally:
        await connection.close()


# --- operating keys (issue 16): the registry's new rights, and only its ------------------


async def test_the_registry_role_operates_keys_with_nothing_but_its_permissions(
    role_users: RoleUsers, namespace: str
) -> None:
    """Each right the registry role got for operating keys, used as the registry uses it:
    declare NS.operations and NS.holds (configure); bind NS.registry to NS.operations (read
    operations) and send on it (write operations); record holds as bindings on NS.holds,
    of a key queue (read holds) and of a jobs exchange (write jobs, its destination); read
    the dead-letter queue; put dead letters back at a key's head (basic.get on the key
    queue, publish on its jobs exchange); skip a head (publish on NS.dead-letters). The
    publisher's messages it moves lose their user_id (the broker lets it write only its
    own); the jobs are otherwise as published."""
    names = Names(namespace)
    registry_user = role_users.registry
    ref = KeyRef.of("account-1")
    jobs, queue = names.jobs_exchange("default"), names.key_queue(ref)
    async with attacker(registry_user, names) as registry:
        channel = await registry.channel()
        await declare_control_topology(registry.connection, channel, names, "classic")
        operations = await channel.declare_exchange(
            names.operations_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        holds = await channel.declare_exchange(
            names.holds_exchange, aio_pika.ExchangeType.DIRECT, durable=True, internal=True
        )
        registry_queue = await channel.get_queue(names.registry_queue, ensure=False)
        await registry_queue.bind(operations)
        await operations.publish(
            control({"type": "hold_request"}, user_id=registry_user.name), routing_key=""
        )
        assert (got := await registry_queue.get(fail=True, no_ack=True)) is not None
        assert got.exchange == names.operations_exchange
        jobs_exchange = await channel.declare_exchange(
            jobs, aio_pika.ExchangeType.DIRECT, durable=True
        )
        key_queue = await channel.declare_queue(
            queue, durable=True, arguments=key_queue_arguments(120)
        )
        routing_key = new_routing_key(ref)
        await key_queue.bind(jobs_exchange, routing_key=routing_key)
        parked = {"x-error": "ValueError: x", "x-attempts": 3, "x-at": 1}
        await key_queue.bind(holds, routing_key=HOLD_PARKED, arguments=parked)
        await key_queue.unbind(holds, routing_key=HOLD_PARKED, arguments=parked)
        await jobs_exchange.bind(holds, routing_key=HOLD_PAUSED)
        await jobs_exchange.unbind(holds, routing_key=HOLD_PAUSED)

        # two jobs wait (from the publisher's user), two dead letters (from the worker's)
        async with attacker(role_users.publisher, names) as publisher:
            for n in range(2):
                await publisher.publish(
                    jobs,
                    aio_pika.Message(
                        f"w{n}".encode(),
                        headers={HEADER_KEY: ref.key, HEADER_JOB_TYPE: "default"},
                        user_id=role_users.publisher.name,
                    ),
                    routing_key,
                )
        async with attacker(role_users.worker, names) as worker:
            for n in range(2):
                headers = {HEADER_KEY: ref.key, HEADER_JOB_TYPE: "default", HEADER_ERROR: "E"}
                await worker.publish(
                    names.dead_letter_exchange,
                    aio_pika.Message(
                        f"d{n}".encode(), headers=headers, user_id=role_users.worker.name
                    ),
                )

        selection = await read_dead_letters(registry.connection, names, lambda *_: True)
        dead_letters = selection.selected[("default", ref.key)]
        removed = await rearrange(
            registry.connection, names, ref, queue, [routing_key], "rd-1", dead_letters, 0.05
        )
        await selection.settle("default", ref.key, ok=True)
        await selection.close()
        assert removed == [routing_key]
        made = await skip_head(
            registry.connection,
            names,
            queue,
            error="E",
            attempts=1,
            job_index=0,
            user_id=registry_user.name,
        )
        assert made == 1
        moved = []
        while (message := await key_queue.get(fail=False, no_ack=True)) is not None:
            moved.append((message.body, message.user_id))
        assert moved == [(b"d1", None), (b"w0", None), (b"w1", None)]
        dead_letter_queue = await channel.get_queue(names.dead_letter_queue, ensure=False)
        skipped = await dead_letter_queue.get(fail=True, no_ack=True)
        assert skipped is not None and skipped.body == b"d0"
        assert skipped.user_id == registry_user.name
        await channel.close()


@pytest.mark.parametrize("role", [Role.PUBLISHER, Role.WORKER])
async def test_no_publisher_or_worker_can_operate_keys_or_set_holds(
    role_users: RoleUsers, namespace: str, amqp_url: str, role: Role
) -> None:
    """Operations are the registry's: a publisher or a worker credential may not send on
    NS.operations, nor bind its own queue or a jobs exchange to NS.holds (a hold it could
    set or clear), nor read the dead-letter queue (redrive is the registry's)."""
    names = Names(namespace)
    connection = await aio_pika.connect(amqp_url)
    try:
        admin = await connection.channel()
        await admin.declare_exchange(
            names.operations_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await admin.declare_exchange(
            names.holds_exchange, aio_pika.ExchangeType.DIRECT, durable=True, internal=True
        )
        await admin.declare_exchange(
            names.jobs_exchange("default"), aio_pika.ExchangeType.DIRECT, durable=True
        )
        await admin.declare_queue(names.dead_letter_queue, durable=True)
    finally:
        await connection.close()
    user = role_users.of(role)
    own_queue = (
        names.reply_queue("0123abcd") if role is Role.PUBLISHER else names.worker_inbox("w-1")
    )
    async with attacker(user, names) as intruder:
        message = control({"type": "hold_request"}, user_id=user.name)
        error = await intruder.publish_refused(names.operations_exchange, message)
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)

        async def bind_own_queue(channel: AbstractChannel) -> None:
            declared = await channel.declare_queue(own_queue, exclusive=True, auto_delete=True)
            await declared.bind(names.holds_exchange, routing_key=HOLD_PAUSED)

        async def bind_jobs_exchange(channel: AbstractChannel) -> None:
            target = await channel.get_exchange(names.jobs_exchange("default"), ensure=False)
            await target.bind(names.holds_exchange, routing_key=HOLD_PAUSED)

        async def read_dead_letter_queue(channel: AbstractChannel) -> None:
            queue = await channel.get_queue(names.dead_letter_queue, ensure=False)
            await queue.get(fail=False)

        for action in (bind_own_queue, bind_jobs_exchange, read_dead_letter_queue):
            error = await intruder.refused(action)
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), action


# --- passive declares: RabbitMQ 4.2.6 and 4.3.0 ask configure for them --------------------


def _passively_declared(role: Role, names: Names) -> list[str]:
    """Every name a worker or a publisher checks with a passive declare: the worker's
    ``NS.membership`` (``Worker._wait_for_registry``) and the key queues it is assigned
    (``Handoff._check_queue``); the publisher's ``NS.requests`` (``ControlClient.request``,
    when no registry had run as it started). The publisher checks ``NS.replies`` by binding
    its reply queue to it (NOT_FOUND: not yet), which its rights allow on every version."""
    if role is Role.WORKER:
        return [names.membership_exchange, names.key_queue(KeyRef.of("k", "post"))]
    return [names.requests_exchange]


@pytest.mark.parametrize("role", [Role.WORKER, Role.PUBLISHER])
def test_a_worker_or_publisher_passively_declares_only_names_it_has_a_right_on(
    role: Role,
) -> None:
    """RabbitMQ 4.2.7 and 4.3.1 accept a passive declare with any permission on the name
    (rabbitmq-server #16272), earlier versions with none: each name the role checks matches
    its read or write right. None matches its configure right, which 4.2.6 and 4.3.0 ask
    (#16085): there the broker refuses, and rabbitkeys says why (the next test)."""
    names = Names("shop")
    rights = permissions_for(role, names)
    for name in _passively_declared(role, names):
        assert re.match(rights.read, name) or re.match(rights.write, name), name
        assert not re.match(rights.configure, name), name


async def test_a_refused_passive_declare_is_explained(
    role_users: RoleUsers, namespace: str
) -> None:
    """What a worker logs (and raises: it retries, as after any lost session) and a
    publisher's ``publish`` raises when the broker refuses a passive declare: one line
    naming the broker bug and the two ways out. No broker here refuses a passive declare
    (3.10 and 4.0 need no permission for one), so the translation is tried on the same
    broker error, ACCESS_REFUSED, for the declare that is refused on every version: the
    worker declaring NS.membership. The real passive declare still succeeds here."""
    names = Names(namespace)
    settings = settings_as(role_users.registry.url, namespace)
    async with running_registry(settings, metrics_registry=CollectorRegistry()):
        async with attacker(role_users.worker, names) as worker:
            error = await worker.refused(
                lambda channel: channel.declare_exchange(
                    names.membership_exchange, aio_pika.ExchangeType.FANOUT, durable=True
                )
            )
            assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)
            text = passive_declare_refusal(f"exchange {names.membership_exchange!r}", error)
            assert "\n" not in text
            assert text.startswith(
                f"the broker refused a passive declare of exchange {names.membership_exchange!r}"
                " (ACCESS_REFUSED"
            )
            for part in (
                "4.2.6 and 4.3.0",
                "#16085",
                "4.2.7+ or 4.3.1+",
                "grant this user configure on that name",
                role_users.worker.name,
            ):
                assert part in text, part
            # the passive declare itself, with the worker's rights, on this broker
            assert await topology_exists(worker.connection, names.membership_exchange)


async def test_a_publisher_started_before_any_registry_needs_only_its_permissions(
    role_users: RoleUsers, namespace: str
) -> None:
    """A publisher that starts in a namespace no registry has declared yet finds
    ``NS.replies`` by binding its reply queue to it (the bind is the check), then waits for
    ``NS.requests``; its first publish goes through once a registry and a worker run."""
    handled: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(message.body)

    async with Publisher(
        settings_as(role_users.publisher.url, namespace), metrics_registry=CollectorRegistry()
    ) as publisher:
        publish = asyncio.ensure_future(publisher.publish("k", b"first"))
        await asyncio.sleep(1)
        assert not publish.done()
        async with (
            running_registry(
                settings_as(role_users.registry.url, namespace),
                metrics_registry=CollectorRegistry(),
            ),
            running_worker(
                settings_as(role_users.worker.url, namespace),
                app,
                metrics_registry=CollectorRegistry(),
            ),
        ):
            await asyncio.wait_for(publish, 30)
            await eventually(lambda: handled == [b"first"])

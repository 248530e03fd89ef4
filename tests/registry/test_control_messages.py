"""Control messages come from the network: each malformed shape sent to a live registry and
to a worker's inbox is counted, logged and dropped, and both keep running, keep their
leadership and their keys. The limits themselves, without a broker, first."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import App, ConfigError, Message, ProtocolError, Publisher, Settings, Worker
from rabbitkeys._admin.status import fetch_status
from rabbitkeys._wire.protocol import (
    MAX_CONTROL_MESSAGE_BYTES,
    MAX_JOB_TYPES,
    MAX_KEYS_PER_MESSAGE,
    Assign,
    KeyAssignment,
    Refused,
    Release,
    Released,
    WorkerJoin,
    decode_control,
    encode_control,
    split,
)
from rabbitkeys._wire.topology import KeyRef, Names

from ..support import eventually, running_registry, running_worker

# --- the limits (no broker) ---------------------------------------------------------------


def assignment(namespace: str, key: str) -> dict[str, Any]:
    ref = KeyRef.of(key)
    return {
        "key_id": ref.id,
        "job_type": ref.job_type,
        "key": key,
        "queue": Names(namespace).key_queue(ref),
        "routing_key": f"{ref.token}|0123456789abcdef",
    }


def join(**fields: Any) -> dict[str, Any]:
    return {"type": "worker_join", "worker_id": "w1", "inbox": "ns.worker.w1"} | {
        "job_types": ["default"],
        **fields,
    }


def body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


MALFORMED = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe",
    "not an object": b"[]",
    "unknown type": b'{"type": "launch_missiles"}',
    "missing field": b'{"type": "worker_leave"}',
    "oversized": body(
        {"type": "worker_heartbeat", "worker_id": "w1", "idle_keys": ["default/k"] * 150_000}
    ),
    "300-character worker id": body(join(worker_id="w" * 300)),
    "worker id with a space": body(join(worker_id="w 1")),
    "job type with a dot": body(join(job_types=["a.b"])),
    "too many job types": body(join(job_types=[f"t{i}" for i in range(2000)])),
    "too many keys": body(
        join(keys=[assignment("ns", f"k{i}") for i in range(MAX_KEYS_PER_MESSAGE + 1)])
    ),
    "job types not a list": body(join(job_types="default")),
    "keys of the wrong type": body(join(keys=[1, 2])),
    "a number as a string": body({"type": "worker_heartbeat", "worker_id": "w1", "owned": "3"}),
    "a negative count": body({"type": "worker_heartbeat", "worker_id": "w1", "waiting": -1}),
    "a key of 1,025 bytes": body({"type": "ensure_key", "job_type": "default", "key": "k" * 1025}),
    "an empty key": body({"type": "ensure_key", "job_type": "default", "key": ""}),
    "an empty batch of keys": body({"type": "ensure_keys", "keys": []}),
    "a batch of too many keys": body(
        {
            "type": "ensure_keys",
            "keys": [
                {"job_type": "default", "key": f"k{i}"} for i in range(MAX_KEYS_PER_MESSAGE + 1)
            ],
        }
    ),
    "a batch with a key of 1,025 bytes": body(
        {
            "type": "ensure_keys",
            "keys": [
                {"job_type": "default", "key": "k"},
                {"job_type": "default", "key": "k" * 1025},
            ],
        }
    ),
    "a batch of strings": body({"type": "ensure_keys", "keys": ["default/k"]}),
    "a batch that is no list": body({"type": "ensure_keys", "keys": {"job_type": "default"}}),
    "an answer of no known kind": body(
        {
            "type": "keys_ensured",
            "answers": [{"job_type": "default", "key": "k", "answer": {"type": "assign"}}],
        }
    ),
    "a key id that is no key id": body({"type": "release", "key_ids": ["default/~" + "0" * 40]}),
    "a queue name pamqp refuses": body(
        {"type": "assign", "keys": [assignment("ns", "k") | {"queue": "ns.key.default.a=b"}]}
    ),
    "a key id of another job type": body(
        {"type": "assign", "keys": [assignment("ns", "k") | {"job_type": "other"}]}
    ),
    "a routing key over 255 bytes": body(
        {"type": "assign", "keys": [assignment("ns", "k") | {"routing_key": "é" * 128}]}
    ),
}


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_each_malformed_shape_is_a_protocol_error(shape: str) -> None:
    with pytest.raises(ProtocolError):
        decode_control(MALFORMED[shape])


def test_a_worker_with_100_000_keys_reports_them_in_messages_that_fit() -> None:
    namespace, worker_id = "n" * 64, "w" * 128
    keys = [
        KeyAssignment(**assignment(namespace, f"key-{i:06d}-" + "x" * 60)) for i in range(100_000)
    ]
    joins = split(
        keys,
        lambda chunk: WorkerJoin(
            worker_id=worker_id,
            session="0" * 32,
            inbox=Names(namespace).worker_inbox(worker_id),
            job_types=["default"],
            keys=chunk,
        ),
    )
    assert len(joins) > 1
    assert [key for join in joins for key in join.keys] == keys
    for message in joins:
        encoded = encode_control(message)
        assert len(encoded) <= MAX_CONTROL_MESSAGE_BYTES
        assert decode_control(encoded) == message
    released = split(keys[:10], lambda chunk: Released(worker_id="w", session="0" * 32, keys=chunk))
    assert len(released) == 1 and released[0].keys == keys[:10]
    ids = [key.key_id for key in keys]
    releases = split(ids, lambda chunk: Release(key_ids=chunk))
    assert [key_id for release in releases for key_id in release.key_ids] == ids
    assert all(len(encode_control(release)) <= MAX_CONTROL_MESSAGE_BYTES for release in releases)
    # nothing to report still makes one join
    assert len(split([], lambda chunk: Assign(keys=chunk))) == 1


def test_the_largest_keys_still_fit() -> None:
    # 1,024 bytes of characters JSON escapes six-fold
    keys = [KeyAssignment(**assignment("ns", "\x01" * 1023 + str(i % 10))) for i in range(2000)]
    for message in split(keys, lambda chunk: Assign(keys=chunk)):
        assert len(encode_control(message)) <= MAX_CONTROL_MESSAGE_BYTES
        assert decode_control(encode_control(message)) == message


def _offline() -> Settings:
    """Checked when the worker is built, before it connects: no broker (the fast tier)."""
    return Settings(amqp_url="amqp://guest:guest@127.0.0.1:1/", namespace="offline")


def test_a_worker_id_that_cannot_name_a_queue_is_a_config_error() -> None:
    for worker_id in ("w" * 129, "w 1", "a=b", "é"):
        with pytest.raises(ConfigError, match="worker id"):
            Worker(App(), _offline(), worker_id=worker_id)
    assert Worker(App(), _offline(), worker_id="pod-7.zone:a@host_1").worker_id


def test_an_app_with_more_job_types_than_a_join_carries_is_a_config_error() -> None:
    app = App()
    for i in range(MAX_JOB_TYPES + 1):
        app.add_handler(f"t{i}", _noop)
    with pytest.raises(ConfigError, match="job types"):
        Worker(app, _offline())


async def _noop(message: Message) -> None:
    pass


# --- against a live registry and worker ------------------------------------------------------


def malformed_count(metrics: CollectorRegistry) -> float:
    return metrics.get_sample_value("rabbitkeys_malformed_messages_total") or 0.0


async def test_malformed_control_messages_are_dropped_and_registry_and_worker_carry_on(
    settings: Settings,
) -> None:
    names = Names(settings.namespace)
    registry_metrics, worker_metrics = CollectorRegistry(), CollectorRegistry()
    seen: list[tuple[str, bytes]] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append((message.key, message.body))

    before, after = KeyRef.of("before").id, KeyRef.of("after / après").id
    foreign_queue = f"{settings.namespace}-other.key.default.k"
    async with (
        running_registry(settings, metrics_registry=registry_metrics) as registry,
        running_worker(settings, app, metrics_registry=worker_metrics) as worker,
        Publisher(settings) as publisher,
    ):
        await publisher.publish("before", b"1")
        await eventually(lambda: seen == [("before", b"1")])
        worker_id = worker.worker_id
        assert worker.owned_keys == [before]

        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel()
            replies = await channel.declare_queue(
                names.reply_queue(uuid.uuid4().hex), exclusive=True, auto_delete=True
            )
            answers: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await replies.bind(names.replies_exchange, routing_key=replies.name)
            await replies.consume(answers.put, no_ack=True)

            async def send(
                exchange: str, payload: bytes, routing_key: str = "", **properties: Any
            ) -> None:
                """Through the exchange a party of that role writes on, as that party: only
                what is in the message is wrong (senders: tests/system/test_trust.py)."""
                target = await channel.get_exchange(exchange)
                await target.publish(
                    aio_pika.Message(payload, user_id="guest", **properties),
                    routing_key=routing_key,
                )

            # --- to the registry ---
            to_registry = [
                *MALFORMED.values(),
                # a join that parses but names queues of another namespace
                body(
                    {
                        "type": "released",
                        "worker_id": worker_id,
                        "session": worker._secret,
                        "keys": [assignment(settings.namespace, "k") | {"queue": foreign_queue}],
                    }
                ),
                # a hashed key claiming another key's token
                body(
                    {
                        "type": "released",
                        "worker_id": worker_id,
                        "session": worker._secret,
                        "keys": [assignment(settings.namespace, "post A") | {"key": "not post A"}],
                    }
                ),
                # a message that is not a request
                body({"type": "sync"}),
                body({"type": "keys_ensured", "answers": []}),
                # a batch through the workers' exchange, not the publishers'
                body({"type": "ensure_keys", "keys": [{"job_type": "default", "key": "k"}]}),
            ]
            for payload in to_registry:
                await send(names.membership_exchange, payload)
            # a request with a bad field and a reply queue: refused with the reason
            await send(
                names.requests_exchange,
                body({"type": "ensure_key", "job_type": "a b", "key": "k"}),
                reply_to=replies.name,
                correlation_id="bad-job-type",
            )
            # a batch with one bad key: refused whole, with the reason
            await send(
                names.requests_exchange,
                body(
                    {
                        "type": "ensure_keys",
                        "keys": [
                            {"job_type": "default", "key": "fine"},
                            {"job_type": "default", "key": ""},
                        ],
                    }
                ),
                reply_to=replies.name,
                correlation_id="bad-batch",
            )
            # replies must go to reply queues of this namespace only: not to a worker's
            # inbox, not to another namespace's, not to a queue pamqp refuses
            for reply_to in (
                names.worker_inbox(worker_id),
                f"{settings.namespace}-other.reply.{uuid.uuid4().hex}",
                names.registry_queue,
                names.reply_queue("a=b"),
                names.reply_queue("x" * 65),
            ):
                await send(
                    names.requests_exchange,
                    body({"type": "status_request", "backlog": False}),
                    reply_to=reply_to,
                    correlation_id="status",
                )
            # malformed and a bad reply_to: counted once, answered nowhere
            await send(
                names.requests_exchange,
                b"{not json",
                reply_to=names.worker_inbox(worker_id),
                correlation_id="bad",
            )
            expected = len(to_registry) + 2 + 5 + 1
            await eventually(lambda: malformed_count(registry_metrics) >= expected, timeout=30)
            refused = await asyncio.wait_for(answers.get(), 10)
            assert refused.correlation_id == "bad-job-type"
            reply = decode_control(refused.body)
            assert isinstance(reply, Refused) and "job_type" in reply.reason, reply
            refused = await asyncio.wait_for(answers.get(), 10)
            assert refused.correlation_id == "bad-batch"
            reply = decode_control(refused.body)
            assert isinstance(reply, Refused) and "keys.1.key" in reply.reason, reply
            # no status went anywhere (the worker would have counted it as not a command)
            assert answers.empty()
            assert malformed_count(worker_metrics) == 0

            # --- to the worker's inbox ---
            to_worker = [
                *MALFORMED.values(),
                # a queue of another namespace: never declared nor consumed
                body(
                    {
                        "type": "assign",
                        "keys": [assignment(settings.namespace, "k") | {"queue": foreign_queue}],
                    }
                ),
                # a queue that is not the key's
                body(
                    {
                        "type": "assign",
                        "keys": [
                            assignment(settings.namespace, "k")
                            | {"queue": names.key_queue(KeyRef.of("other"))}
                        ],
                    }
                ),
                body({"type": "release", "key_ids": [before] * (MAX_KEYS_PER_MESSAGE + 1)}),
                encode_control(Refused(reason="not a command")),
            ]
            for payload in to_worker:
                await send(
                    names.commands_exchange, payload, names.worker_route(worker_id, worker._secret)
                )
            await eventually(lambda: malformed_count(worker_metrics) >= len(to_worker), timeout=30)
        finally:
            await connection.close()

        # both carry on: the same session, the same leadership, the same keys
        assert registry.is_leader
        assert registry_metrics.get_sample_value("rabbitkeys_leadership_acquired_total") == 1
        assert worker.worker_id == worker_id and worker.ready
        assert worker.owned_keys == [before]
        await publisher.publish("after / après", b"2")
        await publisher.publish("before", b"3")
        await eventually(lambda: len(seen) == 3)
        assert sorted(seen) == [("after / après", b"2"), ("before", b"1"), ("before", b"3")]
        status = await fetch_status(settings, backlog=False)
        assert [w.worker_id for w in status.workers] == [worker_id]
        assert status.keys == 2 and status.unassigned_keys == 0
        assert sorted(worker.owned_keys) == sorted([before, after])
        # each malformed message counted once, none more
        assert malformed_count(registry_metrics) == expected
        assert malformed_count(worker_metrics) == len(to_worker)
        assert registry.malformed_messages == expected
        assert worker.malformed_messages == len(to_worker)

    # nothing was declared outside the namespace
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(foreign_queue, passive=True)
    finally:
        await connection.close()


async def test_a_worker_reports_its_keys_in_several_joins_and_a_new_registry_rebuilds_all(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker with more keys than fit in one message joins in several messages; a
    registry that starts meanwhile rebuilds every key from them (3 keys per message here,
    4,096 in production)."""
    monkeypatch.setattr("rabbitkeys._wire.protocol.MAX_KEYS_PER_MESSAGE", 3)
    seen: list[tuple[str, bytes]] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append((message.key, message.body))

    keys = [f"key {i}" for i in range(10)]
    async with running_worker(settings, app) as worker, Publisher(settings) as publisher:
        async with running_registry(settings):
            await asyncio.gather(*(publisher.publish(key, b"1") for key in keys))
            await eventually(lambda: len(seen) == len(keys))
            owned = worker.owned_keys
            assert len(owned) == len(keys)
        # the registry is gone; the worker keeps consuming; a new one asks it for its keys
        async with running_registry(settings) as registry:
            await eventually(lambda: len(registry._book.keys) == len(keys), timeout=30)
            status = await fetch_status(settings, backlog=False)
            assert status.keys == len(keys) and status.unassigned_keys == 0
            assert [(w.worker_id, w.keys) for w in status.workers] == [
                (worker.worker_id, len(keys))
            ]
            assert worker.owned_keys == owned  # nothing moved
            await asyncio.gather(*(publisher.publish(key, b"2") for key in keys))
            await eventually(lambda: len(seen) == 2 * len(keys))
    assert sorted(seen) == sorted((key, body) for key in keys for body in (b"1", b"2"))

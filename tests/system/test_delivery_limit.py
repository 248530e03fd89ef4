"""Quorum key queues never drop a job, however often their head is let go (issue 23).

RabbitMQ 4.0 gives quorum queues a default delivery limit of 20 and drops a message returned
more often when no dead-letter exchange is set; every move, drain, park, crash and redrive of
a key returns its head. rabbitkeys declares its quorum queues with ``x-delivery-limit: -1``
(unlimited) from 4.0 on; 3.x has no default limit and reads -1 as "drop at once", so there it
declares none (docs/probes/delivery_limit.py). These tests run on whichever broker the suite
runs on; CI runs them on 3.10 and 4.0.5."""

from __future__ import annotations

import logging
import urllib.parse

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher
from rabbitkeys._broker.amqp import broker_version
from rabbitkeys._wire.topology import KeyRef, Names, key_queue_arguments

from ..conftest import Broker
from ..registry.test_operations import hold, operator
from ..support import eventually, make_settings, running_registry, running_worker

pytestmark = [pytest.mark.timeout(300)]

LETS_GO = 105


async def version_of(amqp_url: str) -> tuple[int, int]:
    connection = await aio_pika.connect(amqp_url)
    try:
        return broker_version(connection)
    finally:
        await connection.close()


@pytest.mark.slow
async def test_a_quorum_keys_head_let_go_over_a_hundred_times_is_handled_then(
    amqp_url: str, namespace: str
) -> None:
    """A parking job type whose head fails 105 times: each failure parks the key (the head
    goes back to the queue, a return), each resume gives it to a worker again. The 106th
    attempt succeeds, and the job behind it runs after it: nothing dropped, order kept."""
    settings = make_settings(amqp_url, namespace, queue_type="quorum", max_retries=0)
    attempts: list[int] = []
    handled: list[bytes] = []
    app = App()

    @app.handler(on_failure="park")
    async def stubborn(message: Message) -> None:
        if message.body == b"head":
            attempts.append(1)
            if len(attempts) <= LETS_GO:
                raise RuntimeError(f"attempt {len(attempts)} fails")
        handled.append(message.body)

    ref = KeyRef.of("post A")
    async with running_registry(settings) as registry, running_worker(settings, app):
        async with Publisher(settings) as publisher:
            await publisher.publish("post A", b"head")
            await publisher.publish("post A", b"next")
        async with operator(settings) as client:
            for round_ in range(1, LETS_GO + 1):
                await eventually(
                    lambda r=round_: (
                        len(attempts) >= r and registry._book.keys[ref.id].parked is not None
                    ),
                    timeout=30,
                )
                assert (await hold(client, "resume", "default", "post A")).ok
        await eventually(lambda: handled == [b"head", b"next"], timeout=30)
    assert len(attempts) == LETS_GO + 1


async def test_quorum_queues_are_declared_without_a_delivery_limit(
    amqp_url: str, namespace: str, broker: Broker, session_vhost: str
) -> None:
    """Key queue, registry queue and dead-letter queue: ``x-delivery-limit`` -1 on RabbitMQ 4,
    none on 3.x (its default is no limit)."""
    settings = make_settings(amqp_url, namespace, queue_type="quorum")
    names = Names(namespace)
    expected = {"x-delivery-limit": -1} if await version_of(amqp_url) >= (4, 0) else {}
    async with running_registry(settings):
        async with Publisher(settings) as publisher:
            await publisher.publish("user/42", b"x")
    vhost = urllib.parse.quote(session_vhost, safe="")
    for queue in (
        names.key_queue(KeyRef.of("user/42")),
        names.registry_queue,
        names.dead_letter_queue,
    ):
        info = broker.api(f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}")
        arguments = info["arguments"]
        assert arguments["x-queue-type"] == "quorum", queue
        assert {k: v for k, v in arguments.items() if k == "x-delivery-limit"} == expected, queue


async def test_a_quorum_key_queue_with_a_delivery_limit_is_kept_and_the_operator_told_the_fix(
    amqp_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A key queue declared with a delivery limit (by an earlier version on RabbitMQ 4, where
    no argument means 20) cannot be redeclared without it: the registry keeps it, the key
    works, and the log says once which operator policy lifts the limit."""
    settings = make_settings(amqp_url, namespace, queue_type="quorum")
    version = await version_of(amqp_url)
    queue = Names(namespace).key_queue(KeyRef.of("post B"))
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        old = {**key_queue_arguments(settings.key_queue_expires, "quorum", version)}
        old["x-delivery-limit"] = 20
        await channel.declare_queue(queue, durable=True, arguments=old)
    finally:
        await connection.close()
    handled: list[bytes] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(message.body)

    with caplog.at_level(logging.INFO, logger="rabbitkeys"):
        async with running_registry(settings), running_worker(settings, app):
            async with Publisher(settings) as publisher:
                for body in (b"1", b"2", b"3"):
                    await publisher.publish("post B", body)
            await eventually(lambda: handled == [b"1", b"2", b"3"])
    warnings = [r.getMessage() for r in caplog.records if "set_operator_policy" in r.getMessage()]
    assert len(warnings) == 1
    assert "rabbitkeys-unlimited-deliveries" in warnings[0]
    assert f"'^{namespace}\\.'" in warnings[0]
    assert '{"delivery-limit": -1}' in warnings[0] and "--apply-to quorum_queues" in warnings[0]

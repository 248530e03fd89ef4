"""Operating keys through the registry (issue 16): pause and resume a key or a job type,
list keys, skip a parked key's head, redrive dead letters. Operator requests travel through
``NS.operations``; the registry and workers run in-process against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest

from rabbitkeys import App, Message, Publisher, Registry, Settings
from rabbitkeys._broker.control import ControlClient
from rabbitkeys._registry import reconcile as _reconcile
from rabbitkeys._wire.protocol import (
    ControlMessage,
    HoldReply,
    HoldRequest,
    KeysPage,
    KeysRequest,
    RedriveReply,
    RedriveRequest,
)
from rabbitkeys._wire.topology import HOLD_PAUSED, KeyRef, Names

from ..conftest import Broker
from ..support import eventually, make_settings, running_registry, running_worker
from ..trust_support import RoleUsers, attacker, control

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def operator(settings: Settings) -> AsyncIterator[ControlClient]:
    """A ControlClient sending through NS.operations (the test's user is an administrator
    of its vhost, as guest is)."""
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    client = ControlClient(
        connection, names, settings.amqp_user, exchange=names.operations_exchange
    )
    try:
        await client.start()
        yield client
    finally:
        await client.close()
        await connection.close()


async def ask(client: ControlClient, request: Any) -> ControlMessage:
    return await client.request(request, timeout=30)


async def hold(client: ControlClient, action: str, job_type: str, key: str | None) -> HoldReply:
    reply = await ask(client, HoldRequest(action=action, job_type=job_type, key=key))  # type: ignore[arg-type]
    assert isinstance(reply, HoldReply), reply
    return reply


def key_of(registry: Registry, key: str, job_type: str = "default") -> Any:
    return registry._book.keys.get(KeyRef.of(key, job_type).id)


def let_go(registry: Registry, key: str, job_type: str = "default") -> bool:
    """The key is in the book and no worker holds it."""
    found = key_of(registry, key, job_type)
    return found is not None and found.owner is None


async def queue_messages(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


def hold_bindings(broker: Broker, vhost: str, names: Names) -> list[dict[str, Any]]:
    quoted = urllib.parse.quote(names.holds_exchange, safe="")
    path = f"exchanges/{urllib.parse.quote(vhost, safe='')}/{quoted}/bindings/source"
    return list(broker.api(path))


class Recorder:
    """What handlers did, per key, in handling order."""

    def __init__(self) -> None:
        self.values: dict[str, list[int]] = defaultdict(list)

    def total(self) -> int:
        return sum(map(len, self.values.values()))


def recording_app(recorder: Recorder, job_type: str = "default", **options: Any) -> App:
    app = App()

    @app.handler(job_type, **options)
    async def record(message: Message) -> None:
        recorder.values[message.key].append(int(message.body))

    return app


async def test_a_paused_key_is_not_handled_and_loses_nothing_then_resumes_in_order(
    settings: Settings,
) -> None:
    recorder = Recorder()
    app = recording_app(recorder)
    async with (
        running_registry(settings) as registry,
        running_worker(settings, app),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        sent = 0
        stop = asyncio.Event()

        async def traffic() -> None:
            nonlocal sent
            while not stop.is_set():
                sent += 1
                await publisher.publish("k", str(sent).encode())
                await asyncio.sleep(0.005)

        task = asyncio.create_task(traffic())
        await eventually(lambda: len(recorder.values["k"]) >= 20)
        reply = await hold(client, "pause", "default", "k")
        assert reply.ok, reply.detail
        assert key_of(registry, "k").paused
        await eventually(lambda: let_go(registry, "k"))
        handled = len(recorder.values["k"])
        await asyncio.sleep(1.0)  # traffic goes on; the key is held
        stop.set()
        await task
        assert len(recorder.values["k"]) == handled  # nothing handled while paused
        assert handled < sent
        assert key_of(registry, "k").owner is None
        queue = Names(settings.namespace).key_queue(KeyRef.of("k"))
        assert await queue_messages(settings, queue) == sent - handled  # nothing lost

        reply = await hold(client, "resume", "default", "k")
        assert reply.ok, reply.detail
        await eventually(lambda: len(recorder.values["k"]) == sent)
        await asyncio.sleep(0.3)
    assert recorder.values["k"] == list(range(1, sent + 1))  # once each, in order


async def test_a_paused_job_type_holds_its_keys_and_no_other(settings: Settings) -> None:
    recorder = Recorder()
    app = recording_app(recorder, "emails")

    @app.handler("other")
    async def other(message: Message) -> None:
        recorder.values[message.key].append(int(message.body))

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        for key in ("a", "b"):
            await publisher.publish(key, b"1", job_type="emails")
        await eventually(lambda: recorder.total() == 2)
        reply = await hold(client, "pause", "emails", None)
        assert reply.ok, reply.detail
        assert "emails" in registry._book.paused_types
        await eventually(
            lambda: let_go(registry, "a", "emails") and let_go(registry, "b", "emails")
        )
        for key in ("a", "b"):
            await publisher.publish(key, b"2", job_type="emails")
        await publisher.publish("c", b"1", job_type="other")  # another job type flows
        await eventually(lambda: recorder.values["c"] == [1])
        await asyncio.sleep(0.5)
        assert recorder.values["a"] == [1] and recorder.values["b"] == [1]
        # the listing shows it
        page = await ask(client, KeysRequest(state="paused"))
        assert isinstance(page, KeysPage)
        assert page.paused_job_types == ["emails"]
        assert sorted(info.key for info in page.keys) == ["a", "b"]
        assert all("type_paused" in info.holds for info in page.keys)

        reply = await hold(client, "resume", "emails", None)
        assert reply.ok, reply.detail
        await eventually(lambda: recorder.values["a"] == [1, 2] and recorder.values["b"] == [1, 2])


async def test_a_paused_key_stays_paused_when_another_registry_takes_over(
    settings: Settings, broker: Broker, session_vhost: str
) -> None:
    recorder = Recorder()
    app = recording_app(recorder)
    names = Names(settings.namespace)
    async with running_worker(settings, app), Publisher(settings) as publisher:
        async with running_registry(settings) as first, operator(settings) as client:
            await publisher.publish("k", b"1")
            await eventually(lambda: recorder.values["k"] == [1])
            assert (await hold(client, "pause", "default", "k")).ok
            # the job type too, to see it come back
            assert (await hold(client, "pause", "other", None)).ok
            await eventually(lambda: let_go(first, "k"))

            def recorded() -> set[tuple[str, str, str]]:
                return {
                    (b["destination_type"], b["destination"], b["routing_key"])
                    for b in hold_bindings(broker, session_vhost, names)
                }

            await eventually(
                lambda: (
                    recorded()
                    == {
                        ("queue", names.key_queue(KeyRef.of("k")), HOLD_PAUSED),
                        ("exchange", names.jobs_exchange("other"), HOLD_PAUSED),
                    }
                )
            )
        # the first registry is gone; a second one leads and reads the holds back
        async with running_registry(settings) as second:
            assert key_of(second, "k") is not None and key_of(second, "k").paused
            assert "other" in second._book.paused_types
            await publisher.publish("k", b"2")
            await asyncio.sleep(1.0)  # the worker rejoined (Sync); the key stays held
            assert let_go(second, "k")
            assert recorder.values["k"] == [1]
            async with operator(settings) as client:
                assert (await hold(client, "resume", "default", "k")).ok
            await eventually(lambda: recorder.values["k"] == [1, 2])
            await eventually(
                lambda: (
                    not any(
                        b["destination_type"] == "queue"
                        for b in hold_bindings(broker, session_vhost, names)
                    )
                )
            )


async def test_a_publisher_credential_cannot_operate_keys(
    amqp_url: str, namespace: str, role_users: RoleUsers
) -> None:
    """The publisher's credential may not write on NS.operations (the broker refuses); an
    operator request it sends through NS.requests, the one exchange it may write, is
    refused by the registry (wrong_exchange) and changes nothing."""
    settings = make_settings(amqp_url, namespace)
    names = Names(namespace)
    recorder = Recorder()
    async with (
        running_registry(settings) as registry,
        running_worker(settings, recording_app(recorder)),
        Publisher(settings) as publisher,
    ):
        await publisher.publish("k", b"1")
        await eventually(lambda: recorder.values["k"] == [1])
        async with attacker(role_users.publisher, names) as mallory:
            requests: list[dict[str, Any]] = [
                {"type": "hold_request", "action": "pause", "job_type": "default", "key": "k"},
                {"type": "hold_request", "action": "pause", "job_type": "default"},
                {"type": "keys_request"},
                {"type": "redrive_request", "apply": True},
            ]
            for payload in requests:
                message = control(payload, user_id=mallory.user.name)
                error = await mallory.publish_refused(names.operations_exchange, message)
                assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), payload
            before = registry.refused["wrong_exchange"]
            for payload in requests:
                await mallory.publish(
                    names.requests_exchange, control(payload, user_id=mallory.user.name)
                )
            await eventually(lambda: registry.refused["wrong_exchange"] == before + len(requests))
        assert not key_of(registry, "k").paused
        assert not registry._book.paused_types
        await publisher.publish("k", b"2")
        await eventually(lambda: recorder.values["k"] == [1, 2])


async def test_the_keys_listing_filters_sorts_and_pages(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reconcile, "_BACKLOG_INTERVAL", 0.3)
    recorder = Recorder()
    app = recording_app(recorder, "a")

    @app.handler("b")
    async def other(message: Message) -> None:
        recorder.values[message.key].append(int(message.body))

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app, worker_id="w1"),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        for n in range(5):
            await publisher.publish(f"a{n}", b"1", job_type="a")
        await publisher.publish("b0", b"1", job_type="b")
        await eventually(lambda: recorder.total() == 6)
        assert (await hold(client, "pause", "a", "a3")).ok
        await eventually(lambda: let_go(registry, "a3", "a"))
        for n in range(3):
            await publisher.publish("a3", str(n).encode(), job_type="a")

        page = await ask(client, KeysRequest(job_type="a", limit=2))
        assert isinstance(page, KeysPage)
        assert page.total == 5 and page.next_offset == 2
        assert [info.key for info in page.keys] == ["a0", "a1"]
        rest = await ask(client, KeysRequest(job_type="a", limit=10, offset=page.next_offset))
        assert isinstance(rest, KeysPage)
        assert [info.key for info in rest.keys] == ["a2", "a3", "a4"]
        assert rest.next_offset is None

        paused = await ask(client, KeysRequest(state="paused"))
        assert isinstance(paused, KeysPage)
        assert [(i.key, i.holds, i.owner) for i in paused.keys] == [("a3", ["paused"], None)]
        owned = await ask(client, KeysRequest(worker_id="w1"))
        assert isinstance(owned, KeysPage)
        assert {i.key for i in owned.keys} == {"a0", "a1", "a2", "a4", "b0"}

        async def backlog_of_a3() -> KeysPage:
            answer = await ask(client, KeysRequest(sort="backlog", limit=1))
            assert isinstance(answer, KeysPage)
            return answer

        deadline = asyncio.get_running_loop().time() + 20
        while True:
            top = await backlog_of_a3()
            if top.keys and top.keys[0].key == "a3" and top.keys[0].backlog == 3:
                break
            assert asyncio.get_running_loop().time() < deadline, top
            await asyncio.sleep(0.2)
        assert top.listed_seconds_ago is not None
        ages = registry._lead.reconciler.oldest_age_by_job_type()
        assert set(ages) >= {"a", "b"} and all(age >= 0 for age in ages.values())

        assert (await hold(client, "resume", "a", "a3")).ok
        await eventually(lambda: recorder.values["a3"] == [1, 0, 1, 2])


async def test_a_parked_key_is_skipped_its_head_dead_lettered_and_the_rest_handled(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=1)
    recorder = Recorder()
    app = App()

    @app.handler("jobs", on_failure="park")
    async def record(message: Message) -> None:
        value = int(message.body)
        if value == 2:
            raise ValueError("two is bad")
        recorder.values[message.key].append(value)

    names = Names(settings.namespace)
    async with (
        running_registry(settings) as registry,
        running_worker(settings, app),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        for n in (1, 2, 3, 4):
            await publisher.publish("k", str(n).encode(), job_type="jobs")
        await eventually(lambda: (key_of(registry, "k", "jobs") or None) is not None)
        await eventually(
            lambda: (
                key_of(registry, "k", "jobs").parked is not None and let_go(registry, "k", "jobs")
            )
        )
        parked = key_of(registry, "k", "jobs").parked
        assert "two is bad" in parked.error
        assert recorder.values["k"] == [1]
        page = await ask(client, KeysRequest(state="parked"))
        assert isinstance(page, KeysPage)
        assert [(i.key, i.holds) for i in page.keys] == [("k", ["parked"])]
        assert "two is bad" in (page.keys[0].last_error or "")

        reply = await hold(client, "skip", "jobs", "k")
        assert reply.ok, reply.detail
        await eventually(lambda: recorder.values["k"] == [1, 3, 4])
        assert key_of(registry, "k", "jobs").parked is None
        assert await queue_messages(settings, names.dead_letter_queue) == 1
        assert registry.metrics.skipped_messages._value.get() == 1


async def dead_letters(settings: Settings) -> list[int]:
    """The dead-letter queue's bodies, in its order (read, then put back)."""
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(names.dead_letter_queue, ensure=False)
        found = []
        while (message := await queue.get(fail=False)) is not None:
            found.append(int(message.body))
        return found  # the channel closes: they go back unacked, in order
    finally:
        await connection.close()


async def test_a_redrive_puts_dead_letters_first_then_the_waiting_messages(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=0)
    recorder = Recorder()
    broken = True
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        if broken:
            raise RuntimeError("broken handler")
        recorder.values[message.key].append(int(message.body))

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        # the counter is the process's (the global prometheus registry): other tests redrive
        redriven_before = registry.metrics.redriven_messages._value.get()
        for n in (1, 2, 3):
            await publisher.publish("k", str(n).encode())
        await publisher.publish("other", b"7")  # a dead letter of another key
        deadline = asyncio.get_running_loop().time() + 20
        while len(await dead_letters(settings)) < 4:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        assert (await hold(client, "pause", "default", "k")).ok
        await eventually(lambda: let_go(registry, "k"))
        for n in (4, 5, 6):  # waiting behind the key
            await publisher.publish("k", str(n).encode())
        broken = False

        dry = await ask(client, RedriveRequest(job_type="default", key="k"))
        assert isinstance(dry, RedriveReply), dry
        assert not dry.applied and dry.messages == 3 and dry.not_selected == 1
        assert [(s.key, s.messages) for s in dry.keys] == [("k", 3)]
        assert sorted(await dead_letters(settings)) == [1, 2, 3, 7]  # nothing moved

        applied = await ask(client, RedriveRequest(job_type="default", key="k", apply=True))
        assert isinstance(applied, RedriveReply), applied
        assert applied.applied and applied.messages == 3
        assert [(s.key, s.messages, s.error) for s in applied.keys] == [("k", 3, None)]
        assert await dead_letters(settings) == [7]
        assert key_of(registry, "k").paused  # still paused: nothing handled yet
        assert recorder.values["k"] == []

        assert (await hold(client, "resume", "default", "k")).ok
        await eventually(lambda: len(recorder.values["k"]) >= 6)
        await asyncio.sleep(0.5)
        assert recorder.values["k"] == [1, 2, 3, 4, 5, 6]  # once each, dead letters first
        assert registry.metrics.redriven_messages._value.get() == redriven_before + 3
        assert json.dumps(applied.model_dump())  # a reply the CLI can show


async def test_a_parked_key_stays_parked_with_its_error_when_another_registry_takes_over(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=0)
    recorder = Recorder()
    app = App()

    @app.handler(on_failure="park")
    async def record(message: Message) -> None:
        if message.body == b"2":
            raise ValueError("é" * 1500)  # cut to 1,000 characters, non-ASCII
        recorder.values[message.key].append(int(message.body))

    async with running_worker(settings, app), Publisher(settings) as publisher:
        async with running_registry(settings) as first:
            for n in (1, 2, 3):
                await publisher.publish("k", str(n).encode())
            await eventually(lambda: key_of(first, "k") is not None)
            await eventually(lambda: key_of(first, "k").parked is not None and let_go(first, "k"))
            parked = key_of(first, "k").parked
            await asyncio.sleep(0.5)  # its hold binding is made in the background
        async with running_registry(settings) as second, operator(settings) as client:
            assert key_of(second, "k") is not None
            assert key_of(second, "k").parked == parked
            await asyncio.sleep(1.0)  # the worker rejoined; the key stays held
            assert let_go(second, "k") and recorder.values["k"] == [1]
            reply = await hold(client, "resume", "default", "k")  # tried again, still failing
            assert reply.ok, reply.detail
            await eventually(lambda: key_of(second, "k").parked is not None and let_go(second, "k"))
            reply = await hold(client, "skip", "default", "k")
            assert reply.ok, reply.detail
            await eventually(lambda: recorder.values["k"] == [1, 3])


async def test_the_keys_listing_tells_the_age_of_the_oldest_waiting_message(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs carry the AMQP timestamp; the reconciler's listing with statistics reads the
    head's (the broker collects statistics every few seconds)."""
    monkeypatch.setattr(_reconcile, "_BACKLOG_INTERVAL", 0.5)
    monkeypatch.setattr(_reconcile, "_AGE_INTERVAL", 1.0)
    recorder = Recorder()
    async with (
        running_registry(settings) as registry,
        running_worker(settings, recording_app(recorder)),
        Publisher(settings) as publisher,
        operator(settings) as client,
    ):
        assert (await hold(client, "pause", "default", "k")).ok
        await eventually(lambda: let_go(registry, "k"))
        await publisher.publish("k", b"1")
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            page = await ask(client, KeysRequest(sort="age"))
            assert isinstance(page, KeysPage)
            if page.keys and page.keys[0].oldest_age_seconds is not None:
                break
            assert asyncio.get_running_loop().time() < deadline, page
            await asyncio.sleep(0.5)
        assert 0 <= page.keys[0].oldest_age_seconds < 60
        assert 0 <= registry._lead.reconciler.oldest_age_by_job_type()["default"] < 60


async def test_a_leader_without_the_management_api_leads_without_its_holds_and_says_so(
    settings: Settings, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens where the management API should be: the registry leads after a
    short wait (not the 10 s a slow API gets), with an error naming what it could not read;
    keys still flow."""
    blind = make_settings(amqp_url, settings.namespace, management_url="http://127.0.0.1:9/")
    recorder = Recorder()
    with caplog.at_level("ERROR", logger="rabbitkeys.registry"):
        async with (
            running_registry(blind),
            running_worker(settings, recording_app(recorder)),
            Publisher(settings) as publisher,
        ):
            await publisher.publish("post A", b"1")
            await eventually(lambda: recorder.values["post A"] == [1])
    assert any("CANNOT READ THE HOLDS" in r.getMessage() for r in caplog.records)

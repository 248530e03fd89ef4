"""Held keys keep their text across a registry failover (issue 23): a key queue's name
has only the key's token (a hashed one for most keys), so each hold binding on ``NS.holds``
carries the key's text too (``x-rabbitkeys-key``), which a new leader reads back through
the management API and checks against the token. Real broker, registries and a worker
in-process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import pytest

from rabbitkeys import App, Message, Publisher, Settings, cli
from rabbitkeys._registry.keybook import HOLD_KEY_ARGUMENT
from rabbitkeys._wire.protocol import KeysPage, KeysRequest
from rabbitkeys._wire.topology import HOLD_PARKED, HOLD_PAUSED, KeyRef, Names
from rabbitkeys.tools.cluster import _settings_env

from ..conftest import Broker
from ..support import eventually, make_settings, running_registry, running_worker
from .test_operations import ask, hold, hold_bindings, key_of, let_go, operator

pytestmark = pytest.mark.timeout(120)

#: 1,024 bytes in UTF-8, the most a key may have
LONG_KEY = "ключ/" * 113 + "x" * 7
#: spaces, slashes, both quotes, a backslash, accents, a symbol outside the BMP
ODD_KEY = "post/été \"q\" 'a' \\ 🐇 #1"
TEXTS = ["post A", ODD_KEY, LONG_KEY]


def key_holds(broker: Broker, vhost: str, names: Names) -> dict[tuple[str, str], Any]:
    """The hold bindings of key queues: (queue, hold) -> arguments (one binding each)."""
    found: dict[tuple[str, str], Any] = {}
    for binding in hold_bindings(broker, vhost, names):
        if binding["destination_type"] == "queue":
            where = (binding["destination"], binding["routing_key"])
            assert where not in found, f"two {where} bindings"
            found[where] = binding["arguments"]
    return found


async def listed(settings: Settings, state: str) -> list[str]:
    async with operator(settings) as client:
        page = await ask(client, KeysRequest(state=state))  # type: ignore[arg-type]
    assert isinstance(page, KeysPage), page
    return [info.key for info in page.keys]


async def test_parked_keys_are_listed_and_resumed_by_their_text_after_a_failover(
    amqp_url: str,
    namespace: str,
    broker: Broker,
    session_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert len(LONG_KEY.encode()) == 1024
    settings = make_settings(amqp_url, namespace, max_retries=0)
    names = Names(namespace)
    failing = set(TEXTS)
    handled: list[str] = []
    app = App()

    @app.handler(on_failure="park")
    async def record(message: Message) -> None:
        if message.key in failing:
            raise ValueError(f"cannot post {message.key[:20]}")
        handled.append(message.key)

    async with running_worker(settings, app), Publisher(settings) as publisher:
        async with running_registry(settings) as first:
            for text in TEXTS:
                await publisher.publish(text, b"1")
            for text in TEXTS:
                await eventually(lambda t=text: key_of(first, t) is not None)
                await eventually(lambda t=text: key_of(first, t).parked is not None)
            # each parked binding carries its key's text, unchanged by the management API
            queues = {names.key_queue(KeyRef.of(text)): text for text in TEXTS}
            await eventually(lambda: len(key_holds(broker, session_vhost, names)) == 3)
            holds = key_holds(broker, session_vhost, names)
            for queue, text in queues.items():
                assert holds[(queue, HOLD_PARKED)][HOLD_KEY_ARGUMENT] == text
        # the first registry is gone; a second one leads, knowing the keys by their queues
        async with running_registry(settings) as second:
            for text in TEXTS:
                assert key_of(second, text).ref == KeyRef.of(text)
                assert key_of(second, text).parked is not None
            assert sorted(await listed(settings, "parked")) == sorted(TEXTS)

            # ``rabbitkeys keys --state parked`` shows them so
            for name, value in _settings_env(settings).items():
                monkeypatch.setenv(name, value)
            argv = ["keys", "--state", "parked", "--json", "--timeout", "30"]
            assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
            printed = json.loads(capsys.readouterr().out)
            assert sorted(info["key"] for info in printed["keys"]) == sorted(TEXTS)
            argv = ["keys", "--state", "parked", "--timeout", "30"]
            assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
            table = capsys.readouterr().out
            assert "post A" in table and "#" not in table.replace("#1", "")

            # resumed by their text, they are handled; their bindings go
            await eventually(lambda: all(let_go(second, text) for text in TEXTS))
            failing.clear()
            async with operator(settings) as client:
                for text in TEXTS:
                    reply = await hold(client, "resume", "default", text)
                    assert reply.ok, reply.detail
            await eventually(lambda: sorted(handled) == sorted(TEXTS))
            await eventually(lambda: key_holds(broker, session_vhost, names) == {})


async def test_a_paused_key_nobody_published_to_keeps_its_text_after_a_failover(
    settings: Settings, broker: Broker, session_vhost: str
) -> None:
    """Paused before any message (the registry declares it): after a failover, no
    publisher has named it, and it is listed by its text all the same."""
    names = Names(settings.namespace)
    queue = names.key_queue(KeyRef.of(ODD_KEY))
    async with running_registry(settings), operator(settings) as client:
        reply = await hold(client, "pause", "default", ODD_KEY)
        assert reply.ok, reply.detail
        await eventually(lambda: (queue, HOLD_PAUSED) in key_holds(broker, session_vhost, names))
        arguments = key_holds(broker, session_vhost, names)[(queue, HOLD_PAUSED)]
        assert arguments == {HOLD_KEY_ARGUMENT: ODD_KEY}
    async with running_registry(settings) as second, operator(settings) as client:
        assert key_of(second, ODD_KEY).ref == KeyRef.of(ODD_KEY)
        assert await listed(settings, "paused") == [ODD_KEY]
        status = second._book.status("r", None, 0.0)
        assert status.paused_keys == 1
        reply = await hold(client, "resume", "default", ODD_KEY)
        assert reply.ok, reply.detail
        await eventually(lambda: key_holds(broker, session_vhost, names) == {})


async def test_holds_without_the_text_or_with_another_keys_are_known_by_their_token(
    settings: Settings, broker: Broker, session_vhost: str
) -> None:
    """A hold recorded by an earlier version (no text) still loads, known by the key's
    token; a hold whose text does not hash to its queue's token is not believed: the key
    is known by its token, and the binding is made again without it. Both resume by
    their text and leave no binding behind."""
    names = Names(settings.namespace)
    old, forged = KeyRef.of("post A"), KeyRef.of("post B")
    async with running_registry(settings), operator(settings) as client:
        for ref in (old, forged):
            assert (await hold(client, "pause", "default", ref.key)).ok
        await eventually(lambda: len(key_holds(broker, session_vhost, names)) == 2)
    # rewrite the bindings as an earlier version, and a forger, would have them
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        for ref, text in ((old, None), (forged, "post C")):
            queue = await channel.declare_queue(names.key_queue(ref), passive=True)
            arguments = {HOLD_KEY_ARGUMENT: ref.key}
            await queue.unbind(names.holds_exchange, HOLD_PAUSED, arguments=arguments)
            rebound = {} if text is None else {HOLD_KEY_ARGUMENT: text}
            await queue.bind(names.holds_exchange, HOLD_PAUSED, arguments=rebound)
    finally:
        await connection.close()
    holds = key_holds(broker, session_vhost, names)
    assert holds[(names.key_queue(old), HOLD_PAUSED)] == {}
    assert holds[(names.key_queue(forged), HOLD_PAUSED)] == {HOLD_KEY_ARGUMENT: "post C"}

    async with running_registry(settings) as second, operator(settings) as client:
        for ref in (old, forged):
            known = key_of(second, ref.key)
            assert known.paused and known.ref.key == ref.token  # not "post C"
        assert sorted(await listed(settings, "paused")) == sorted([old.token, forged.token])
        # the forged binding is made again without the text it cannot vouch for
        await eventually(
            lambda: (
                key_holds(broker, session_vhost, names)
                == {
                    (names.key_queue(old), HOLD_PAUSED): {},
                    (names.key_queue(forged), HOLD_PAUSED): {},
                }
            )
        )
        for ref in (old, forged):
            reply = await hold(client, "resume", "default", ref.key)
            assert reply.ok, reply.detail
        await eventually(lambda: key_holds(broker, session_vhost, names) == {})

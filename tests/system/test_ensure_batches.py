"""New keys asked together: a publisher's burst of new keys costs the registry fewer requests
than keys (``EnsureKeys``, docs/internals/publisher.md), and each key sees what it would have
seen alone: its routing key, its own refusal, a registry gone and back, a partial answer, an
older registry that knows only ``EnsureKey``. Against the real broker; each test taps
``NS.requests`` to count what the publisher asked."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import (
    App,
    Message,
    ProtocolError,
    Publisher,
    QuotaExceededError,
    RegistryUnavailableError,
)
from rabbitkeys._broker.control import ControlClient
from rabbitkeys._registry import registry as registry_module
from rabbitkeys._wire.protocol import (
    Ensured,
    EnsureKey,
    EnsureKeys,
    KeysEnsured,
    KeyToEnsure,
    decode_control,
    encode_control,
)
from rabbitkeys._wire.topology import Names

from ..proxy import TcpProxy
from ..support import eventually, make_settings, running_registry, running_worker


class Tap:
    """What publishers asked the registry, read from a queue of its own bound to
    ``NS.requests`` (a fanout: it sees every request the registry sees)."""

    def __init__(self) -> None:
        #: per request: its type and how many keys it asked for
        self.requests: list[tuple[str, int]] = []

    def heard(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        request = decode_control(message.body)
        keys = len(request.keys) if isinstance(request, EnsureKeys) else 1
        self.requests.append((request.type, keys))

    @property
    def kinds(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.requests)


@contextlib.asynccontextmanager
async def tapped(amqp_url: str, namespace: str) -> AsyncIterator[Tap]:
    """Needs the namespace's exchanges: enter it once a registry has started once."""
    tap = Tap()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(Names(namespace).requests_exchange)

        async def heard(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            tap.heard(message)

        await queue.consume(heard, no_ack=True)
        yield tap
    finally:
        await connection.close()


def recording_app() -> tuple[App, dict[str, list[int]]]:
    handled: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    return app, handled


async def publish_in_order(publisher: Publisher, key: str, count: int) -> None:
    """``count`` messages of ``key``, each call made before the previous is confirmed (what
    a burst does), numbered in call order."""
    await asyncio.gather(*(publisher.publish(key, str(n).encode()) for n in range(count)))


# --- the protocol (no broker) ------------------------------------------------------------


def test_a_batch_and_its_answers_round_trip() -> None:
    asked = EnsureKeys(
        keys=[KeyToEnsure(job_type="default", key="k1"), KeyToEnsure(job_type="t", key="é")]
    )
    assert decode_control(encode_control(asked)) == asked
    answered = decode_control(
        b'{"type": "keys_ensured", "answers": ['
        b'{"job_type": "default", "key": "k1", "answer": {"type": "ensured", "routing_key": "r"}},'
        b'{"job_type": "t", "key": "k", "answer": {"type": "refused", "reason": "no",'
        b' "code": "quota_exceeded"}}]}'
    )
    assert isinstance(answered, KeysEnsured)
    assert [a.answer.type for a in answered.answers] == ["ensured", "refused"]
    with pytest.raises(ProtocolError):
        decode_control(b'{"type": "ensure_keys", "keys": []}')


# --- against the broker ------------------------------------------------------------------


async def test_a_burst_of_new_keys_is_asked_in_fewer_requests_than_keys(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    keys = [f"burst {i}" for i in range(200)]
    metrics = CollectorRegistry()
    async with (
        running_registry(settings, metrics_registry=metrics) as registry,
        running_worker(settings, app),
        tapped(amqp_url, namespace) as tap,
        Publisher(settings) as publisher,
    ):
        await asyncio.gather(*(publish_in_order(publisher, key, 3) for key in keys))
        await eventually(lambda: sum(map(len, handled.values())) == 3 * len(keys), timeout=60)
        await eventually(lambda: len(tap.requests) >= 2)
        assert len(registry._book.keys) == len(keys)
    assert handled == {key: [0, 1, 2] for key in keys}  # each once, in order
    assert set(tap.kinds) <= {"ensure_key", "ensure_keys"}
    # a request and a reply per 0.1 s of declaring (its answers wait no longer), not per key
    assert len(tap.requests) < len(keys) / 2, tap.requests
    assert sum(asked for _, asked in tap.requests) >= len(keys)
    assert not metrics.get_sample_value("rabbitkeys_malformed_messages_total")


async def test_a_refused_key_among_accepted_ones_fails_alone(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace, max_keys=5)
    app, handled = recording_app()
    keys = [f"k{i}" for i in range(8)]
    metrics = CollectorRegistry()
    async with (
        running_registry(settings, metrics_registry=metrics),
        running_worker(settings, app),
        tapped(amqp_url, namespace) as tap,
        Publisher(settings) as publisher,
    ):
        outcomes = await asyncio.gather(
            *(publisher.publish(key, b"1") for key in keys), return_exceptions=True
        )
        refused = [key for key, o in zip(keys, outcomes, strict=True) if o is not None]
        assert len(refused) == 3
        assert all(isinstance(o, QuotaExceededError) for o in outcomes if o is not None)
        assert "RABBITKEYS_MAX_KEYS=5" in str(next(o for o in outcomes if o is not None))
        await eventually(lambda: len(handled) == 5)
        # counted per key, not per request
        assert metrics.get_sample_value("rabbitkeys_quota_refusals_total") == 3
        assert tap.kinds["ensure_keys"] >= 1 and len(tap.requests) < len(keys)
        # a refused key asks again on its next publish, and is refused again
        with pytest.raises(QuotaExceededError):
            await publisher.publish(refused[0], b"2")
    assert sorted(handled) == sorted(set(keys) - set(refused))


async def test_keys_left_out_of_an_answer_are_asked_again(
    amqp_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that answers in a millisecond what it can: every new key's declare takes
    longer, so its answers are partial, and the publisher asks again for the rest."""
    monkeypatch.setattr(registry_module, "_ENSURE_KEYS_REPLY_WAIT", 0.001)
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    keys = [f"slow {i}" for i in range(40)]
    async with (
        running_registry(settings),
        running_worker(settings, app),
        tapped(amqp_url, namespace) as tap,
        Publisher(settings) as publisher,
    ):
        await asyncio.gather(*(publish_in_order(publisher, key, 2) for key in keys))
        await eventually(lambda: sum(map(len, handled.values())) == 2 * len(keys), timeout=30)
        # asked more than once: more keys asked for than there are keys
        assert sum(asked for _, asked in tap.requests) > len(keys)
    assert handled == {key: [0, 1] for key in keys}


async def test_a_registry_gone_during_a_batched_request_answers_when_back(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=30.0)
    app, handled = recording_app()
    keys = [f"wait {i}" for i in range(50)]
    async with running_worker(settings, app), Publisher(settings) as publisher:
        async with running_registry(settings):
            await publisher.publish("first", b"0")
        # no registry: the requests wait in its queue, unanswered
        async with tapped(amqp_url, namespace) as tap:
            burst = asyncio.gather(*(publish_in_order(publisher, key, 2) for key in keys))
            await eventually(lambda: tap.kinds["ensure_keys"] >= 1)
            await asyncio.sleep(0.5)
            assert not burst.done()
            async with running_registry(settings):
                await asyncio.wait_for(burst, 30)
                await eventually(lambda: sum(map(len, handled.values())) == 1 + 2 * len(keys))
    assert handled == {"first": [0]} | {key: [0, 1] for key in keys}


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the broker, for the publisher only."""
    parts = urllib.parse.urlsplit(amqp_url)
    with TcpProxy(parts.hostname or "localhost", parts.port or 5672) as tcp_proxy:
        yield tcp_proxy


async def test_a_connection_lost_during_a_batched_request_asks_again_on_the_next(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=30.0)
    publisher_settings = make_settings(proxy.url(amqp_url), namespace, ensure_timeout=30.0)
    app, handled = recording_app()
    keys = [f"cut {i}" for i in range(30)]
    async with running_worker(settings, app), Publisher(publisher_settings) as publisher:
        async with running_registry(settings):
            await publisher.publish("first", b"0")
        async with tapped(amqp_url, namespace) as tap:
            burst = asyncio.gather(*(publish_in_order(publisher, key, 2) for key in keys))
            await eventually(lambda: tap.kinds["ensure_keys"] >= 1)
            asked = len(tap.requests)
            proxy.cut()  # the request waits in the registry's queue; its reply queue goes
            await eventually(lambda: len(tap.requests) > asked, timeout=30)  # asked again
            async with running_registry(settings):
                await asyncio.wait_for(burst, 30)
                await eventually(lambda: sum(map(len, handled.values())) == 1 + 2 * len(keys))
    assert handled == {"first": [0]} | {key: [0, 1] for key in keys}


async def test_without_a_registry_each_key_fails_at_its_own_timeout(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=1.0)
    async with running_registry(settings):
        pass  # the namespace's exchanges exist; no registry answers from now on
    async with Publisher(settings) as publisher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(publisher.publish("a", b"1"))
        await asyncio.sleep(0.5)  # these become due while the first request is out
        later = [asyncio.ensure_future(publisher.publish(f"b{i}", b"1")) for i in range(5)]
        with pytest.raises(RegistryUnavailableError):
            await first
        assert loop.time() - started < 1.4
        for publish in later:
            with pytest.raises(RegistryUnavailableError):
                await publish
        assert loop.time() - started < 2.0  # each its own second, not one after the other


async def test_an_older_registry_that_refuses_batches_gets_one_key_per_request(
    amqp_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry older than ``EnsureKeys`` parses it as an unknown message and refuses it;
    the publisher asks each key alone from then on (until it reconnects)."""
    decode = registry_module.decode_control

    def decode_as_before(body: bytes, **options: Any) -> Any:
        if b'"ensure_keys"' in body:
            raise ProtocolError("malformed control message at message: unknown tag 'ensure_keys'")
        return decode(body, **options)

    monkeypatch.setattr(registry_module, "decode_control", decode_as_before)
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    keys = [f"old {i}" for i in range(20)]
    async with (
        running_registry(settings),
        running_worker(settings, app),
        tapped(amqp_url, namespace) as tap,
        Publisher(settings) as publisher,
    ):
        await asyncio.gather(*(publish_in_order(publisher, key, 2) for key in keys))
        await asyncio.gather(*(publish_in_order(publisher, f"later {i}", 1) for i in range(5)))
        await eventually(lambda: sum(map(len, handled.values())) == 2 * len(keys) + 5)
        # one batch tried, refused; then one EnsureKey per key
        assert tap.kinds["ensure_keys"] == 1
        assert tap.kinds["ensure_key"] >= len(keys) + 5
    assert {key: handled[key] for key in keys} == {key: [0, 1] for key in keys}


async def test_the_registry_answers_both_a_single_ensure_and_a_batch(
    amqp_url: str, namespace: str
) -> None:
    """What an older publisher sends (one ``EnsureKey``) is answered as before."""
    settings = make_settings(amqp_url, namespace)
    async with running_registry(settings) as registry:
        connection = await aio_pika.connect(amqp_url)
        try:
            names = Names(namespace)
            control = ControlClient(connection, names, "guest")
            await control.start()
            single = await control.request(EnsureKey(job_type="default", key="one"), timeout=10)
            assert isinstance(single, Ensured)
            batch = await control.request(
                EnsureKeys(
                    keys=[
                        KeyToEnsure(job_type="default", key="one"),
                        KeyToEnsure(job_type="default", key="two"),
                        KeyToEnsure(job_type="other", key="one"),
                    ]
                ),
                timeout=10,
            )
            assert isinstance(batch, KeysEnsured)
            answers = {(a.job_type, a.key): a.answer for a in batch.answers}
            assert set(answers) == {("default", "one"), ("default", "two"), ("other", "one")}
            assert answers[("default", "one")] == single  # the same key, the same binding
            assert all(isinstance(answer, Ensured) for answer in answers.values())
            await control.close()
        finally:
            await connection.close()
        assert len(registry._book.keys) == 3

"""Publisher failure paths: bad input is refused before anything is sent; no registry means a
clear error, never a message reported as published; what a publisher holds is bounded; a
publish that gives up says whether its message may still arrive; outages come from a TCP
proxy in front of the broker (``tests/proxy.py``), never from stopping the shared broker."""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from rabbitkeys import (
    App,
    BrokerUnavailableError,
    ConfigError,
    InvalidKeyError,
    InvalidMessageError,
    Message,
    Publisher,
    PublishError,
    PublishOutcomeUnknownError,
    RegistryUnavailableError,
    Settings,
    load_settings,
)

from ..proxy import TcpProxy
from ..support import eventually, make_settings, running_registry, running_worker


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key": ""}, InvalidKeyError),
        ({"key": 7}, InvalidKeyError),
        ({"key": "k", "job_type": "has.dot"}, InvalidKeyError),
        ({"key": "k", "payload": object()}, InvalidMessageError),
        ({"key": "k", "headers": {"x-rabbitkeys-seq": 1}}, InvalidMessageError),
        ({"key": "k", "headers": {"when": object()}}, InvalidMessageError),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_sent(
    settings: Settings, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    arguments = {"payload": b"x", **kwargs}
    async with running_registry(settings) as registry, Publisher(settings) as publisher:
        with pytest.raises(error):
            await publisher.publish(**arguments)
        # and the publisher still works afterwards
        await publisher.publish("k", b"fine")
        assert list(registry._book.keys) == ["default/k"]


async def test_without_a_registry_publish_raises_registry_unavailable(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=0.5)
    async with Publisher(settings) as publisher:
        with pytest.raises(RegistryUnavailableError, match="no registry answered"):
            await publisher.publish("k", b"x")


async def test_a_publish_made_before_the_registry_starts_waits_for_it(
    settings: Settings,
) -> None:
    async with Publisher(settings) as publisher:
        pending = asyncio.create_task(publisher.publish("k", b"x"))
        await asyncio.sleep(0.5)
        assert not pending.done()
        async with running_registry(settings):
            await asyncio.wait_for(pending, 10)


async def test_publish_before_start_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(PublishError, match="not started"):
        await Publisher(settings).publish("k", b"x")


# --- outages through a proxy; what a publisher holds; what a failed publish means ----------


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the broker, for the publisher only (registry and workers
    connect to the broker directly and are not disturbed)."""
    parts = urllib.parse.urlsplit(amqp_url)
    with TcpProxy(parts.hostname or "localhost", parts.port or 5672) as tcp_proxy:
        yield tcp_proxy


def recording_app() -> tuple[App, dict[str, list[bytes]]]:
    handled: dict[str, list[bytes]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(message.body)

    return app, handled


async def test_a_publish_while_the_broker_is_away_is_withdrawn_with_a_clear_error(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    """Was tests/system/test_resilience.py's flaky broker stop_app test: now on the proxy, with
    waits for events (the publisher noticed the loss, reconnected) instead of timing."""
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    publisher_settings = make_settings(proxy.url(amqp_url), namespace, publish_timeout=3.0)
    async with (
        running_registry(settings),
        running_worker(settings, app),
        Publisher(publisher_settings) as publisher,
    ):
        await publisher.publish("k", b"before")  # the key is routed: no registry needed
        proxy.outage()
        await eventually(lambda: not publisher.connected, timeout=30)
        with pytest.raises(PublishError, match="withdrawn and will never be delivered") as caught:
            await publisher.publish("k", b"during")
        assert type(caught.value) is PublishError  # not "outcome unknown": it was never sent
        assert "no connection to the broker" in str(caught.value)
        assert publisher.pending_messages == 0  # withdrawn: it holds nothing of it
        proxy.accept()
        await eventually(lambda: publisher.connected, timeout=30)
        await publisher.publish("k", b"after")  # and it recovers by itself
        await eventually(lambda: b"after" in handled["k"], timeout=30)
    assert handled["k"] == [b"before", b"after"]  # "during" never arrives, not even late


async def test_start_waits_for_the_broker_and_fails_clearly_when_it_never_comes(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(proxy.url(amqp_url), namespace, publish_timeout=2.0)
    proxy.refuse()
    with pytest.raises(BrokerUnavailableError, match=r"cannot connect to .* within 2s"):
        await Publisher(settings).start()
    assert proxy.connections >= 1
    publisher = Publisher(make_settings(proxy.url(amqp_url), namespace, publish_timeout=120.0))
    starting = asyncio.create_task(publisher.start())
    attempts = proxy.connections
    await eventually(lambda: proxy.connections >= attempts + 3, timeout=30)
    proxy.accept()
    await asyncio.wait_for(starting, 60)
    assert publisher.connected
    await publisher.close()


async def test_a_waiting_publish_cuts_a_long_reconnect_backoff_short(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace)
    publisher_settings = make_settings(proxy.url(amqp_url), namespace, publish_timeout=120.0)
    async with running_registry(settings), Publisher(publisher_settings) as publisher:
        await publisher.publish("k", b"before")
        proxy.outage()
        await eventually(lambda: not publisher.connected, timeout=30)
        # With nothing waiting the backoff doubles from 0.1 s: after 6 failed attempts it is
        # at its 5 s ceiling (2.5-5 s jittered).
        attempts = proxy.connections
        await eventually(lambda: proxy.connections >= attempts + 6, timeout=60)
        pending = asyncio.create_task(publisher.publish("k", b"during"))
        # A publish waits now: attempts follow at most 0.25 s apart. Ten of them at the
        # ceiling would take 25 s or more, so this wait only passes with the hurry.
        attempts = proxy.connections
        await eventually(lambda: proxy.connections >= attempts + 10, timeout=20)
        assert not pending.done()
        proxy.accept()
        await asyncio.wait_for(pending, 60)
        assert publisher.connected


async def test_a_stalled_broker_bounds_what_is_held_withdraws_the_unsent_and_flags_the_sent(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    publisher_settings = make_settings(
        proxy.url(amqp_url), namespace, publish_timeout=3.0, max_pending_messages=5
    )
    async with (
        running_registry(settings),
        running_worker(settings, app),
        Publisher(publisher_settings) as publisher,
    ):
        await publisher.publish("k", b"0")
        proxy.stall()  # the connection stays open, no byte passes
        calls = [asyncio.create_task(publisher.publish("k", str(n).encode())) for n in range(1, 26)]
        await eventually(lambda: publisher.waiting_for_room == 20)
        assert publisher.pending_messages == 5  # the bound: 5 written, 20 wait in line
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        # one message of a key is in flight at a time (max_in_flight_per_key): the first,
        # written to the (stalled) connection, may still arrive, and says so
        assert isinstance(outcomes[0], PublishOutcomeUnknownError), outcomes
        assert "may still be delivered" in str(outcomes[0])
        # the 4 that waited in the lane behind it, for its confirm, were withdrawn unsent
        assert all(type(o) is PublishError for o in outcomes[1:5]), outcomes
        assert "earlier messages of its key were not settled" in str(outcomes[1])
        # the 20 that waited for room were withdrawn too: plain PublishError, never delivered
        # (each reason names where it waited: room freed by the withdrawn ones lets some
        # into the lane first)
        assert all(type(o) is PublishError for o in outcomes[5:]), outcomes
        assert all("withdrawn" in str(o) for o in outcomes[5:]), outcomes
        # the one written still holds its room: it sits in the stalled connection's buffers
        assert (publisher.pending_messages, publisher.waiting_for_room) == (1, 0)
        proxy.resume()
        await eventually(lambda: publisher.pending_messages == 0, timeout=30)  # confirmed late
        await publisher.publish("k", b"after")
        await eventually(lambda: b"after" in handled["k"], timeout=30)
    # "may still be delivered": it was; "withdrawn": never, not even after the resume
    assert handled["k"] == [b"0", b"1", b"after"]


async def test_a_cancelled_publish_is_withdrawn_unless_it_was_written(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    publisher_settings = make_settings(proxy.url(amqp_url), namespace, max_pending_messages=2)
    async with (
        running_registry(settings),
        running_worker(settings, app),
        Publisher(publisher_settings) as publisher,
    ):
        await publisher.publish("k", b"0")
        proxy.stall()
        written = asyncio.create_task(publisher.publish("k", b"1"))  # on the stalled connection
        queued = asyncio.create_task(publisher.publish("fresh", b"x"))  # its key awaits a route
        admitting = asyncio.create_task(publisher.publish("k", b"2"))  # no room left
        await eventually(lambda: publisher.waiting_for_room == 1)
        assert publisher.pending_messages == 2
        for task in (admitting, queued, written):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # the unwritten two are gone at once; the written one holds its room until answered
        assert (publisher.pending_messages, publisher.waiting_for_room) == (1, 0)
        proxy.resume()
        await eventually(lambda: publisher.pending_messages == 0, timeout=30)
        await publisher.publish("k", b"3")
        await publisher.publish("fresh", b"y")
        await eventually(lambda: b"3" in handled["k"] and b"y" in handled["fresh"], timeout=30)
    assert handled["k"] == [b"0", b"1", b"3"]  # the written one arrived although cancelled
    assert handled["fresh"] == [b"y"]


async def test_many_publishes_wait_for_room_within_both_bounds_then_all_arrive_in_order(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace)
    app, handled = recording_app()
    publisher_settings = make_settings(
        proxy.url(amqp_url),
        namespace,
        max_pending_messages=200,
        max_pending_bytes=20_000,
        max_message_bytes=1_000,
    )
    keys = [f"k{i}" for i in range(4)]
    per_key = 500
    async with (
        running_registry(settings),
        running_worker(settings, app),
        Publisher(publisher_settings) as publisher,
    ):
        for key in keys:
            await publisher.publish(key, b"-1".ljust(1_000))
        proxy.stall()
        calls = asyncio.gather(
            *(
                publisher.publish(key, str(n).encode().ljust(1_000))
                for n in range(per_key)
                for key in keys
            )
        )
        await eventually(lambda: publisher.waiting_for_room == len(keys) * per_key - 20)
        # 1,000-byte bodies: the byte bound (20 of them) binds before the count bound
        assert (publisher.pending_messages, publisher.pending_bytes) == (20, 20_000)
        proxy.resume()
        await asyncio.wait_for(calls, 120)
        assert (publisher.pending_messages, publisher.pending_bytes) == (0, 0)
        await eventually(lambda: all(len(handled[k]) == per_key + 1 for k in keys), timeout=60)
    for key in keys:
        assert [int(body) for body in handled[key]] == list(range(-1, per_key))


async def test_headers_too_large_for_a_frame_fail_alone_and_disturb_nothing(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    settings = make_settings(amqp_url, namespace)
    async with (
        running_registry(settings),
        Publisher(make_settings(proxy.url(amqp_url), namespace)) as publisher,
    ):
        others = [publisher.publish(f"k{i}", b"x") for i in range(20)]
        big = publisher.publish("big", b"x", headers={"blob": "x" * 200_000})
        *results, big_result = await asyncio.gather(*others, big, return_exceptions=True)
        assert results == [None] * 20
        assert isinstance(big_result, InvalidMessageError)
        assert re.search(r"content header frame of 200\d\d\d bytes", str(big_result))
        assert "frame_max is 131072 bytes" in str(big_result)
        assert proxy.connections == 1  # the broker never saw it: no reconnect
        await publisher.publish("big", b"x", headers={"small": "fine"})
        assert proxy.connections == 1


def test_the_pending_byte_bound_must_hold_the_largest_message() -> None:
    with pytest.raises(ConfigError, match="MAX_PENDING_BYTES must be at least"):
        load_settings(max_message_bytes=2_000, max_pending_bytes=1_000)
    with pytest.raises(ConfigError, match="RABBITKEYS_MAX_PENDING_MESSAGES"):
        load_settings(max_pending_messages=0)


async def test_a_body_over_max_message_bytes_is_refused_before_sending(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_message_bytes=1_000)
    async with running_registry(settings), Publisher(settings) as publisher:
        with pytest.raises(InvalidMessageError, match="body is 1001 bytes; the maximum is 1000"):
            await publisher.publish("k", b"x" * 1_001)
        await publisher.publish("k", b"x" * 1_000)


async def test_a_message_the_broker_keeps_refusing_is_given_up_not_resent_forever(
    amqp_url: str, namespace: str, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop behind the size checks: were one to let a bad message through (here the
    check is switched off), the broker closes the connection over it; after three closes
    with it on the connection it fails, instead of a reconnect loop."""
    monkeypatch.setattr("rabbitkeys._publisher.publisher.header_frame_size", lambda *_: 0)
    settings = make_settings(amqp_url, namespace)
    async with (
        running_registry(settings),
        Publisher(make_settings(proxy.url(amqp_url), namespace)) as publisher,
    ):
        await publisher.publish("bad", b"routed first")
        with pytest.raises(PublishOutcomeUnknownError, match="closed the connection 3 times"):
            await publisher.publish("bad", b"x", headers={"blob": "x" * 200_000})
        await publisher.publish("other", b"fine")  # and it works afterwards
        await publisher.publish("bad", b"fine")
        # three sends, three closes, then one connection that lasts: no loop
        assert proxy.connections == 4


async def test_bursts_across_keys_survive_cut_connections_once_each_and_in_order(
    amqp_url: str, namespace: str, proxy: TcpProxy
) -> None:
    """The in-order resend with many messages in flight per key: bursts of overlapping
    publishes over several keys while the publisher's connection is cut three times."""
    settings = make_settings(amqp_url, namespace)
    handled: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    keys = [f"k{i}" for i in range(6)]
    rounds, per_round = 12, 40
    total = rounds * per_round
    async with (
        running_registry(settings),
        running_worker(settings, app),
        Publisher(
            make_settings(proxy.url(amqp_url), namespace, max_pending_messages=100)
        ) as publisher,
    ):

        async def bursts() -> None:
            for r in range(rounds):
                numbers = range(r * per_round, (r + 1) * per_round)
                await asyncio.gather(
                    *(publisher.publish(k, str(n).encode()) for n in numbers for k in keys)
                )

        publishing = asyncio.create_task(bursts())
        for cut in range(1, 4):
            await eventually(
                lambda cut=cut: sum(map(len, handled.values())) >= cut * total * len(keys) // 5,
                timeout=60,
            )
            # each cut cuts a connection: the publisher's, made again after the last cut
            await eventually(lambda cut=cut: proxy.connections >= cut, timeout=30)
            proxy.cut()
        await asyncio.wait_for(publishing, 120)
        await eventually(lambda: all(len(handled[k]) >= total for k in keys), timeout=60)
        await publisher.publish(keys[0], str(total).encode())  # anything late lands before it
        await eventually(lambda: handled[keys[0]][-1:] == [total], timeout=30)
    assert publisher.resent_messages > 0  # messages were in flight at the cuts
    assert proxy.connections >= 4
    for key in keys:  # each once (the worker drops resent copies), in call order
        expected = list(range(total + 1 if key == keys[0] else total))
        assert handled[key] == expected

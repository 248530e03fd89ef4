"""Quotas: live keys and job types per namespace (the registry), what a worker buffers over
all its keys (basic.qos global), and the broker's own vhost queue limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rabbitkeys import (
    App,
    ConfigError,
    Message,
    Publisher,
    PublishError,
    QuotaExceededError,
    Worker,
)
from rabbitkeys._broker.amqp import broker_version
from rabbitkeys._registry.keybook import RETIRING, Key, KeyState, KeyTable
from rabbitkeys._settings import load_settings
from rabbitkeys._wire.protocol import REFUSED_ERROR, REFUSED_QUOTA_EXCEEDED, Refused, decode_control
from rabbitkeys._wire.topology import KeyRef, Names

from ..conftest import LOCAL_BROKER
from ..support import eventually, make_settings, running_registry, running_worker

# --- pure parts ---------------------------------------------------------------------------


def test_a_refusal_from_an_older_registry_still_parses() -> None:
    old = decode_control(b'{"type": "refused", "reason": "no"}')
    assert isinstance(old, Refused) and old.code == REFUSED_ERROR
    newer = decode_control(b'{"type": "refused", "reason": "no", "code": "some_later_code"}')
    assert isinstance(newer, Refused) and newer.code == "some_later_code"
    assert decode_control(
        Refused(reason="full", code=REFUSED_QUOTA_EXCEEDED).model_dump_json().encode()
    )


def test_the_buffer_cap_defaults_to_a_full_prefetch_for_every_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert settings.max_buffered_messages is None
    assert settings.buffered_messages_cap == settings.concurrency * settings.prefetch == 256
    assert settings.max_keys == 50_000 and settings.max_job_types == 1_000
    # a 16-bit field in basic.qos
    assert load_settings(concurrency=1000, prefetch=100).buffered_messages_cap == 65535
    monkeypatch.setenv("RABBITKEYS_MAX_BUFFERED_MESSAGES", "100")
    assert load_settings().buffered_messages_cap == 100


def test_a_buffer_cap_below_concurrency_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_MAX_BUFFERED_MESSAGES", "10")
    with pytest.raises(ConfigError, match=r"RABBITKEYS_MAX_BUFFERED_MESSAGES.*CONCURRENCY"):
        load_settings()
    monkeypatch.setenv("RABBITKEYS_MAX_BUFFERED_MESSAGES", "70000")
    with pytest.raises(ConfigError, match="RABBITKEYS_MAX_BUFFERED_MESSAGES"):
        load_settings()
    for name in ("RABBITKEYS_MAX_KEYS", "RABBITKEYS_MAX_JOB_TYPES"):
        monkeypatch.delenv("RABBITKEYS_MAX_BUFFERED_MESSAGES", raising=False)
        monkeypatch.setenv(name, "0")
        with pytest.raises(ConfigError, match=name):
            load_settings()
        monkeypatch.delenv(name)


_operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "del", "pop", "pop-missing", "clear"]),
        st.integers(0, 5),  # key
        st.sampled_from(["a", "b", "c"]),  # job type
    ),
    max_size=60,
)


@given(_operations)
def test_the_key_table_counts_job_types_through_every_change(
    operations: list[tuple[str, int, str]],
) -> None:
    table = KeyTable()
    names = Names("t")
    for operation, n, job_type in operations:
        key_id = f"k{n}"
        if operation == "set":
            ref = KeyRef(job_type, key_id, key_id)
            table[key_id] = Key(ref, names.key_queue(ref), KeyState.UNOWNED)
        elif operation == "del" and key_id in table:
            del table[key_id]
        elif operation == "pop":
            table.pop(key_id, None)
        elif operation == "pop-missing":
            assert table.pop("absent", None) is None
        elif operation == "clear":
            table.clear()
        assert table.job_types == Counter(key.ref.job_type for key in table.values())
    with pytest.raises(NotImplementedError):
        table.update({})


# --- keys and job types per namespace (the registry) --------------------------------------


async def test_a_new_key_beyond_max_keys_is_refused_and_existing_keys_keep_working(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_keys=3)
    handled: dict[str, list[int]] = defaultdict(list)
    metrics = CollectorRegistry()
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled[message.key].append(int(message.body))

    async with (
        running_registry(settings, metrics_registry=metrics) as registry,
        running_worker(settings, app),
    ):
        async with Publisher(settings) as publisher:
            for key in ("k1", "k2", "k3"):
                await publisher.publish(key, b"1")
            with pytest.raises(QuotaExceededError, match="RABBITKEYS_MAX_KEYS=3") as refused:
                await publisher.publish("k4", b"1")
            assert isinstance(refused.value, PublishError)  # callers catching that still do
            # the limit stays, and the keys that exist keep working at it, in order
            published = await asyncio.gather(
                *(publisher.publish(key, str(n).encode()) for n in (2, 3) for key in ("k1", "k3"))
            )
            assert published == [None] * 4
            with pytest.raises(QuotaExceededError):
                await publisher.publish("k4", b"again")
            assert sorted(k.ref.key for k in registry._book.keys.values()) == ["k1", "k2", "k3"]
            assert metrics.get_sample_value("rabbitkeys_quota_refusals_total") == 2
        await eventually(lambda: sum(map(len, handled.values())) == 7)
    assert handled == {"k1": [1, 2, 3], "k2": [1], "k3": [1, 2, 3]}


async def test_a_retiring_key_counts_until_it_is_gone_then_frees_its_place(
    amqp_url: str, namespace: str
) -> None:
    # retire_grace keeps the retirement going long enough to publish into it
    settings = make_settings(amqp_url, namespace, max_keys=1, idle_period=1.0, retire_grace=8.0)
    handled: list[str] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append(message.key)

    async with running_registry(settings) as registry, running_worker(settings, app):
        async with Publisher(settings) as publisher:
            await publisher.publish("old", b"x")
            await eventually(lambda: handled == ["old"])
            [old] = registry._book.keys.values()
            await eventually(lambda: old.state in RETIRING, timeout=20)
            with pytest.raises(QuotaExceededError, match="RABBITKEYS_MAX_KEYS=1"):
                await publisher.publish("new", b"y")
            assert registry.keys_retired == 0, "the retirement outlived its grace: test void"
            await eventually(lambda: registry.keys_retired == 1, timeout=30)
            assert not registry._book.keys
            await publisher.publish("new", b"y")
        await eventually(lambda: handled == ["old", "new"])


async def test_a_key_of_a_new_job_type_beyond_max_job_types_is_refused(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, max_job_types=2)
    handled: list[tuple[str, str]] = []
    app = App()
    for job_type in ("a", "b", "c"):

        @app.handler(job_type)
        async def record(message: Message) -> None:
            handled.append((message.job_type, message.key))

    async with running_registry(settings) as registry, running_worker(settings, app):
        async with Publisher(settings) as publisher:
            await publisher.publish("k1", b"", job_type="a")
            await publisher.publish("k1", b"", job_type="b")
            with pytest.raises(QuotaExceededError, match=r"RABBITKEYS_MAX_JOB_TYPES=2.*'c'"):
                await publisher.publish("k1", b"", job_type="c")
            # more keys of a job type that has live keys are no new job type
            await publisher.publish("k2", b"", job_type="a")
            assert registry._book.keys.job_types == Counter({"a": 2, "b": 1})
        await eventually(lambda: len(handled) == 3)
    assert sorted(handled) == [("a", "k1"), ("a", "k2"), ("b", "k1")]


# --- what a worker buffers over all its keys ----------------------------------------------


def _held(worker: Worker) -> int:
    """Deliveries the worker holds now: handlers running plus those waiting behind them."""
    gauges = worker.gauge_values()
    held = int(gauges["rabbitkeys_buffered_messages"] + gauges["rabbitkeys_in_flight_messages"])
    assert held == sum(len(owned.buffer) for owned in worker._handoff.holds())
    return held


async def _global_qos(amqp_url: str) -> bool:
    """Whether the worker caps its classic keys with a global qos here (RabbitMQ 3.x)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        return broker_version(connection) < (4, 0)
    finally:
        await connection.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_worker_holds_its_cap_over_keys_that_fit_in_it_on_every_broker(
    amqp_url: str, namespace: str, queue_type: str
) -> None:
    """3 keys x 10 messages, 3 blocked handlers, prefetch 4, cap 9: unbounded, a worker would
    hold 12; it holds 9, whether the broker keeps the cap (a global qos: classic keys on
    RabbitMQ 3.x) or the worker does (each key's prefetch out of the cap, 4 + 4 + 1: quorum
    keys, and RabbitMQ 4, which reads a global qos as a per-key prefetch: 27 here)."""
    cap, keys, per_key = 9, ["post A", "user/42", "https://example.com/a?b=c"], 10
    settings = make_settings(
        amqp_url,
        namespace,
        concurrency=3,
        prefetch=4,
        max_buffered_messages=cap,
        batch_max_jobs=1,
        queue_type=queue_type,
    )
    release = asyncio.Event()
    handled: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def blocked(message: Message) -> None:
        await release.wait()
        handled[message.key].append(int(message.body))

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with Publisher(settings) as publisher:
            for n in range(per_key):
                for key in keys:
                    await publisher.publish(key, str(n).encode())
        await eventually(lambda: _held(worker) >= cap and len(worker.owned_keys) == 3, 20)
        most = _held(worker)
        for _ in range(10):  # room for deliveries beyond the cap to show up
            await asyncio.sleep(0.05)
            most = max(most, _held(worker))
        assert most == cap
        release.set()
        await eventually(lambda: sum(map(len, handled.values())) == len(keys) * per_key, 30)
    assert all(handled[key] == list(range(per_key)) for key in keys)


async def test_a_worker_holds_no_more_than_its_cap_over_all_keys_also_across_a_handoff(
    amqp_url: str, namespace: str
) -> None:
    """12 keys x 8 messages, 3 handlers, prefetch 4: unbounded, a worker would hold 48.
    With a cap of 5 it holds 5, also after keys were handed to a second worker (whose
    release path issues a qos round trip: a per-consumer qos there would lift the cap).
    Where the worker keeps the cap itself (RabbitMQ 4), a key must get at least one
    delivery or it never runs: 12 keys over a cap of 5 hold at most the cap plus one per
    key beyond it (4 + 1 + 10 x 1 = 15 here), never the cap per key."""
    cap, keys, per_key = 5, [f"key-{n}" for n in range(12)], 8
    broker_cap = await _global_qos(amqp_url)
    # The cap counts deliveries: one job per message, so that 96 jobs are 96 deliveries.
    settings = make_settings(
        amqp_url, namespace, concurrency=3, prefetch=4, max_buffered_messages=cap, batch_max_jobs=1
    )
    tickets = asyncio.Semaphore(0)  # one per handler the test lets finish
    handled: dict[str, list[int]] = defaultdict(list)
    workers: list[Worker] = []
    most_held: Counter[str] = Counter()

    def sample() -> None:
        for worker in workers:
            most_held[worker.worker_id] = max(most_held[worker.worker_id], _held(worker))

    app = App()

    @app.handler()
    async def blocked(message: Message) -> None:
        sample()
        await tickets.acquire()
        handled[message.key].append(int(message.body))

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(0.005)

    sampling = asyncio.create_task(sampler())
    try:
        async with running_registry(settings) as registry:
            async with running_worker(settings, app, worker_id="first") as first:
                workers.append(first)
                async with Publisher(settings) as publisher:
                    await asyncio.gather(
                        *(
                            publisher.publish(key, str(n).encode())
                            for n in range(per_key)
                            for key in keys
                        )
                    )
                await eventually(lambda: _held(first) >= cap, timeout=20)
                await asyncio.sleep(0.5)  # room for deliveries beyond the cap to show up
                sample()
                if broker_cap:
                    assert most_held["first"] == cap
                else:
                    assert cap < most_held["first"] <= cap + len(keys) - 2

                async with running_worker(settings, app, worker_id="second") as second:
                    workers.append(second)
                    await eventually(lambda: "second" in registry._book.workers)

                    # let handlers finish one at a time until keys have moved to the second
                    # worker (each release requeues a buffer and makes the qos round trip)
                    def moved() -> bool:
                        return bool(second.owned_keys) and not any(
                            key.state is KeyState.MOVING for key in registry._book.keys.values()
                        )

                    async def finish_handlers_until_moved() -> None:
                        while not moved():
                            tickets.release()
                            await asyncio.sleep(0.05)

                    await asyncio.wait_for(finish_handlers_until_moved(), 30)
                    assert len(first.owned_keys) < len(keys)
                    if broker_cap:
                        await eventually(lambda: _held(first) >= cap and _held(second) >= cap, 20)
                    else:
                        # each key's share was fixed when it was consumed: what a worker
                        # holds now depends on which keys moved, so only the bound is sure
                        await eventually(lambda: _held(first) > 0 and _held(second) > 0, 20)
                    await asyncio.sleep(0.5)
                    sample()
                    if broker_cap:
                        assert most_held == {"first": cap, "second": cap}
                    else:
                        assert all(held <= cap + len(keys) - 2 for held in most_held.values())
                    # now let everything through
                    for _ in range(len(keys) * per_key):
                        tickets.release()
                    await eventually(
                        lambda: sum(map(len, handled.values())) == len(keys) * per_key, 60
                    )
    finally:
        sampling.cancel()
    assert handled == {key: list(range(per_key)) for key in keys}
    if broker_cap:
        assert max(most_held.values()) == cap
    else:
        assert max(most_held.values()) <= cap + len(keys) - 2


# --- the broker's queue limit (a vhost of our own) ----------------------------------------


_management = LOCAL_BROKER.api


class _Vhost:
    """A vhost of the test's own, through the management API (or rabbitmqctl when the
    management plugin is off on the local broker)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.quoted = urllib.parse.quote(name, safe="")
        try:
            _management("overview")
            self._api = True
        except (urllib.error.URLError, OSError):
            if shutil.which("rabbitmqctl") is None:
                message = "neither the management API nor rabbitmqctl is available"
                if os.environ.get("CI") == "true":
                    pytest.fail(message)
                pytest.skip(message)
            self._api = False

    def _ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def create(self) -> None:
        if self._api:
            _management(f"vhosts/{self.quoted}", "PUT", {})
            _management(
                f"permissions/{self.quoted}/guest",
                "PUT",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
        else:
            self._ctl("add_vhost", self.name)
            self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    def queues(self) -> list[str]:
        if self._api:
            return [q["name"] for q in _management(f"queues/{self.quoted}?columns=name")]
        return self._ctl("list_queues", "-p", self.name, "--no-table-headers", "name").split()

    def limit_queues(self, count: int) -> None:
        if self._api:
            _management(f"vhost-limits/{self.quoted}/max-queues", "PUT", {"value": count})
        else:
            self._ctl("set_vhost_limits", "-p", self.name, json.dumps({"max-queues": count}))

    def delete(self) -> None:
        with contextlib.suppress(Exception):
            if self._api:
                _management(f"vhosts/{self.quoted}", "DELETE")
            else:
                self._ctl("delete_vhost", self.name)


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[_Vhost]:
    created = _Vhost(f"rabbitkeys-test-quota-{uuid.uuid4().hex[:8]}")
    created.create()
    try:
        yield created
    finally:
        created.delete()


async def test_the_vhost_queue_limit_refuses_a_new_key_and_leaves_no_trace(
    amqp_url: str, namespace: str, vhost: _Vhost
) -> None:
    parts = urllib.parse.urlsplit(amqp_url)
    url = urllib.parse.urlunsplit(parts._replace(path=f"/{vhost.quoted}"))
    settings = make_settings(url, namespace)
    handled: list[tuple[str, bytes]] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append((message.key, message.body))

    metrics = CollectorRegistry()
    async with (
        running_registry(settings, metrics_registry=metrics) as registry,
        running_worker(settings, app),
    ):
        async with Publisher(settings) as publisher:
            await publisher.publish("first", b"1")
            await eventually(lambda: handled == [("first", b"1")])
            # the registry's, workers' and publisher's own queues, and one key queue
            existing = vhost.queues()
            vhost.limit_queues(len(existing))
            with pytest.raises(QuotaExceededError, match="queue limit in vhost") as refused:
                await publisher.publish("second", b"1")
            assert "max-queues" in str(refused.value)
            assert metrics.get_sample_value("rabbitkeys_quota_refusals_total") == 1
            assert sorted(vhost.queues()) == sorted(existing)
            # the key that exists keeps working
            await publisher.publish("first", b"2")
            await eventually(lambda: handled == [("first", b"1"), ("first", b"2")])
            # and the refused key left nothing behind in the registry
            assert [k.ref.key for k in registry._book.keys.values()] == ["first"]
            # once the limit is lifted (negative: none), the same key works
            vhost.limit_queues(-1)
            await publisher.publish("second", b"1")
            await eventually(lambda: ("second", b"1") in handled)


# --- the broker side in deploy/ -----------------------------------------------------------


def test_every_broker_manifest_raises_the_open_file_limit_to_65536() -> None:
    """One queue per key needs file descriptors: RabbitMQ recommends 65,536 or more."""
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    assert compose["services"]["rabbitmq"]["ulimits"]["nofile"] == {
        "soft": 65536,
        "hard": 65536,
    }
    rabbitmq = deploy / "kubernetes" / "rabbitmq"
    [statefulset] = yaml.safe_load_all((rabbitmq / "statefulset" / "statefulset.yaml").read_text())
    [cluster] = yaml.safe_load_all((rabbitmq / "operator" / "rabbitmqcluster.yaml").read_text())
    override = cluster["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"]
    plain = statefulset["spec"]["template"]["spec"]["containers"]
    for containers in (plain, override["containers"]):
        [broker] = [c for c in containers if c["name"] == "rabbitmq"]
        command = broker["command"]
        assert command[:2] == ["sh", "-c"]
        # the soft limit first, then the image's own entrypoint in place of the shell
        assert command[2] == "ulimit -n 65536 && exec docker-entrypoint.sh rabbitmq-server"
    readme = (deploy / "README.md").read_text()
    assert "set_vhost_limits" in readme and "max-queues" in readme

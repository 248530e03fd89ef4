"""Any key inside the contract (a non-empty str of at most 1,024 UTF-8 bytes) works end to
end: its names pass the AMQP client's own checks, and the system handles it through the
broker, across retirements, a registry restart, and a declare the broker refuses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import string
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from rabbitkeys import (
    App,
    InvalidKeyError,
    Message,
    Publisher,
    PublishError,
    RabbitkeysError,
    Settings,
)
from rabbitkeys._admin.status import fetch_status
from rabbitkeys._broker.control import ControlClient
from rabbitkeys._wire.envelope import HEADER_KEY
from rabbitkeys._wire.protocol import (
    EnsureKey,
    KeyAssignment,
    Refused,
    Status,
    decode_control,
    encode_control,
)
from rabbitkeys._wire.topology import (
    MAX_KEY_BYTES,
    KeyRef,
    Names,
    key_matches_token,
    key_queue_arguments,
    new_routing_key,
)
from rabbitkeys.tools.cluster import LocalCluster
from rabbitkeys.tools.demo import check_order, read_records

from ..support import eventually, make_settings, running_registry, running_worker

# pamqp 3.3.0 (what aio-pika 9.4-9.x resolves to) is stricter than the 4.x installed here:
# no '+'. Its check, copied from its constants.py, so names are tested against both.
PAMQP_3_QUEUE_NAME = re.compile(r"^[a-zA-Z0-9-_.:@#,/ ]*$")

# keys as people write them, and whatever else unicode holds
KEYS_PEOPLE_WRITE = [
    "post A",
    "user/123",
    "commentaire/été",
    "a=b",
    "#",
    "*",
    "tab\there",
    "line\nbreak",
    "🎉 party 🐇",
    "заказ-42",
    "https://example.com/search?q=rabbit&page=2#top",
    "user@example.com",
    "a+b",
    "~tilde",
    "a|b",
    " ",
    "x" * 120,
    "x" * 121,
    "é" * 500,  # 1,000 bytes
    "k" * MAX_KEY_BYTES,
]

special = st.sampled_from([*" /#*=|\t\n\r~+@:.,;%&?'\"\\\x00\x7f", "é", "🐇", "ж", "中"])
keys = st.one_of(
    st.text(min_size=1, max_size=400),
    st.lists(
        st.one_of(special, st.sampled_from(string.ascii_letters + string.digits)),
        min_size=1,
        max_size=300,
    ).map("".join),
    st.sampled_from(KEYS_PEOPLE_WRITE),
).filter(lambda key: 0 < len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES)
job_types = st.from_regex(r"[A-Za-z0-9_:-]{1,64}", fullmatch=True)
namespaces = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def marshal(command: commands.Frame) -> bytes:
    """What the client library does before anything reaches the socket: it validates the
    command (pamqp raises ValueError on a name it refuses) and encodes it."""
    return frame.marshal(command, 1)


def assert_valid_queue_name(name: str) -> None:
    assert 0 < len(name.encode()) <= 255, name
    assert PAMQP_3_QUEUE_NAME.fullmatch(name), name


@settings(max_examples=500, deadline=None)
@given(key=keys, job_type=job_types, namespace=namespaces)
def test_every_name_built_from_any_key_passes_pamqps_frames(
    key: str, job_type: str, namespace: str
) -> None:
    try:
        ref = KeyRef.of(key, job_type)
    except InvalidKeyError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in key)  # lone surrogates only
        return
    names = Names(namespace)
    try:
        exchange = names.jobs_exchange(job_type)
    except InvalidKeyError:
        # the one combination that cannot work: AMQP caps exchange names at 127 characters
        assert len(namespace) + len(job_type) > 121
        return
    queue = names.key_queue(ref)
    routing_key = new_routing_key(ref)
    assert_valid_queue_name(queue)
    assert len(routing_key.encode()) <= 255
    marshal(commands.Exchange.Declare(exchange=exchange, exchange_type="direct", durable=True))
    marshal(
        commands.Queue.Declare(queue=queue, durable=True, arguments=key_queue_arguments(3600.0))
    )
    marshal(commands.Queue.Declare(queue=queue, passive=True))
    marshal(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key))
    marshal(commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=routing_key))
    marshal(commands.Queue.Delete(queue=queue, if_empty=True, if_unused=True))
    marshal(commands.Basic.Consume(queue=queue))
    marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True))
    properties = commands.Basic.Properties(delivery_mode=2, headers={HEADER_KEY: ref.key})
    header.ContentHeader(0, 10, properties).marshal()

    # the registry adopts queues by name: the name gives back the key's id and token
    by_name = names.key_of_queue(queue)
    assert by_name is not None
    assert (by_name.id, by_name.token) == (ref.id, ref.token)
    assert key_matches_token(key, by_name.token)
    # and the key travels intact in the control messages
    ensure = EnsureKey(job_type=job_type, key=key, stale_routing_key=routing_key)
    assert decode_control(encode_control(ensure)) == ensure
    assignment = KeyAssignment(
        key_id=ref.id, job_type=job_type, key=key, queue=queue, routing_key=routing_key
    )
    assert KeyAssignment.model_validate_json(assignment.model_dump_json()) == assignment


@given(a=keys, b=keys)
def test_distinct_keys_never_share_a_token(a: str, b: str) -> None:
    try:
        ref_a, ref_b = KeyRef.of(a), KeyRef.of(b)
    except InvalidKeyError:
        return
    assert (ref_a.token == ref_b.token) == (a == b)


@given(key=keys)
def test_plain_and_hashed_tokens_cannot_collide(key: str) -> None:
    """A plain token is the key itself and never holds '#'; a hashed one always does. So
    no key can be its own token and also another key's hashed token."""
    try:
        ref = KeyRef.of(key)
    except InvalidKeyError:
        return
    if ref.token == key:
        assert "#" not in ref.token
    else:
        assert "#" in ref.token
        assert not key_matches_token(ref.token + "x", ref.token)


def test_simple_keys_keep_readable_names() -> None:
    names = Names("ns")
    assert names.key_queue(KeyRef.of("post-42")) == "ns.key.default.post-42"
    assert names.key_queue(KeyRef.of("user@example.com")) == "ns.key.default.user@example.com"
    assert names.key_queue(KeyRef.of("post A")).startswith("ns.key.default.post_A#")


def test_names_of_an_older_token_scheme_are_not_adopted() -> None:
    """Queues named by an earlier release ('~' hashes, '=' or '+' in plain tokens) are not
    this version's names: adopting one would make every worker fail to declare it."""
    names = Names("ns")
    for token in ["~" + "0" * 40, "a=b", "a+b", "a b", "#", "x" * 121]:
        assert names.key_of_queue(f"ns.key.default.{token}") is None, token
    assert names.key_of_queue("ns.key.default.a_b#" + "0" * 40) is not None


def test_a_job_type_too_long_for_the_namespace_is_a_clear_error() -> None:
    with pytest.raises(InvalidKeyError, match="127"):
        Names("n" * 64).jobs_exchange("j" * 64)
    assert Names("n" * 64).jobs_exchange("j" * 57) == "n" * 64 + ".jobs." + "j" * 57


# --- through the broker -----------------------------------------------------------------

MANAGEMENT_URL = os.environ.get("RABBITKEYS_TEST_MANAGEMENT_URL", "http://localhost:15672")


async def wait_for_status(
    settings: Settings, predicate: Callable[[Status], bool], timeout: float = 60.0
) -> Status:
    """Ask the leading registry until its status satisfies ``predicate``."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Status | Exception | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await fetch_status(settings, backlog=False, timeout=5.0)
            if predicate(last):
                return last
        except RabbitkeysError as exc:  # no registry leads yet
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"status not reached within {timeout}s; last: {last!r}")


# keys as people write them, each with a burst of messages in flight at once
E2E_KEYS = [
    *KEYS_PEOPLE_WRITE,
    *(f"commande n°{i} / client «{i % 3}»" for i in range(10)),
    *(f"https://shop.example/cart?id={i}&ref=mail" for i in range(10)),
    *(f"post-{i}" for i in range(10)),
]
E2E_MESSAGES = 12


async def test_keys_as_people_write_them_work_through_cli_processes(
    settings: Settings, tmp_path: Path
) -> None:
    assert len(set(E2E_KEYS)) == len(E2E_KEYS)
    assert any(len(key.encode()) == 1000 for key in E2E_KEYS)
    expected = {(key, n) for key in E2E_KEYS for n in range(1, E2E_MESSAGES + 1)}
    async with LocalCluster(settings, extra_env={"RK_DEMO_DIR": str(tmp_path)}) as cluster:
        await cluster.start_registry()
        for _ in range(3):
            await cluster.start_worker("rabbitkeys.tools.demo:app")
        await cluster.wait_for_workers(3)
        async with Publisher(settings) as publisher:
            half = E2E_MESSAGES // 2
            for numbers in (range(1, half + 1), range(half + 1, E2E_MESSAGES + 1)):
                # every key's new first publishes race their ensure; later ones pipeline
                await asyncio.gather(
                    *(publisher.publish(key, str(n).encode()) for n in numbers for key in E2E_KEYS)
                )
        await eventually(lambda: len(read_records(tmp_path)) >= len(expected), timeout=90)
        status = await fetch_status(settings, backlog=False)
        exit_codes = await cluster.stop_all()

    records = read_records(tmp_path)
    # the handler saw every key's original text, every message once
    assert {(r["key"], int(r["body"])) for r in records} == expected
    assert len(records) == len(expected)
    order = check_order(records)
    for key in E2E_KEYS:
        assert order[key] == sorted(order[key]), key
        bodies = [
            int(r["body"]) for r in sorted(records, key=lambda r: r["started"]) if r["key"] == key
        ]
        assert bodies == list(range(1, E2E_MESSAGES + 1)), key
    assert len({r["pid"] for r in records}) > 1
    # the registry knows each key once, all of them placed
    assert status.keys == len(E2E_KEYS)
    assert status.unassigned_keys == 0
    assert exit_codes == [0, 0, 0, 0]


HASHED_KEYS = ["post A", "user/123", "commentaire/été", "a=b", "🎉 party", "x" * 500]


async def test_hashed_keys_survive_retirement_and_a_registry_killed_and_adopting_from_the_broker(
    amqp_url: str, namespace: str, management_api: None
) -> None:
    """A hashed key's queue name does not hold its text: after a retirement, and after a
    registry restart that knows the key only from the broker's queue listing, the handler
    must still see the original key, in order."""
    settings = make_settings(
        amqp_url, namespace, idle_period=0.5, retire_grace=0.1, management_url=MANAGEMENT_URL
    )
    assert all("#" in KeyRef.of(key).token for key in HASHED_KEYS)
    seen: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen[message.key].append(int(message.body))

    counters = dict.fromkeys(HASHED_KEYS, 0)

    async def burst(publisher: Publisher, size: int) -> None:
        calls = []
        for _ in range(size):
            for key in HASHED_KEYS:
                counters[key] += 1
                calls.append(publisher.publish(key, str(counters[key]).encode()))
        await asyncio.gather(*calls)

    def all_handled() -> bool:
        return all(len(seen[key]) >= counters[key] for key in HASHED_KEYS)

    async with LocalCluster(settings) as cluster, Publisher(settings) as publisher:
        first = await cluster.start_registry()
        async with running_worker(settings, app):
            await burst(publisher, 5)
            await eventually(all_handled, timeout=30)
            # idle keys retire: their queues are deleted
            await wait_for_status(settings, lambda status: status.keys == 0)
            # the publisher's cached routing keys are dead: messages come back, are routed
            # again in their place
            await burst(publisher, 5)
            await eventually(all_handled, timeout=30)
        # No worker now: publishes wait in the key queues, which only the broker knows
        # about once the registry is killed.
        await burst(publisher, 5)
        first.kill()
        await first.wait()
        await cluster.start_registry()
        # the new registry adopts the unconsumed key queues from the broker's listing
        await wait_for_status(settings, lambda status: status.keys == len(HASHED_KEYS))
        async with running_worker(settings, app):
            await eventually(all_handled, timeout=30)
            # keys the new registry knew only by token retire and revive too
            await wait_for_status(settings, lambda status: status.keys == 0)
            await burst(publisher, 5)
            await eventually(all_handled, timeout=30)
    assert publisher.returned_messages > 0
    for key in HASHED_KEYS:
        assert seen[key] == list(range(1, counters[key] + 1)), key
    assert set(seen) == set(HASHED_KEYS)


@contextlib.asynccontextmanager
async def aio_pika_connection(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        yield connection
    finally:
        await connection.close()


def management(amqp_url: str, path: str, method: str = "GET", body: Any = None) -> Any:
    """The broker's management API, with the test broker's login."""
    parts = urllib.parse.urlsplit(amqp_url)
    login = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
    request = urllib.request.Request(
        f"{MANAGEMENT_URL}/api/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(login.encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


@pytest.fixture
def management_api(amqp_url: str) -> None:
    """The test needs the management API: skipped without it, a failure under CI."""
    try:
        management(amqp_url, "overview")
    except OSError as exc:
        message = f"the management API ({MANAGEMENT_URL}) does not answer: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def own_vhost(amqp_url: str, management_api: None) -> Iterator[str]:
    """A vhost of this test's own (its queue limit is changed; deleted at the end)."""
    name = f"rk-test-keys-{uuid.uuid4().hex[:8]}"
    management(amqp_url, f"vhosts/{name}", "PUT", {})
    try:
        user = urllib.parse.urlsplit(amqp_url).username or "guest"
        management(
            amqp_url,
            f"permissions/{name}/{user}",
            "PUT",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        yield name
    finally:
        management(amqp_url, f"vhosts/{name}", "DELETE")


def in_vhost(amqp_url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


async def test_a_declare_that_fails_leaves_no_key_behind_and_the_publisher_a_clear_error(
    amqp_url: str, namespace: str, own_vhost: str
) -> None:
    """Two real failures: the broker refuses the declare (the vhost's queue limit), and the
    client refuses the name (a job type too long for the namespace)."""
    vhost_url = in_vhost(amqp_url, own_vhost)
    namespace = namespace.ljust(64, "x")  # the longest: its exchange names hit 127
    settings = make_settings(vhost_url, namespace, management_url=MANAGEMENT_URL)
    seen: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen[message.key].append(int(message.body))

    names = Names(namespace)
    async with (
        running_registry(settings) as registry,
        running_worker(settings, app) as worker,
        Publisher(settings) as publisher,
    ):
        await publisher.publish("user/1", b"1")
        await eventually(lambda: seen["user/1"] == [1])
        first = KeyRef.of("user/1").id
        assert list(registry._book.keys) == [first]

        # 1. the broker refuses: no room for one more queue in the vhost
        queues = management(amqp_url, f"queues/{urllib.parse.quote(own_vhost, safe='')}")
        limit_path = f"vhost-limits/{urllib.parse.quote(own_vhost, safe='')}/max-queues"
        management(amqp_url, limit_path, "PUT", {"value": len(queues)})
        failures = await asyncio.gather(
            *(publisher.publish("post A", str(n).encode()) for n in (1, 2, 3)),
            return_exceptions=True,
        )
        for failure in failures:
            assert isinstance(failure, PublishError), failure
            assert "registry refused key 'post A'" in str(failure)
            assert "queue limit" in str(failure), failure
        refused = KeyRef.of("post A").id
        # nothing left behind: not known, not counted, not assigned to any worker
        assert refused not in registry._book.keys
        assert registry.gauge_values()["rabbitkeys_live_keys"] == 1
        assert worker.owned_keys == [first]
        # the key that exists is not disturbed
        await publisher.publish("user/1", b"2")
        await eventually(lambda: seen["user/1"] == [1, 2])

        # room again (a status request needs a reply queue)
        management(amqp_url, limit_path, "DELETE")
        status = await fetch_status(settings, backlog=False)
        assert (status.keys, status.unassigned_keys) == (1, 0)
        assert [w.keys for w in status.workers] == [1]
        # the same key now works, from a fresh start
        await asyncio.gather(*(publisher.publish("post A", str(n).encode()) for n in (4, 5, 6)))
        await eventually(lambda: seen["post A"] == [4, 5, 6])
        assert sorted(registry._book.keys) == sorted([first, refused])

        # 2. the client library refuses the name: the publisher says so before sending...
        with pytest.raises(InvalidKeyError, match="127"):
            await publisher.publish("k", b"x", job_type="j" * 64)
        # ...and a registry asked anyway refuses it with the reason, keeping nothing
        async with aio_pika_connection(settings) as connection:
            client = ControlClient(connection, names, "guest")
            await client.start()
            reply = await client.request(EnsureKey(job_type="j" * 64, key="k"), timeout=10)
        assert isinstance(reply, Refused) and "127" in reply.reason, reply
        assert sorted(registry._book.keys) == sorted([first, refused])
        assert registry.is_leader


async def test_a_key_whose_queue_vanishes_comes_back_and_its_worker_carries_on(
    amqp_url: str, namespace: str, own_vhost: str
) -> None:
    """An assigned key's queue is deleted under it (an operator): the broker cancels the
    worker's consumer. A worker never declares a key queue (only the registry may), so it
    lets the key go and keeps its session and other keys; the key's next publish comes
    back to its publisher, whose ensure makes the registry declare the queue again."""
    vhost_url = in_vhost(amqp_url, own_vhost)
    settings = make_settings(vhost_url, namespace, management_url=MANAGEMENT_URL)
    seen: dict[str, list[int]] = defaultdict(list)
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen[message.key].append(int(message.body))

    vhost = urllib.parse.quote(own_vhost, safe="")
    lost = KeyRef.of("lost key")
    async with (
        running_registry(settings) as registry,
        running_worker(settings, app) as worker,
        Publisher(settings) as publisher,
    ):
        await asyncio.gather(publisher.publish("lost key", b"1"), publisher.publish("kept", b"1"))
        await eventually(lambda: seen == {"lost key": [1], "kept": [1]})
        worker_id = worker.worker_id
        queue = urllib.parse.quote(Names(namespace).key_queue(lost), safe="")
        management(amqp_url, f"queues/{vhost}/{queue}", "DELETE")
        await eventually(lambda: lost.id not in worker.owned_keys)
        # the worker carries on: same session, its other key flows
        assert worker.worker_id == worker_id and worker.ready
        assert registry.is_leader
        await publisher.publish("kept", b"2")
        await eventually(lambda: seen["kept"] == [1, 2])
        # the key's next message is not lost: it comes back, the registry declares again
        await publisher.publish("lost key", b"2")
        await eventually(lambda: seen["lost key"] == [1, 2], timeout=20)
        assert worker.worker_id == worker_id


async def test_a_new_registry_adopts_only_key_queues_this_version_can_have_made(
    amqp_url: str, namespace: str, own_vhost: str
) -> None:
    """Queues named by an older token scheme, or for a job type too long for the namespace,
    are left alone; an unconsumed key queue beside them is adopted (through the management
    API, as after a failover)."""
    namespace = namespace.ljust(64, "x")
    vhost_url = in_vhost(amqp_url, own_vhost)
    settings = make_settings(vhost_url, namespace, management_url=MANAGEMENT_URL)
    names = Names(namespace)
    orphan = KeyRef.of("orphan / été")
    vhost = urllib.parse.quote(own_vhost, safe="")
    arguments = {"durable": True, "arguments": key_queue_arguments(600.0)}
    for queue in (
        names.key_queue(orphan),
        f"{names.key_queue_prefix}default.~{'0' * 40}",  # an older hashed token
        f"{names.key_queue_prefix}default.a+b",  # an older plain token
        f"{names.key_queue_prefix}{'j' * 64}.k",  # no exchange can be named for it
    ):
        path = f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
        management(amqp_url, path, "PUT", arguments)
    async with running_registry(settings) as registry:
        await eventually(lambda: orphan.id in registry._book.keys, timeout=30)
        status = await fetch_status(settings, backlog=False)
        assert list(registry._book.keys) == [orphan.id]
        assert status.keys == 1
        assert registry.is_leader

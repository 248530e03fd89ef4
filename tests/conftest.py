"""Fixtures: a real RabbitMQ, a vhost per test session, a namespace per test, and
registries/workers run in-process.

The broker is ``RABBITKEYS_TEST_AMQP_URL`` if set, else the one on localhost, else one
started with testcontainers. Its management API is ``RABBITKEYS_TEST_MANAGEMENT_URL`` if
set, else port 15672 of the broker's host. Without a broker or its management API, tests
that need them skip with the reason, except under ``CI=true``, where that is a failure.

Each session creates a vhost of its own and deletes it, with everything in it, at the end:
what a test leaves behind (chaos and bench namespaces, durable queues without expiry) never
slows a later run. ``amqp_url`` points into that vhost. Nothing is created or deleted in the
broker's own vhost except by the few tests that need it (``broker.amqp_url``), which remove
what they created.

The three-node cluster of issue 14 (``rabbit_cluster``, one per session, and ``cluster``, a
vhost of its own on it per test) runs beside the local broker on ports from
``RABBITKEYS_TEST_CLUSTER_PORT_BASE`` (default 5680: AMQP 5681-5683); it skips, or fails under
``CI=true``, where it cannot run (not root, no RabbitMQ server). With
``RABBITKEYS_TEST_CLUSTER_ROOT`` its nodes are the RabbitMQ of that Debian root, run with chroot
(CI's 4.0.5: ``.ci/rabbitmq4.sh root``), their files in the root's /tmp.

Tiers (markers, see pyproject.toml): ``broker`` is added here to every test that uses the
broker fixtures, ``cluster`` (and ``broker``: a cluster is brokers too) to every test that uses
the cluster's; ``processes``, ``slow`` and ``disruptive`` are set by the tests themselves.
``pytest -m "not broker"`` runs the pure tests in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from rabbitkeys import Settings
from rabbitkeys._admin.permissions import Role
from rabbitkeys.tools.rabbit_cluster import ClusterError, RabbitCluster

from .support import IN_CI, make_settings, skip_or_fail
from .trust_support import RoleUsers

LOCAL_URL = "amqp://guest:guest@localhost:5672/"
# vhosts made by a test session carry this description, so that one whose session died
# (SIGKILL, a lost machine) is removed by the next session on the same host
_SESSION_MARK = re.compile(r"^rabbitkeys test session: pid (\d+) on (.+)$")


@dataclass(frozen=True)
class Broker:
    """The broker under test, in its own vhost (usually ``/``)."""

    amqp_url: str
    management_url: str

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 10) -> Any:
        """Call the management API with the AMQP URL's login (or the management URL's)."""
        parts = urllib.parse.urlsplit(self.management_url)
        amqp = urllib.parse.urlsplit(self.amqp_url)
        user = urllib.parse.unquote(parts.username or amqp.username or "guest")
        password = urllib.parse.unquote(parts.password or amqp.password or "guest")
        netloc = parts.hostname or "localhost"
        if parts.port:
            netloc += f":{parts.port}"
        base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{base}/api/{path}", data=data, method=method)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def url_in(self, vhost: str) -> str:
        """The AMQP URL with ``vhost`` as its path."""
        parts = urllib.parse.urlsplit(self.amqp_url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, "")))


def _answers(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 2):
            pass
    except OSError:
        return False

    async def login() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(login())
    except Exception:
        return False
    return True


def _management_url_for(amqp_url: str) -> str:
    explicit = os.environ.get("RABBITKEYS_TEST_MANAGEMENT_URL")
    if explicit:
        return explicit
    return f"http://{urllib.parse.urlsplit(amqp_url).hostname or 'localhost'}:15672"


#: the local broker's management API, for the tests that manage users and vhosts of their own
MANAGEMENT_URL = _management_url_for(LOCAL_URL)
#: the local broker in its own vhost, for those tests' management API calls
LOCAL_BROKER = Broker(LOCAL_URL, MANAGEMENT_URL)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    reasons = []
    explicit = os.environ.get("RABBITKEYS_TEST_AMQP_URL")
    if explicit:
        if _answers(explicit):
            yield Broker(explicit, _management_url_for(explicit))
            return
        reasons.append("RABBITKEYS_TEST_AMQP_URL does not answer")
    elif _answers(LOCAL_URL):
        yield Broker(LOCAL_URL, _management_url_for(LOCAL_URL))
        return
    else:
        reasons.append("no RabbitMQ on localhost:5672")
        try:
            from testcontainers.rabbitmq import RabbitMqContainer

            container = RabbitMqContainer("rabbitmq:3.13-management").with_exposed_ports(15672)
            with container, pytest.MonkeyPatch.context() as patch:
                params = container.get_connection_params()
                url = f"amqp://guest:guest@{params.host}:{params.port}/"  # type: ignore[attr-defined]
                management = f"http://{params.host}:{container.get_exposed_port(15672)}"  # type: ignore[attr-defined]
                # make_settings and the processes tests start read it from here
                patch.setenv("RABBITKEYS_TEST_MANAGEMENT_URL", management)
                yield Broker(url, management)
                return
        except Exception as exc:
            reasons.append(f"testcontainers could not start one ({type(exc).__name__}: {exc})")
    skip_or_fail("no RabbitMQ broker: " + "; ".join(reasons))


@pytest.fixture(scope="session")
def session_vhost(broker: Broker) -> Iterator[str]:
    """A vhost for this test session, with full permissions for the tests' user; deleted
    with everything in it at the end."""
    try:
        _remove_vhosts_of_dead_sessions(broker)
        vhost = f"rabbitkeys-test-{uuid.uuid4().hex[:10]}"
        quoted = urllib.parse.quote(vhost, safe="")
        host = socket.gethostname()
        broker.api(
            f"vhosts/{quoted}",
            "PUT",
            {"description": f"rabbitkeys test session: pid {os.getpid()} on {host}"},
        )
    except (urllib.error.URLError, OSError, ValueError) as exc:
        skip_or_fail(
            f"the tests run in a vhost of their own, made through the management API at "
            f"{broker.management_url}: {exc} (rabbitmq-plugins enable rabbitmq_management)"
        )
    user = urllib.parse.unquote(urllib.parse.urlsplit(broker.amqp_url).username or "guest")
    try:
        broker.api(
            f"permissions/{quoted}/{urllib.parse.quote(user, safe='')}",
            "PUT",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        yield vhost
    finally:
        # Deleting a vhost deletes its queues and exchanges and closes its connections.
        with contextlib.suppress(urllib.error.URLError, OSError):
            broker.api(f"vhosts/{quoted}", "DELETE", timeout=120)


def _remove_vhosts_of_dead_sessions(broker: Broker) -> None:
    host = socket.gethostname()
    for item in broker.api("vhosts?columns=name,description"):
        mark = _SESSION_MARK.match(item.get("description") or "")
        if not (item["name"].startswith("rabbitkeys-test-") and mark and mark[2] == host):
            continue
        try:
            os.kill(int(mark[1]), 0)
            continue  # that session is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a process of another user: alive
        with contextlib.suppress(urllib.error.URLError, OSError):
            broker.api(f"vhosts/{urllib.parse.quote(item['name'], safe='')}", "DELETE", timeout=120)
    # Users the tests made for their namespaces (``t-...``: role_users, chaos's per-role
    # users) outlive a killed session; their permissions went with its vhost.
    with contextlib.suppress(urllib.error.URLError, OSError):
        holders = {item["user"] for item in broker.api("permissions")}
        for user in broker.api("users?columns=name"):
            if user["name"].startswith("t-") and user["name"] not in holders:
                quoted = urllib.parse.quote(user["name"], safe="")
                with contextlib.suppress(urllib.error.URLError, OSError):
                    broker.api(f"users/{quoted}", "DELETE")


@pytest.fixture(scope="session")
def amqp_url(broker: Broker, session_vhost: str) -> str:
    """The AMQP URL of the session's vhost."""
    return broker.url_in(session_vhost)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, broker: Broker, session_vhost: str) -> Iterator[str]:
    name = f"t-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    yield name
    # the vhost goes at the end of the session; until then keep listings short
    delete_namespace(broker, session_vhost, name)


@pytest.fixture
def settings(amqp_url: str, namespace: str) -> Settings:
    return make_settings(amqp_url, namespace)


def delete_namespace(broker: Broker, vhost: str, namespace: str) -> None:
    """Remove the queues and exchanges of ``namespace`` in ``vhost`` (and nothing else)."""
    prefix = f"{namespace}."
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    try:
        queues = broker.api(f"queues/{quoted_vhost}?columns=name")
        exchanges = broker.api(f"exchanges/{quoted_vhost}?columns=name")
    except (urllib.error.URLError, OSError):
        return
    for kind, items in (("queues", queues), ("exchanges", exchanges)):
        for item in items:
            if item["name"].startswith(prefix):
                quoted = urllib.parse.quote(item["name"], safe="")
                with contextlib.suppress(urllib.error.URLError, OSError):
                    broker.api(f"{kind}/{quoted_vhost}/{quoted}", method="DELETE")


# --------------------------------------------------------------------------- tiers

_BROKER_FIXTURES = {"broker", "amqp_url", "session_vhost"}
_CLUSTER_FIXTURES = {"rabbit_cluster", "cluster"}
_CLUSTER_TEST_TIMEOUT = 300  # seconds


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _CLUSTER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.cluster)
            # the first cluster test of a session also pays for starting the cluster
            # (~25 s idle, more under load), and a test restarting nodes ~10 s a node
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(_CLUSTER_TEST_TIMEOUT))
        if (_BROKER_FIXTURES | _CLUSTER_FIXTURES) & fixtures:
            item.add_marker(pytest.mark.broker)
    # The cluster tests last: the session's three nodes run from the first of them to the
    # end of the session, and on a small machine they slow the timing of every later test.
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``CI=true`` nothing skips silently: a skip is reported as a failure."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run everything: {reason}"


@pytest.fixture
def role_users(broker: Broker, session_vhost: str, namespace: str) -> Iterator[RoleUsers]:
    """Three RabbitMQ users for the test's namespace, one per role (publisher, worker,
    registry), each with exactly ``permissions_for`` its role; a test may add more with
    ``role_users.add(role, label)``. All are deleted afterwards, also when the test fails."""
    users = RoleUsers(broker, session_vhost, namespace)
    try:
        for role in (Role.PUBLISHER, Role.WORKER, Role.REGISTRY):
            users.add(role)
        yield users
    finally:
        users.remove_all()


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class ClusterUnderTest:
    """The session's cluster as one test sees it: a vhost of its own, URLs into it."""

    cluster: RabbitCluster
    vhost: str
    #: one AMQP URL per node (guest, the test's vhost), in node order
    amqp_urls: list[str]
    #: one management API URL per node (guest's login in it), in node order
    management_urls: list[str]


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes clustered on localhost for the whole session (~25 s to start,
    ~10 s to stop here); stopped and removed at the end, also when the session is
    interrupted (the finalizer; atexit as a backstop). A cluster a killed session left on
    the same port base is stopped first."""
    root_setting = os.environ.get("RABBITKEYS_TEST_CLUSTER_ROOT")
    root = Path(root_setting) if root_setting else None
    reason = RabbitCluster.usable(root)
    if reason is not None:
        skip_or_fail(f"the three-node RabbitMQ cluster cannot run here: {reason}")
    port_base = int(os.environ.get("RABBITKEYS_TEST_CLUSTER_PORT_BASE", "5680"))
    # a fixed path, not tmp_path: the next session must find a leftover, and the nodes run as
    # rabbitmq, who cannot enter pytest's tmp directories (mode 0700); in the root, if any
    directory = Path(root or "/") / f"tmp/rabbitkeys-test-cluster-{port_base}"
    rabbit = RabbitCluster(directory, port_base=port_base, root=root)
    rabbit.stop_at_exit()
    try:
        rabbit.start()
    except ClusterError as exc:
        skip_or_fail(f"the three-node RabbitMQ cluster did not start: {exc}")
    try:
        yield rabbit
    finally:
        rabbit.stop()


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, rabbit_cluster: RabbitCluster
) -> Iterator[ClusterUnderTest]:
    """The session's cluster with every node running and a fresh vhost for this test alone
    (deleted afterwards, with all its queues)."""
    rabbit_cluster.ensure_all_running()
    vhost = f"t-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
    vhost = "".join(c if c.isalnum() or c in "-_" else "-" for c in vhost)
    rabbit_cluster.create_vhost(vhost, description=f"rabbitkeys test {request.node.nodeid}")
    try:
        yield ClusterUnderTest(
            rabbit_cluster,
            vhost,
            rabbit_cluster.amqp_urls(vhost=vhost),
            rabbit_cluster.management_urls(),
        )
    finally:
        # a node the test killed comes back now, not in the next test: deleting a vhost
        # whose queues live on a down node is not what the next test should wait for
        with contextlib.suppress(ClusterError, urllib.error.URLError, OSError):
            rabbit_cluster.ensure_all_running()
            rabbit_cluster.delete_vhost(vhost)

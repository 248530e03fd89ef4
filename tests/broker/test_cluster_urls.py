"""Several AMQP and management URLs (a cluster's nodes): parsing, moving past a dead node,
spreading connections, and the management API falling over to another endpoint.

A dead node is a closed port (refused at once) or a "blackholed" one: a socket listening
with a full accept queue, whose connects hang as a dropped SYN does. The live node is the
local broker, reached as ``localhost`` and as ``127.0.0.1`` for two nodes that both answer.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from rabbitkeys import BrokerUnavailableError, ConfigError, Settings
from rabbitkeys._broker.connection import (
    NODE_CONNECT_TIMEOUT,
    _connect_in_order,
    connect,
    connected_node,
    nodes_in_order,
)
from rabbitkeys._broker.management import endpoint, endpoints, request
from rabbitkeys._settings import load_settings

from ..conftest import MANAGEMENT_URL
from ..support import make_settings, two_names_of_the_broker, url_at
from ..system.test_tls_and_secrets import clean_environment

SECRET = "s3cr3t-pw"


# --- parsing -------------------------------------------------------------------------------


def test_a_list_of_urls_is_split_and_each_masked() -> None:
    settings = Settings(
        amqp_url=f" amqp://app:{SECRET}@rk1:5672/prod , amqp://app:{SECRET}@rk2:5672/prod,"
        f"amqp://app:{SECRET}@rk3/prod\n"
    )
    assert settings.amqp_urls == [
        f"amqp://app:{SECRET}@rk1:5672/prod",
        f"amqp://app:{SECRET}@rk2:5672/prod",
        f"amqp://app:{SECRET}@rk3/prod",
    ]
    assert settings.amqp_url.get_secret_value() == ",".join(settings.amqp_urls)
    assert (settings.vhost, settings.amqp_user) == ("prod", "app")
    assert settings.amqp_url_masked == (
        "amqp://app:***@rk1:5672/prod,amqp://app:***@rk2:5672/prod,amqp://app:***@rk3/prod"
    )
    assert SECRET not in repr(settings)
    # one management endpoint per AMQP host, RabbitMQ's customary port, the AMQP login
    assert settings.management_urls == ["http://rk1:15672", "http://rk2:15672", "http://rk3:15672"]
    assert [e[:3] for e in endpoints(settings)] == [
        (f"http://rk{n}:15672", "app", SECRET) for n in (1, 2, 3)
    ]


def test_one_url_is_a_list_of_one() -> None:
    settings = Settings(amqp_url="amqps://app:pw@[::1]:5671/prod")
    assert settings.amqp_urls == ["amqps://app:pw@[::1]:5671/prod"]
    assert settings.management_urls == ["https://[::1]:15671"]


def test_nodes_on_one_host_share_one_derived_management_url() -> None:
    settings = Settings(amqp_url="amqp://h:5681/,amqp://h:5682/,amqp://g:5683/")
    assert settings.management_urls == ["http://h:15672", "http://g:15672"]


def test_a_list_of_management_urls_keeps_its_own_logins() -> None:
    settings = Settings(
        amqp_url="amqp://app:pw@rk1/,amqp://app:pw@rk2/",
        management_url="https://admin:adm@rk1:15671, https://admin:adm@rk2:15671/",
    )
    assert settings.management_urls == [
        "https://admin:adm@rk1:15671",
        "https://admin:adm@rk2:15671/",
    ]
    assert [e[:3] for e in endpoints(settings)] == [
        ("https://rk1:15671", "admin", "adm"),
        ("https://rk2:15671", "admin", "adm"),
    ]


@pytest.mark.parametrize(
    ("second", "aspect", "theirs", "ours"),
    [
        (f"amqp://other:{SECRET}@rk2:5672/prod", "user", "'other'", "'app'"),
        (f"amqp://app:{SECRET}@rk2:5672/test", "vhost", "'test'", "'prod'"),
        (f"amqps://app:{SECRET}@rk2:5671/prod", "scheme", "'amqps'", "'amqp'"),
    ],
)
def test_urls_that_differ_are_refused_naming_which_and_how(
    second: str, aspect: str, theirs: str, ours: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = f"amqp://app:{SECRET}@rk1:5672/prod"
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL", f"{first},{first},{second}")
        with pytest.raises(ConfigError) as error:
            load_settings()
    text = str(error.value)
    assert text.startswith("invalid settings: RABBITKEYS_AMQP_URL: URL 3 of 3 (rk2:")
    assert f"has {aspect} {theirs}, URL 1 (rk1:5672) {ours}" in text
    assert SECRET not in text


def test_a_list_from_a_file_is_checked_like_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "amqp-url"
    path.write_text(f"amqp://app:{SECRET}@rk1/prod,\namqp://app:{SECRET}@rk2/prod\n")
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FILE", str(path))
        assert load_settings().amqp_urls == [
            f"amqp://app:{SECRET}@rk1/prod",
            f"amqp://app:{SECRET}@rk2/prod",
        ]
        path.write_text(f"amqp://app:{SECRET}@rk1/prod,amqp://bob:{SECRET}@rk2/prod")
        with pytest.raises(ConfigError, match=rf"_FILE: URL 2 of 2 in {path} \(rk2\) has user"):
            load_settings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"amqp://app:{SECRET}@rk1/,", "URL 2 of 2 is empty"),
        (f"amqp://app:{SECRET}@rk1/,,amqp://app:{SECRET}@rk2/", "URL 2 of 3 is empty"),
        # a comma in a password, unencoded, splits the URL: the error says how to write it
        (f"amqp://app:{SECRET},x@rk1/", "URL 1 of 2 cannot be parsed"),
    ],
)
def test_a_broken_list_is_refused_with_the_comma_hint(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with clean_environment(monkeypatch), pytest.raises(ConfigError) as error:
        load_settings(amqp_url=text)
    assert message in str(error.value)
    assert "a comma in a password must be written %2C" in str(error.value)
    assert SECRET not in str(error.value)


def test_a_comma_in_a_password_written_2c_is_one_url() -> None:
    settings = Settings(amqp_url="amqp://app:a%2Cb@rk1/")
    assert settings.amqp_urls == ["amqp://app:a%2Cb@rk1/"]
    assert endpoints(settings)[0][2] == "a,b"


def test_management_urls_with_different_users_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        clean_environment(monkeypatch),
        pytest.raises(ConfigError, match=r"RABBITKEYS_MANAGEMENT_URL: URL 2 of 2 \(m2\) has user"),
    ):
        load_settings(management_url=f"http://a:{SECRET}@m1,http://b:{SECRET}@m2")


def test_nodes_are_tried_from_the_start_then_from_the_beginning() -> None:
    assert nodes_in_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert nodes_in_order(["a", "b", "c"], 2) == ["c", "a", "b"]


# --- connecting ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _blackholed_port() -> Iterator[int]:
    """A port whose connects hang, as a node whose packets are dropped: a listener with a
    full accept queue (backlog 0, one connection never accepted) drops further SYNs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler.connect(("127.0.0.1", port))
        yield port


def _node(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


async def test_connect_moves_past_a_refusing_node_to_a_live_one(
    amqp_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = url_at(amqp_url, "127.0.0.1", _free_port())
    live = two_names_of_the_broker(amqp_url)[0]
    settings = make_settings(f"{dead},{live}", namespace)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="rabbitkeys"):
        connection = await _connect_in_order(settings, "tester", [dead, live])
    took = time.monotonic() - started
    try:
        assert connected_node(connection) == _node(live)
        assert f"tester connected to node {_node(live)}" in caplog.text
    finally:
        await connection.close()
    print(f"past a refusing node in {took:.3f}s")


async def test_connect_moves_past_a_blackholed_node_within_its_timeout(
    amqp_url: str, namespace: str
) -> None:
    with _blackholed_port() as port:
        dead = url_at(amqp_url, "127.0.0.1", port)
        live = two_names_of_the_broker(amqp_url)[1]
        settings = make_settings(f"{dead},{live}", namespace)
        started = time.monotonic()
        connection = await _connect_in_order(settings, "tester", [dead, live])
        took = time.monotonic() - started
    try:
        assert connected_node(connection) == _node(live)
    finally:
        await connection.close()
    print(f"past a blackholed node in {took:.2f}s (timeout {NODE_CONNECT_TIMEOUT:g}s)")
    # the point: not the minutes of TCP retries an unbounded connect would wait
    assert took < 10 * NODE_CONNECT_TIMEOUT


async def test_when_every_node_is_down_the_error_names_each_without_password() -> None:
    ports = [_free_port(), _free_port()]
    with _blackholed_port() as hung:
        urls = [f"amqp://app:{SECRET}@127.0.0.1:{port}/prod" for port in (*ports, hung)]
        settings = Settings(amqp_url=",".join(urls), namespace="offline")
        with pytest.raises(BrokerUnavailableError) as error:
            await connect(settings, "tester")
    text = str(error.value)
    assert text.startswith("cannot connect to any of the 3 nodes: ")
    for port in ports:
        assert f"amqp://app:***@127.0.0.1:{port}/prod: AMQPConnectionError" in text
    assert f"amqp://app:***@127.0.0.1:{hung}/prod: no connection within 5s" in text
    assert SECRET not in text


async def test_one_url_down_keeps_its_former_message() -> None:
    settings = Settings(amqp_url=f"amqp://app:{SECRET}@127.0.0.1:{_free_port()}/", namespace="o")
    with pytest.raises(BrokerUnavailableError) as error:
        await connect(settings, "tester")
    assert str(error.value).startswith("cannot connect to amqp://app:***@127.0.0.1:")
    assert "nodes" not in str(error.value) and SECRET not in str(error.value)


async def test_connections_spread_over_the_nodes(amqp_url: str, namespace: str) -> None:
    nodes = two_names_of_the_broker(amqp_url)
    settings = make_settings(",".join(nodes), namespace)
    reached = []
    for _ in range(30):  # each start is random: all on one node has odds 2**-29
        connection = await connect(settings, "tester")
        reached.append(connected_node(connection))
        await connection.close()
    counts = {node: reached.count(node) for node in set(reached)}
    print(f"30 connects: {counts}")
    assert set(counts) == {_node(node) for node in nodes}


# --- the management API ----------------------------------------------------------------------


class _Answering(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _http_answering(status: int) -> Iterator[str]:
    """An HTTP endpoint that answers every request with ``status``."""
    handler = type("Handler", (_Answering,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


#: the live endpoint without its login (a base URL as :func:`endpoint` gives it), and that
#: login (``user:password@``, or "" when the AMQP URL's is used): every endpoint of a list
#: must have the same user, so the stand-ins for dead nodes are given it too
_LOGIN, _, _HOST = urllib.parse.urlsplit(MANAGEMENT_URL).netloc.rpartition("@")
_LIVE = urllib.parse.urlsplit(MANAGEMENT_URL)._replace(netloc=_HOST).geturl().rstrip("/")


def _management_settings(amqp_url: str, namespace: str, *bases: str) -> Settings:
    login = f"{_LOGIN}@" if _LOGIN else ""
    given = [base.replace("://", f"://{login}", 1) for base in bases]
    return make_settings(amqp_url, namespace, management_url=",".join(given))


def test_a_request_falls_over_from_a_dead_endpoint_and_starts_there_next(
    amqp_url: str, namespace: str
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    settings = _management_settings(amqp_url, namespace, dead, _LIVE)
    assert endpoint(settings)[0] == dead
    assert request(settings, "overview")["management_version"]
    # the live one answered: the next request (and the error texts) start with it
    assert endpoint(settings)[0] == _LIVE


def test_a_request_falls_over_from_a_blackholed_endpoint(amqp_url: str, namespace: str) -> None:
    with _blackholed_port() as port:
        hung = f"http://127.0.0.1:{port}"
        settings = _management_settings(amqp_url, namespace, hung, _LIVE)
        started = time.monotonic()
        assert request(settings, "overview")["management_version"]
        took = time.monotonic() - started
    print(f"management API past a blackholed endpoint in {took:.2f}s")
    assert took < 60  # the answer timeout: the connect had its own, shorter one


def test_a_5xx_falls_over_and_a_4xx_is_the_answer(amqp_url: str, namespace: str) -> None:
    with _http_answering(503) as failing, _http_answering(404) as refusing:
        settings = _management_settings(amqp_url, namespace, failing, _LIVE)
        assert request(settings, "overview")["management_version"]
        settings = _management_settings(amqp_url, namespace, refusing, _LIVE)
        with pytest.raises(urllib.error.HTTPError) as refused:
            request(settings, "overview")
        refused.value.close()
        assert refused.value.code == 404
        assert endpoint(settings)[0] == refusing


def test_when_no_endpoint_answers_the_error_names_each(amqp_url: str, namespace: str) -> None:
    dead = f"http://app:{SECRET}@127.0.0.1:{_free_port()}"
    with _http_answering(500) as failing:
        given = failing.replace("http://", f"http://app:{SECRET}@")
        settings = _management_settings(amqp_url, namespace, given, dead)
        with pytest.raises(BrokerUnavailableError) as error:
            request(settings, "overview")
    text = str(error.value)
    assert text.startswith(f"management API {failing}: HTTP 500 ")
    assert f"; http://127.0.0.1:{dead.rpartition(':')[2]}: " in text
    assert SECRET not in text

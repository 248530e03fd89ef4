"""Secrets from files, TLS, and URLs that are wrong: each a clear ``ConfigError`` naming the
variable, and the password nowhere but in the broker's login.

TLS is tested through a TLS-terminating proxy (``tests/proxy.py``) in front of the plain local
broker, with a CA and certificates made here (trustme); the broker's own configuration is
left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
import trustme
import yarl
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rabbitkeys import (
    App,
    BrokerUnavailableError,
    ConfigError,
    Message,
    Publisher,
    Settings,
    load_settings,
)
from rabbitkeys._broker.connection import connect
from rabbitkeys._broker.management import endpoint, list_queues
from rabbitkeys._settings import ENV_PREFIX, mask_url
from rabbitkeys._wire.topology import Names
from rabbitkeys.tools.cluster import LocalCluster, _settings_env

from ..conftest import LOCAL_BROKER, MANAGEMENT_URL
from ..proxy import TcpProxy
from ..support import eventually, make_settings, running_registry, running_worker

SECRET = "hunter2-pw"


# --- certificates and proxies ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: Path
    #: a CA that signed nothing here: trusting only it must fail
    other_ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    #: certificate and key in one file, as some secret stores hand them out
    client_bundle_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("rabbitkeys-client")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    other.cert_pem.write_to_path(folder / "other-ca.pem")
    client.cert_chain_pems[0].write_to_path(folder / "client.pem")
    client.private_key_pem.write_to_path(folder / "client.key")
    client.private_key_and_cert_chain_pem.write_to_path(folder / "client-bundle.pem")
    return Pki(
        ca=ca,
        server=server,
        ca_file=folder / "ca.pem",
        other_ca_file=folder / "other-ca.pem",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        client_bundle_file=folder / "client-bundle.pem",
    )


def server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        pki.ca.configure_trust(context)
    return context


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "localhost", parts.port or default_port


@contextlib.contextmanager
def tls_proxy(url: str, default_port: int, context: ssl.SSLContext) -> Iterator[TcpProxy]:
    with TcpProxy(*_host_port(url, default_port), server_ssl=context) as proxy:
        yield proxy


_management_request = LOCAL_BROKER.api


@pytest.fixture
def management() -> str:
    """The broker's management API (the registry reads it; CI enables it)."""
    try:
        _management_request("overview")
    except (urllib.error.URLError, OSError) as exc:
        message = f"the management API at {MANAGEMENT_URL} does not answer: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return MANAGEMENT_URL


@pytest.fixture
def secret_user(amqp_url: str, management: str) -> Iterator[tuple[str, str]]:
    """A broker user of this test's own whose password is distinctive enough to search for
    in every output; removed at the end."""
    user = f"rk-test-{uuid.uuid4().hex[:8]}"
    password = f"{SECRET}-{uuid.uuid4().hex}"
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    _management_request(f"users/{user}", "PUT", {"password": password, "tags": "monitoring"})
    try:
        _management_request(
            f"permissions/{quoted_vhost}/{user}",
            "PUT",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        yield user, password
    finally:
        with contextlib.suppress(urllib.error.URLError, OSError):
            _management_request(f"users/{user}", "DELETE")


def with_login(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    yield monkeypatch


# --- URLs from files ---------------------------------------------------------------------


def test_urls_come_from_files_without_their_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    amqp_file, management_file = tmp_path / "amqp-url", tmp_path / "management-url"
    amqp_file.write_text(f"amqp://app:{SECRET}@broker:5672/prod\n")
    management_file.write_text(f"https://app:{SECRET}@broker:15671\n")
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FILE", str(amqp_file))
        monkeypatch.setenv("RABBITKEYS_MANAGEMENT_URL_FILE", str(management_file))
        settings = load_settings()
    assert settings.amqp_url.get_secret_value() == f"amqp://app:{SECRET}@broker:5672/prod"
    assert settings.management_url is not None
    assert settings.management_url.get_secret_value() == f"https://app:{SECRET}@broker:15671"
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert endpoint(settings)[0] == "https://broker:15671"
    # a child process gets the files, not the password
    env = _settings_env(settings)
    assert env["RABBITKEYS_AMQP_URL_FILE"] == str(amqp_file)
    assert env["RABBITKEYS_MANAGEMENT_URL_FILE"] == str(management_file)
    assert "RABBITKEYS_AMQP_URL" not in env and "RABBITKEYS_MANAGEMENT_URL" not in env
    assert not any(SECRET in value for value in env.values())


def test_a_value_read_from_the_environment_is_stripped_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `kubectl create secret --from-file` of a file written by echo: a newline at the end
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL", "amqp://app:pw@broker/\n")
        assert load_settings().amqp_url.get_secret_value() == "amqp://app:pw@broker/"


@pytest.mark.parametrize("name", ["AMQP_URL", "MANAGEMENT_URL"])
def test_a_value_and_its_file_both_set_is_a_config_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheme = "amqp" if name == "AMQP_URL" else "http"
    (tmp_path / "url").write_text(f"{scheme}://app:{SECRET}@broker/")
    with clean_environment(monkeypatch):
        monkeypatch.setenv(f"RABBITKEYS_{name}", f"{scheme}://app:{SECRET}@broker/")
        monkeypatch.setenv(f"RABBITKEYS_{name}_FILE", str(tmp_path / "url"))
        with pytest.raises(ConfigError) as error:
            load_settings()
    assert f"RABBITKEYS_{name} and RABBITKEYS_{name}_FILE are both set" in str(error.value)
    assert SECRET not in str(error.value)


@pytest.mark.parametrize("name", ["AMQP_URL_FILE", "MANAGEMENT_URL_FILE"])
@pytest.mark.parametrize("problem", ["missing", "a directory", "empty", "not UTF-8"])
def test_an_unreadable_url_file_is_a_config_error_naming_the_variable(
    name: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "url"
    if problem == "a directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    elif problem == "not UTF-8":
        path.write_bytes(b"amqp://app:\xff\xfe@broker/")
    with clean_environment(monkeypatch):
        monkeypatch.setenv(f"RABBITKEYS_{name}", str(path))
        with pytest.raises(ConfigError, match=f"RABBITKEYS_{name}: ") as error:
            load_settings()
    assert str(path) in str(error.value)


def test_a_malformed_url_in_a_file_names_the_file_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "url").write_text(f"http://app:{SECRET}@broker/\n")
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FILE", str(tmp_path / "url"))
        with pytest.raises(ConfigError, match="RABBITKEYS_AMQP_URL_FILE: ") as error:
            load_settings()
    assert "amqp:// or amqps://" in str(error.value)
    assert SECRET not in str(error.value)


def test_the_new_variables_are_known_and_typos_still_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "url").write_text("amqp://localhost/")
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FILE", str(tmp_path / "url"))
        load_settings()
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FLIE", str(tmp_path / "url"))
        with pytest.raises(ConfigError, match=r"unknown setting.*RABBITKEYS_AMQP_URL_FLIE"):
            load_settings()


# --- malformed URLs -----------------------------------------------------------------------

MALFORMED_AMQP_URLS = {
    "another scheme": f"http://app:{SECRET}@broker:5672/",
    "no scheme": f"app:{SECRET}@broker:5672/",
    "no host": f"amqp://app:{SECRET}@:5672/",
    "a port out of range": f"amqp://app:{SECRET}@broker:99999/",
    "a port that is no number": f"amqp://app:{SECRET}@broker:amqp/",
    "a port zero": f"amqp://app:{SECRET}@broker:0/",
    "an unencoded slash in the password": f"amqp://app:{SECRET}/x@broker/",
    "a broken IPv6 host": f"amqp://app:{SECRET}@[::1/",
    "garbage": f"{SECRET} not a url",
    "empty": "",
}


@pytest.mark.parametrize("url", MALFORMED_AMQP_URLS.values(), ids=MALFORMED_AMQP_URLS.keys())
def test_a_malformed_amqp_url_is_a_config_error_naming_the_variable(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL", url)
        with pytest.raises(ConfigError, match="RABBITKEYS_AMQP_URL: the URL ") as error:
            load_settings()
    assert SECRET not in str(error.value)
    with pytest.raises(ValueError) as direct:  # pydantic's own text hides the input too
        Settings(amqp_url=url)
    assert SECRET not in str(direct.value)


@pytest.mark.parametrize(
    "url",
    [f"amqp://app:{SECRET}@broker/", f"https://app:{SECRET}@:15671", "garbage", "http://h:x"],
)
def test_a_malformed_management_url_is_a_config_error_naming_the_variable(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_MANAGEMENT_URL", url)
        with pytest.raises(ConfigError, match="RABBITKEYS_MANAGEMENT_URL: the URL ") as error:
            load_settings()
    assert SECRET not in str(error.value)


def test_ipv6_and_amqps_urls_are_accepted_and_masked() -> None:
    settings = Settings(amqp_url=f"amqps://app:{SECRET}@[::1]:5671/prod")
    assert settings.amqp_url_masked == "amqps://app:***@[::1]:5671/prod"
    # with amqps, the management API is https on RabbitMQ's TLS port
    assert endpoint(settings)[0] == "https://[::1]:15671"
    assert endpoint(Settings(amqp_url="amqp://broker/"))[0] == "http://broker:15672"


@pytest.mark.parametrize(
    "url", [MALFORMED_AMQP_URLS["a port out of range"], MALFORMED_AMQP_URLS["garbage"]]
)
def test_the_registry_command_with_a_malformed_url_says_so_in_one_line(url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    result = subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "registry"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "RABBITKEYS_AMQP_URL": url},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rabbitkeys: invalid settings: RABBITKEYS_AMQP_URL: the URL ")
    assert SECRET not in result.stderr + result.stdout


_URL_LIKE = st.one_of(
    st.text(),
    st.builds(
        "{}://{}:{}@{}:{}/{}".format,
        st.sampled_from(["amqp", "amqps", "http", ""]),
        st.text(),
        st.text(),
        st.text(),
        st.one_of(st.integers(-1, 70000).map(str), st.text()),
        st.text(),
    ),
)


@hypothesis_settings(max_examples=500, deadline=None)
@given(_URL_LIKE)
def test_any_text_as_the_url_is_a_usable_url_or_a_config_error_that_does_not_quote_it(
    text: str,
) -> None:
    try:
        settings = load_settings(amqp_url=text)
    except ConfigError as error:
        # a text with a comma is a list of URLs: the error names the one at fault
        assert re.match(
            r"invalid settings: RABBITKEYS_AMQP_URL: (the URL|URL \d+ of \d+) ", str(error)
        )
        if len(text.strip()) >= 12:
            assert text.strip() not in str(error)
        return
    # accepted: then aio-pika (through yarl) can connect with each, never a traceback later
    for node in settings.amqp_urls:
        url = yarl.URL(node)
        assert url.scheme in ("amqp", "amqps") and url.host


@hypothesis_settings(max_examples=300, deadline=None)
@given(password=st.text(min_size=1), user=st.text(min_size=1, max_size=20))
def test_any_password_percent_encoded_is_accepted_and_masked(password: str, user: str) -> None:
    quoted_user = urllib.parse.quote(user, safe="")
    url = f"amqp://{quoted_user}:{urllib.parse.quote(password, safe='')}@broker:5672/prod"
    settings = load_settings(amqp_url=url)
    # what the client library will log in with
    assert yarl.URL(url).password == password
    assert settings.amqp_url_masked == f"amqp://{quoted_user}:***@broker:5672/prod"
    assert f":{urllib.parse.quote(password, safe='')}@" not in repr(settings)


# --- TLS settings -------------------------------------------------------------------------


def test_tls_files_that_cannot_be_loaded_are_config_errors_naming_the_variable(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted_key = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.client_key_file.read_bytes(), password=None)
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    cases: list[tuple[dict[str, str], str]] = [
        ({"TLS_CA_FILE": str(tmp_path / "missing.pem")}, "RABBITKEYS_TLS_CA_FILE: "),
        ({"TLS_CA_FILE": str(garbage)}, "RABBITKEYS_TLS_CA_FILE: "),
        ({"TLS_CERT_FILE": str(garbage)}, "RABBITKEYS_TLS_CERT_FILE: "),
        ({"TLS_KEY_FILE": str(pki.client_key_file)}, "without RABBITKEYS_TLS_CERT_FILE"),
        (
            {"TLS_CERT_FILE": str(pki.client_cert_file), "TLS_KEY_FILE": str(garbage)},
            "RABBITKEYS_TLS_CERT_FILE / RABBITKEYS_TLS_KEY_FILE: ",
        ),
        # an encrypted key is refused at once, never a passphrase prompt on the terminal
        (
            {"TLS_CERT_FILE": str(pki.client_cert_file), "TLS_KEY_FILE": str(encrypted_key)},
            "unencrypted",
        ),
        # the key is not in the certificate file, and no key file is given
        ({"TLS_CERT_FILE": str(pki.client_cert_file)}, "RABBITKEYS_TLS_CERT_FILE: "),
    ]
    with clean_environment(monkeypatch):
        for variables, expected in cases:
            for name in ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"):
                monkeypatch.delenv(f"RABBITKEYS_{name}", raising=False)
            for name, value in variables.items():
                monkeypatch.setenv(f"RABBITKEYS_{name}", value)
            with pytest.raises(ConfigError) as error:
                load_settings()
            assert expected in str(error.value), (variables, str(error.value))
        # and the good files load
        for name, value in {
            "TLS_CA_FILE": pki.ca_file,
            "TLS_CERT_FILE": pki.client_cert_file,
            "TLS_KEY_FILE": pki.client_key_file,
        }.items():
            monkeypatch.setenv(f"RABBITKEYS_{name}", str(value))
        assert load_settings().tls_ca_file == pki.ca_file


# --- TLS against the broker, through a TLS-terminating proxy --------------------------------


async def test_publish_and_consume_over_amqps_with_the_ca_file(
    amqp_url: str, namespace: str, pki: Pki
) -> None:
    with tls_proxy(amqp_url, 5672, server_context(pki)) as proxy:
        settings = make_settings(proxy.url(amqp_url), namespace, tls_ca_file=pki.ca_file)
        assert settings.amqp_url.get_secret_value().startswith("amqps://guest:guest@127.0.0.1:")
        handled: list[tuple[str, bytes]] = []
        app = App()

        @app.handler()
        async def record(message: Message) -> None:
            handled.append((message.key, message.body))

        async with running_registry(settings), running_worker(settings, app):
            async with Publisher(settings, metrics_registry=CollectorRegistry()) as publisher:
                await asyncio.gather(
                    *(publisher.publish(key, f"{n}".encode()) for n in range(10) for key in "ab")
                )
            await eventually(lambda: len(handled) == 20, timeout=30)
        # registry, worker and publisher all went through the proxy, which speaks only TLS
        assert proxy.connections >= 3
    for key in "ab":
        assert [body for k, body in handled if k == key] == [f"{n}".encode() for n in range(10)]


async def test_a_broker_that_requires_a_client_certificate(
    amqp_url: str, namespace: str, pki: Pki
) -> None:
    with tls_proxy(amqp_url, 5672, server_context(pki, require_client_cert=True)) as proxy:
        url = proxy.url(amqp_url)
        for cert, key in [
            (pki.client_cert_file, pki.client_key_file),
            (pki.client_bundle_file, None),
        ]:
            settings = make_settings(
                url, namespace, tls_ca_file=pki.ca_file, tls_cert_file=cert, tls_key_file=key
            )
            connection = await connect(settings, "test")
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(f"{namespace}.tls", exclusive=True)
                await channel.default_exchange.publish(
                    aio_pika.Message(b"over mutual TLS"), routing_key=queue.name
                )
                message = await queue.get(timeout=10, fail=True)
                assert message is not None and message.body == b"over mutual TLS"
                await message.ack()
            finally:
                await connection.close()

        without = make_settings(url, namespace, tls_ca_file=pki.ca_file)
        with pytest.raises(BrokerUnavailableError) as error:
            await connect(without, "test")
    text = str(error.value)
    assert text.startswith(f"cannot connect to {mask_url(url)}: ")
    assert mask_url(url).startswith(f"amqps://guest:***@127.0.0.1:{proxy.port}/")
    assert "set RABBITKEYS_TLS_CERT_FILE and RABBITKEYS_TLS_KEY_FILE" in text


async def test_a_broker_certificate_from_an_untrusted_ca_fails_clearly(
    amqp_url: str, namespace: str, pki: Pki
) -> None:
    with tls_proxy(amqp_url, 5672, server_context(pki)) as proxy:
        for ca_file, action in [(pki.other_ca_file, "check"), (None, "set")]:
            settings = make_settings(proxy.url(amqp_url), namespace, tls_ca_file=ca_file)
            with pytest.raises(BrokerUnavailableError) as error:
                await connect(settings, "test")
            text = str(error.value)
            assert "certificate verify failed" in text
            assert f"{action} RABBITKEYS_TLS_CA_FILE" in text


async def test_the_management_api_over_https(
    amqp_url: str, namespace: str, pki: Pki, management: str
) -> None:
    names = Names(namespace)
    plain = await aio_pika.connect(amqp_url)
    try:
        channel = await plain.channel()
        queue = await channel.declare_queue(f"{names.key_queue_prefix}tls", durable=True)
        with tls_proxy(management, 15672, server_context(pki, require_client_cert=True)) as proxy:
            https = f"https://guest:guest@127.0.0.1:{proxy.port}"
            settings = make_settings(
                amqp_url,
                namespace,
                management_url=https,
                tls_ca_file=pki.ca_file,
                tls_cert_file=pki.client_cert_file,
                tls_key_file=pki.client_key_file,
            )
            found = await list_queues(settings, names.key_queue_prefix)
            assert [q.name for q in found] == [queue.name]

            wrong_ca = settings.model_copy(update={"tls_ca_file": pki.other_ca_file})
            with pytest.raises(BrokerUnavailableError, match="check RABBITKEYS_TLS_CA_FILE"):
                await list_queues(wrong_ca, names.key_queue_prefix)
            no_cert = settings.model_copy(update={"tls_cert_file": None, "tls_key_file": None})
            with pytest.raises(BrokerUnavailableError, match=f"https://127.0.0.1:{proxy.port}"):
                await list_queues(no_cert, names.key_queue_prefix)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await plain.close()


# --- the password appears nowhere -----------------------------------------------------------


class Process:
    """A ``rabbitkeys`` command with its stdout and stderr kept."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = b""
        self._readers = [
            asyncio.ensure_future(self._read(stream))
            for stream in (process.stdout, process.stderr)
            if stream is not None
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.output += chunk

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.terminate()
        code = await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return code


@contextlib.asynccontextmanager
async def rabbitkeys_processes(env: dict[str, str]) -> AsyncIterator[list[Process]]:
    started: list[Process] = []

    async def start(*args: str) -> Process:
        process = Process(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rabbitkeys",
                *args,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
        started.append(process)
        return process

    try:
        await start("registry")
        await start("worker", "rabbitkeys.tools.demo:app")
        yield started
    finally:
        for process in reversed(started):
            await process.stop()


async def test_the_password_appears_nowhere(
    amqp_url: str,
    namespace: str,
    pki: Pki,
    secret_user: tuple[str, str],
    management: str,
    tmp_path: Path,
) -> None:
    """Credentials from files, TLS for AMQP and the management API, every process logging
    at DEBUG: the password shows in no log line, status output, error or repr."""
    user, password = secret_user
    with (
        tls_proxy(amqp_url, 5672, server_context(pki)) as amqp_proxy,
        tls_proxy(management, 15672, server_context(pki)) as management_proxy,
    ):
        amqp_file, management_file = tmp_path / "amqp-url", tmp_path / "management-url"
        amqp_file.write_text(with_login(amqp_proxy.url(amqp_url), user, password) + "\n")
        management_file.write_text(
            with_login(f"https://127.0.0.1:{management_proxy.port}", user, password) + "\n"
        )

        def settings_from(amqp_file: Path) -> Settings:
            return Settings(
                amqp_url_file=amqp_file,
                management_url_file=management_file,
                namespace=namespace,
                tls_ca_file=pki.ca_file,
                log_level="DEBUG",
                metrics_port=0,
                heartbeat_interval=0.2,
                worker_timeout=1.5,
            )

        settings = settings_from(amqp_file)
        assert settings.amqp_url.get_secret_value().startswith(f"amqps://{user}:")
        child_env = _settings_env(settings)
        assert not any(password in value for value in child_env.values())
        base_env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        env = {**base_env, **child_env, "RK_DEMO_DIR": str(tmp_path)}

        async with rabbitkeys_processes(env) as processes:
            async with Publisher(settings, metrics_registry=CollectorRegistry()) as publisher:
                await publisher.publish("post-1", b"hello")
                assert password not in repr(publisher)
            await eventually(lambda: any(tmp_path.glob("*.jsonl")), timeout=30)
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "rabbitkeys", "status"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            status_json = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "rabbitkeys", "status", "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert status_json.returncode == 0, status_json.stderr
            assert json.loads(status_json.stdout)["backlog"] == 0
            # the registry listed the key queues through the https proxy, with the file's login
            assert management_proxy.connections >= 1
        # the wrong password: an error, which names the user but not what was tried
        wrong_file = tmp_path / "wrong-amqp-url"
        wrong_file.write_text(with_login(amqp_proxy.url(amqp_url), user, f"{password}-x"))
        wrong = settings_from(wrong_file)
        with pytest.raises(BrokerUnavailableError) as refused:
            await connect(wrong, "test")
        wrong_status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "rabbitkeys", "status", "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**base_env, **_settings_env(wrong)},
        )
    assert status.returncode == 0, status.stderr
    assert "ACCESS_REFUSED" in str(refused.value)
    assert wrong_status.returncode == 1 and "ACCESS_REFUSED" in wrong_status.stderr
    logs = b"".join(process.output for process in processes).decode(errors="replace")
    assert "cannot list the broker's key queues" not in logs
    # the logs name the broker, with the password masked
    assert "DEBUG" in logs and f"amqps://{user}:******@127.0.0.1" in logs
    for text in [
        logs,
        status.stdout + status.stderr,
        status_json.stdout + status_json.stderr,
        wrong_status.stdout + wrong_status.stderr,
        str(refused.value),
        repr(settings),
        str(settings),
    ]:
        assert SECRET not in text


async def test_processes_started_with_a_url_file_get_the_file(
    amqp_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LocalCluster`` (demo, chaos, bench, tests) hands its settings to the processes it
    starts; a URL from a file goes as the file, even with the variable set around it."""
    (tmp_path / "amqp-url").write_text(amqp_url + "\n")
    with clean_environment(monkeypatch):
        monkeypatch.setenv("RABBITKEYS_AMQP_URL_FILE", str(tmp_path / "amqp-url"))
        settings = load_settings(namespace=namespace, heartbeat_interval=0.2, worker_timeout=1.5)
        # what this process inherited must not add a second URL to the children's settings
        monkeypatch.setenv("RABBITKEYS_AMQP_URL", "amqp://stale:stale@127.0.0.1:1/")
        env = {"RK_DEMO_DIR": str(tmp_path), "RABBITKEYS_AMQP_URL": "amqp://also:stale@h/"}
        async with LocalCluster(settings, extra_env=env) as cluster:
            await cluster.start_registry()
            await cluster.start_worker("rabbitkeys.tools.demo:app")
            await cluster.wait_for_workers(1)
            codes = await cluster.stop_all()
    assert codes == [0, 0]

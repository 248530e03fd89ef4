"""Several rabbitkeys processes on one host, started by hand with nothing configured.

Two registries (leader and standby) and two workers in four shells: each serves /metrics
(9500 when free, else a free port it logs), they join and handle work. A port set explicitly
and taken still stops the process, naming the variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rabbitkeys import Publisher, RabbitkeysError
from rabbitkeys._admin.status import fetch_status
from rabbitkeys._settings import DEFAULT_METRICS_PORT, ENV_PREFIX
from rabbitkeys.tools.demo import read_records

from ..support import eventually, make_settings

_METRICS_LOG = re.compile(rb"metrics and health on http://([^:/]+):(\d+)/metrics")


@contextlib.contextmanager
def default_port_taken() -> Iterator[None]:
    """Hold 9500 for the test, as a process started before would (if something on this
    host holds it already, it is taken as well)."""
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", DEFAULT_METRICS_PORT))
        holder.listen()
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE, exc
    try:
        yield
    finally:
        holder.close()


class Shell:
    """A ``rabbitkeys`` command run as a user would in a terminal; its stderr is kept."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = b""
        assert process.stderr is not None
        self._reader = asyncio.ensure_future(self._read(process.stderr))

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Shell:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rabbitkeys", *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.stderr += line

    def metrics_url(self) -> str | None:
        """The /metrics URL this process logged, once it has."""
        match = _METRICS_LOG.search(self.stderr)
        return None if match is None else f"http://127.0.0.1:{int(match[2])}/metrics"

    async def stop(self) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        await asyncio.wait_for(self._reader, 10)
        return code


def bare_environment(**variables: str) -> dict[str, str]:
    """This process's environment without any RABBITKEYS_* setting, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return {**env, **variables}


@contextlib.asynccontextmanager
async def shells() -> AsyncIterator[list[Shell]]:
    started: list[Shell] = []
    try:
        yield started
    finally:
        codes = await asyncio.gather(*(shell.stop() for shell in reversed(started)))
        for shell, code in zip(reversed(started), codes, strict=True):
            assert code == 0, shell.stderr.decode(errors="replace")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


async def test_two_registries_and_two_workers_share_a_host_with_nothing_configured(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    # Only the broker and a namespace of the test's own are given (the defaults would be the
    # same broker and the shared namespace "rabbitkeys"); RABBITKEYS_METRICS_PORT is unset.
    env = bare_environment(
        RABBITKEYS_AMQP_URL=amqp_url, RABBITKEYS_NAMESPACE=namespace, RK_DEMO_DIR=str(tmp_path)
    )
    settings = make_settings(amqp_url, namespace)
    with default_port_taken():
        async with shells() as started:
            # a leader and a standby, as the README advises, then the workers
            for _ in range(2):
                started.append(await Shell.start("registry", env=env))
            for _ in range(2):
                started.append(await Shell.start("worker", "rabbitkeys.tools.demo:app", env=env))
            registries, workers = started[:2], started[2:]
            await eventually(lambda: all(s.metrics_url() for s in started), timeout=60)
            urls = [str(s.metrics_url()) for s in started]
            assert len(set(urls)) == 4, urls
            assert not any(url.endswith(f":{DEFAULT_METRICS_PORT}/metrics") for url in urls)
            for shell in started:
                assert f"port {DEFAULT_METRICS_PORT} is taken".encode() in shell.stderr

            async def joined() -> bool:
                try:
                    status = await fetch_status(settings, backlog=False, timeout=5)
                except RabbitkeysError:  # no registry leads yet
                    return False
                return len(status.workers) == 2

            deadline = asyncio.get_running_loop().time() + 60
            while not await joined():
                assert asyncio.get_running_loop().time() < deadline, "the workers never joined"
                await asyncio.sleep(0.2)

            keys = [f"post-{n}" for n in range(20)]
            async with Publisher(settings) as publisher:
                await asyncio.gather(
                    *(publisher.publish(key, str(n).encode()) for n in range(5) for key in keys)
                )
            await eventually(lambda: len(read_records(tmp_path)) >= 100, timeout=60)
            records = sorted(read_records(tmp_path), key=lambda r: r["started"])
            # both workers took keys: nothing on this host made one of them stand aside
            assert {r["pid"] for r in records} == {w.process.pid for w in workers}
            for key in keys:
                assert [r["body"] for r in records if r["key"] == key] == [str(n) for n in range(5)]

            leading = []
            for registry in registries:
                status, text = await asyncio.to_thread(http_get, str(registry.metrics_url()))
                assert status == 200
                leading.append("rabbitkeys_leader 1.0" in text)
            assert sorted(leading) == [False, True]
            for worker in workers:
                url = worker.metrics_url()
                assert url is not None
                assert await asyncio.to_thread(http_get, url.replace("/metrics", "/readyz")) == (
                    200,
                    "ready\n",
                )
                worker_metrics = (await asyncio.to_thread(http_get, url))[1]
                assert 'rabbitkeys_info{role="worker"' in worker_metrics
    for shell in started:
        assert b"Traceback" not in shell.stderr, shell.stderr.decode(errors="replace")


@pytest.mark.parametrize("command", [["registry"], ["worker", "rabbitkeys.tools.demo:app"]])
async def test_an_explicit_metrics_port_that_is_taken_stops_the_process(
    amqp_url: str, namespace: str, command: list[str]
) -> None:
    # the same port as the default, but set: the user asked for it, so no silent fallback
    env = bare_environment(
        RABBITKEYS_AMQP_URL=amqp_url,
        RABBITKEYS_NAMESPACE=namespace,
        RABBITKEYS_METRICS_PORT=str(DEFAULT_METRICS_PORT),
    )
    with default_port_taken():
        shell = await Shell.start(*command, env=env)
        code = await asyncio.wait_for(shell.process.wait(), 60)
        await asyncio.wait_for(shell._reader, 10)
    assert code == 1
    assert f"cannot serve metrics on 0.0.0.0:{DEFAULT_METRICS_PORT}".encode() in shell.stderr
    assert b"RABBITKEYS_METRICS_PORT" in shell.stderr
    assert b"Traceback" not in shell.stderr

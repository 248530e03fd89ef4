"""The command line: help on every command, clear errors, status against a live registry."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from rabbitkeys import App, Message, Publisher, Settings
from rabbitkeys.tools.cluster import _settings_env

from ..support import eventually, running_registry, running_worker

# every test here runs the CLI as a process of its own
pytestmark = pytest.mark.processes


def rabbitkeys_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitkeys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", [[], ["registry"], ["worker"], ["status"], ["demo"]])
def test_every_command_has_help_naming_the_settings(command: list[str]) -> None:
    result = rabbitkeys_cli(*command, "--help")
    assert result.returncode == 0
    assert "RABBITKEYS_AMQP_URL" in result.stdout


def test_a_bad_setting_exits_2_naming_the_variable() -> None:
    result = rabbitkeys_cli("status", env={"RABBITKEYS_PREFETCH": "0"})
    assert result.returncode == 2
    assert "RABBITKEYS_PREFETCH" in result.stderr


def test_an_unreachable_broker_is_a_clear_error_without_the_password() -> None:
    result = rabbitkeys_cli("status", env={"RABBITKEYS_AMQP_URL": "amqp://app:s3cret@127.0.0.1:1/"})
    assert result.returncode == 1
    assert "cannot connect to amqp://app:***@127.0.0.1:1/" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_a_worker_target_that_does_not_import_is_a_clear_error() -> None:
    result = rabbitkeys_cli("worker", "no_such_module:app")
    assert result.returncode == 1
    assert "cannot import 'no_such_module'" in result.stderr


async def test_status_reports_workers_keys_and_backlog_as_json(settings: Settings) -> None:
    app = App()
    release = asyncio.Event()

    @app.handler()
    async def held(message: Message) -> None:
        await release.wait()  # busy until the test has read the status

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app, worker_id="w-one"),
    ):
        async with Publisher(settings) as publisher:
            for n in range(4):
                await publisher.publish("busy", str(n).encode())
            await publisher.publish("other", b"x")
        await eventually(lambda: registry._book.workers["w-one"].waiting == 3)
        result = await asyncio.to_thread(
            rabbitkeys_cli, "status", "--json", env=_settings_env(settings)
        )
        text = await asyncio.to_thread(rabbitkeys_cli, "status", env=_settings_env(settings))
        release.set()  # the worker stops at once: nothing holds its keys
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["keys"] == 2
    [worker] = status["workers"]
    assert worker["worker_id"] == "w-one" and worker["keys"] == 2
    # "busy": one message in the handler, three waiting; "other": one in the handler
    assert status["backlog"] == 3 and worker["backlog"] == 3
    assert "w-one" in text.stdout


def test_status_without_registry_says_so(settings: Settings) -> None:
    env = {**_settings_env(settings)}
    result = rabbitkeys_cli("status", "--timeout", "1", env=env)
    assert result.returncode == 1
    assert "no registry answered" in result.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``rabbitkeys ... | head``: the pipe closes under the command; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rabbitkeys", "users", "permissions"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr

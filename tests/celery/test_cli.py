"""``rabbitkeys worker --celery``: a Celery app's tasks run by worker processes, as a user
starts them, and the errors a wrong target gets."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from rabbitkeys import Publisher, Settings
from rabbitkeys.celery import ordered
from rabbitkeys.tools.cluster import _settings_env

from ..cli.test_cli import rabbitkeys_cli
from ..support import eventually, running_registry
from . import tasks
from .test_bridge import result_of

pytestmark = pytest.mark.processes


def test_a_celery_app_without_the_flag_is_a_clear_error() -> None:
    result = rabbitkeys_cli("worker", "tests.celery.tasks:celery")
    assert result.returncode == 1
    assert "is a Celery app: run it with `rabbitkeys worker --celery`" in result.stderr


def test_the_flag_with_something_else_than_a_celery_app_is_a_clear_error() -> None:
    result = rabbitkeys_cli("worker", "--celery", "tests.celery.tasks:record")
    assert result.returncode == 1
    assert "worker_app() takes a Celery app" in result.stderr


async def test_two_worker_processes_run_the_tasks_of_each_key_in_order(
    settings: Settings, celery_app: Any, tmp_path: Path
) -> None:
    """Each key's calls, sent interleaved, come back in order from two workers (the
    results, through Redis, carry the order each key's tasks ran in: ``create_comment``
    returns its number); SIGTERM ends each worker with 0."""
    env = _settings_env(settings)
    command = [
        sys.executable,
        "-m",
        "rabbitkeys",
        "worker",
        "--celery",
        "tests.celery.tasks:celery",
    ]
    async with running_registry(settings):
        logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
        workers = []
        for log in logs:
            with log.open("w") as output:
                workers.append(
                    await asyncio.create_subprocess_exec(
                        *command, env={**os.environ, **env}, stderr=output
                    )
                )
        try:
            async with Publisher(settings) as publisher:
                keys = ["post A", "user/42", "ünïcødé ✓", "x" * 900]
                sent = [
                    await ordered(tasks.create_comment, key, publisher=publisher).adelay(key, n)
                    for n in range(10)
                    for key in keys
                ]
                values = [await result_of(result, timeout=60) for result in sent]
            assert values == [n for n in range(10) for _ in keys]
            # the order each key ran in, as the workers' backend recorded it
            done = {result.id: result.date_done for result in sent}
            for key_index in range(len(keys)):
                mine = [sent[n * len(keys) + key_index].id for n in range(10)]
                assert [done[task_id] for task_id in mine] == sorted(done[t] for t in mine)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(worker.wait(), 30) for worker in workers]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    # both workers joined and served the Celery job type
    assert all("serving celery" in log.read_text() for log in logs)


def test_the_flag_finds_the_app_of_a_module_as_celery_minus_a_does(tmp_path: Path) -> None:
    """``--celery proj`` (Celery's ``-A proj``): ``proj:app``, ``proj:celery`` or
    ``proj.celery:app``; a module with none of them names what it tried."""
    result = rabbitkeys_cli("worker", "--celery", "tests.celery.no_such_module")
    assert result.returncode == 1
    assert "no Celery app in 'tests.celery.no_such_module'" in result.stderr
    assert "tests.celery.no_such_module.celery" in result.stderr


def test_the_celery_app_of_a_module_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rabbitkeys.cli.worker import _celery_app

    assert _celery_app("tests.celery.tasks") is tasks.celery  # its attribute `celery`
    assert _celery_app("tests.celery.tasks:celery") is tasks.celery
    assert _celery_app("tests.celery.tasks.celery") is tasks.celery  # dotted, as -A takes
    # a package whose celery submodule holds `app`; a module whose app has another name
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "celery.py").write_text(
        "from celery import Celery\napp = Celery('shop')\n"
    )
    (tmp_path / "billing.py").write_text("from celery import Celery\nworkers = Celery('billing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _celery_app("shop").main == "shop"
    assert _celery_app("billing").main == "billing"


def test_on_failure_without_the_celery_flag_is_a_clear_error() -> None:
    result = rabbitkeys_cli("worker", "--on-failure", "park", "tests.celery.tasks:record")
    assert result.returncode == 1
    assert "--on-failure is for --celery" in result.stderr


async def test_the_worker_parks_a_failed_tasks_key_when_told_to(
    settings: Settings, celery_app: Any, tmp_path: Path
) -> None:
    """``--on-failure park``: a task's failure parks its key (the later call of that key
    waits, named in the log with the command that resumes it); other keys go on."""
    log = tmp_path / "worker.log"
    async with running_registry(settings):
        with log.open("w") as output:
            worker = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "rabbitkeys", "worker", "--celery"],
                *["--on-failure", "park", "tests.celery.tasks:celery"],
                env={**os.environ, **_settings_env(settings)},
                stderr=output,
            )
        try:
            async with Publisher(settings) as publisher:
                await ordered(tasks.fails, "post A", publisher=publisher).adelay("post A", 1)
                later = await ordered(tasks.create_comment, "post A", publisher=publisher).adelay(
                    "post A", 2
                )
                other = await ordered(tasks.create_comment, "post B", publisher=publisher).adelay(
                    "post B", 3
                )
                assert await result_of(other, timeout=60) == 3
                await eventually(lambda: "parked" in log.read_text(), timeout=30)
                assert later.state == "PENDING"  # waits behind the parked task
        finally:
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(worker.wait(), 30)
    assert code == 0, log.read_text()[-2000:]
    assert "rabbitkeys resume celery 'post A'" in log.read_text()

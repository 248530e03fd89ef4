"""A registry and workers run as real processes through the CLI, on this machine.

Used by ``rabbitkeys demo`` and by the end-to-end tests: the processes are the ones a user
runs, so what these show is what production does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from pydantic import SecretStr

from .._admin.status import fetch_status
from .._errors import RabbitkeysError
from .._settings import ENV_PREFIX, Settings

__all__ = ["LocalCluster"]


class LocalCluster:
    """Start and stop ``rabbitkeys registry`` / ``rabbitkeys worker`` processes.

    ``settings`` are the processes' settings, and what the cluster asks the registry for its
    status with; ``role_settings`` replaces them for one command (``"registry"``,
    ``"worker"``), e.g. to run each as its own RabbitMQ user.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        extra_env: dict[str, str] | None = None,
        role_settings: Mapping[str, Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._extra_env = dict(extra_env or {})
        self._env = self._env_for(settings)
        self._role_env = {
            command: self._env_for(given) for command, given in (role_settings or {}).items()
        }
        self.registries: list[asyncio.subprocess.Process] = []
        self.workers: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()

    def _env_for(self, settings: Settings) -> dict[str, str]:
        # The settings object is the whole truth: a variable inherited from this process
        # (RABBITKEYS_AMQP_URL beside the settings' RABBITKEYS_AMQP_URL_FILE) must not add to it.
        inherited = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_VARIABLES}
        env = {**inherited, **_settings_env(settings), **self._extra_env}
        for name in ("amqp_url", "management_url"):
            if getattr(settings, f"{name}_file") is not None:  # the file, not the value too
                env.pop(f"{ENV_PREFIX}{name.upper()}", None)
        return env

    async def _spawn(self, *args: str, metrics_port: int) -> asyncio.subprocess.Process:
        env = {
            **self._role_env.get(args[0], self._env),
            f"{ENV_PREFIX}METRICS_PORT": str(metrics_port),
        }
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rabbitkeys", *args, env=env
        )

    async def start_registry(self, *, metrics_port: int = 0) -> asyncio.subprocess.Process:
        """``metrics_port``: where it serves /metrics (0, the default here: nowhere, so
        that several processes on one host do not compete for a port)."""
        process = await self._spawn("registry", metrics_port=metrics_port)
        self.registries.append(process)
        return process

    async def start_worker(
        self, target: str, *, metrics_port: int = 0, options: tuple[str, ...] = ()
    ) -> asyncio.subprocess.Process:
        """``options``: of ``rabbitkeys worker``, before the target (e.g. ``("--celery",)``)."""
        process = await self._spawn("worker", *options, target, metrics_port=metrics_port)
        self.workers.append(process)
        return process

    async def wait_for_workers(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the leading registry sees ``count`` workers."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                status = await fetch_status(self.settings, backlog=False, timeout=2.0)
                if len(status.workers) == count:
                    return
            except RabbitkeysError as exc:
                last_error = exc
            await asyncio.sleep(0.2)
        raise RabbitkeysError(f"{count} workers did not join within {timeout:g}s: {last_error}")

    @staticmethod
    async def terminate(process: asyncio.subprocess.Process, timeout: float = 30.0) -> int:
        """SIGTERM, as ``kubectl scale`` does; return the exit code."""
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            return await process.wait()

    async def stop_all(self) -> list[int]:
        codes = list(await asyncio.gather(*(self.terminate(p) for p in self.workers)))
        codes += await asyncio.gather(*(self.terminate(p) for p in self.registries))
        return codes


_SETTING_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the environment of a child process. A URL read from a file is passed
    as that file, so the password stays out of the child's environment."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None or getattr(settings, f"{name}_file", None) is not None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env

"""The roles' one lifecycle shape: ``async with``, ``start()``/``close()``, ``run()``/``stop()``,
settings optional everywhere (``RABBITKEYS_*`` when none are given)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Publisher, Registry, Settings, Worker
from rabbitkeys._lifecycle import Background
from rabbitkeys.tools.cluster import _settings_env

from .support import eventually

# a port nothing listens on: the roles below are built and run without reaching a broker
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"


def _offline() -> Settings:
    return Settings(amqp_url=UNREACHABLE, namespace="offline")


def _live_workers(registry: Registry) -> float:
    return registry.gauge_values()["rabbitkeys_live_workers"]


def _set_environment(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for name, value in _settings_env(settings).items():
        monkeypatch.setenv(name, value)


# --- without a broker ------------------------------------------------------------------


def test_every_role_reads_the_environment_when_given_no_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITKEYS_AMQP_URL", UNREACHABLE)
    monkeypatch.setenv("RABBITKEYS_NAMESPACE", "from-env")
    monkeypatch.setenv("RABBITKEYS_CONCURRENCY", "7")
    roles = [
        Publisher(metrics_registry=CollectorRegistry()),
        Registry(metrics_registry=CollectorRegistry()),
        Worker(App(), metrics_registry=CollectorRegistry()),
    ]
    for role in roles:
        assert role.settings.namespace == "from-env"
        assert role.settings.concurrency == 7


def test_given_settings_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_NAMESPACE", "from-env")
    assert Registry(_offline()).settings.namespace == "offline"
    assert Worker(App(), _offline()).settings.namespace == "offline"
    assert Worker(App(), settings=_offline()).settings.namespace == "offline"


def test_the_former_worker_argument_order_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"Worker\(app, settings\)"):
        Worker(_offline(), App())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Worker\(app, settings\)"):
        Worker(_offline())  # type: ignore[arg-type]


async def test_close_stops_a_role_that_never_reached_the_broker() -> None:
    # run() rides out the refused connection (backoff); close() must end it all the same
    for role in (Registry(_offline()), Worker(App(), _offline())):
        async with role:
            await asyncio.sleep(0.3)
            assert not role.ready
        assert not role.ready
        assert role._background_task is None


async def test_a_role_runs_once() -> None:
    worker = Worker(App(), _offline())
    await worker.start()
    with pytest.raises(RuntimeError, match="already running"):
        await worker.start()
    await worker.close()
    await worker.close()  # again: no harm
    with pytest.raises(RuntimeError, match="already closed"):
        await worker.start()
    never_started = Registry(_offline())
    await never_started.close()  # without start(): no harm
    with pytest.raises(RuntimeError, match="already closed"):
        async with never_started:
            pass


class _Failing(Background):
    """A role whose run() fails: what close() and ``async with`` must report."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        await asyncio.sleep(0)
        raise ValueError("run failed")

    def stop(self) -> None:
        self.stopped.set()


async def test_close_raises_what_run_raised() -> None:
    role = _Failing()
    with pytest.raises(ValueError, match="run failed"):
        async with role:
            await asyncio.sleep(0.05)
    assert role.stopped.is_set()


# --- against the broker ----------------------------------------------------------------


async def test_all_three_roles_from_the_environment_in_async_with_blocks(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_environment(monkeypatch, settings)
    handled: list[tuple[str, bytes]] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        handled.append((message.key, message.body))

    async with Registry() as registry:
        assert registry.settings.namespace == settings.namespace
        await asyncio.wait_for(registry.wait_leading(), 10)
        async with Worker(app) as worker:
            assert worker.settings.namespace == settings.namespace
            await eventually(lambda: worker.ready and registry.is_leader)
            async with Publisher() as publisher:
                for n in range(3):
                    await publisher.publish("k", str(n).encode())
            await eventually(lambda: len(handled) == 3)
            assert len(worker.owned_keys) == 1
            await eventually(lambda: _live_workers(registry) == 1)
        # leaving the block stopped the worker gracefully: it told the registry it left
        assert not worker.ready
        await eventually(lambda: _live_workers(registry) == 0)
    assert not registry.ready
    assert handled == [("k", b"0"), ("k", b"1"), ("k", b"2")]


async def test_an_error_in_the_block_still_stops_the_worker_gracefully(
    settings: Settings,
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[bytes] = []
    app = App()

    @app.handler()
    async def slow(message: Message) -> None:
        started.set()
        await release.wait()
        finished.append(message.body)

    async with Registry(settings) as registry:
        await asyncio.wait_for(registry.wait_leading(), 10)
        worker = Worker(app, settings)
        with pytest.raises(LookupError, match="the application failed"):
            async with worker:
                async with Publisher(settings) as publisher:
                    await publisher.publish("k", b"in flight")
                await asyncio.wait_for(started.wait(), 10)
                # stopping waits for the handler in flight: let it finish meanwhile
                asyncio.get_running_loop().call_later(0.2, release.set)
                raise LookupError("the application failed")
        assert finished == [b"in flight"]
        assert not worker.ready
        await eventually(lambda: _live_workers(registry) == 0)

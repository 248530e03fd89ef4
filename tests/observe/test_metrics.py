"""Prometheus metrics and the health endpoint, against the real broker and real processes."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from rabbitkeys import App, Message, Publisher, Settings, __version__
from rabbitkeys._observe.metrics import RegistryMetrics
from rabbitkeys._observe.metrics_server import MetricsServer
from rabbitkeys.tools.cluster import LocalCluster

from ..support import eventually, make_settings, running_registry, running_worker


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


async def http_get(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(get)


async def test_publisher_worker_and_registry_count_what_happens(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_retries": 1})
    metrics = CollectorRegistry()
    app = App()

    @app.handler()
    async def handle(message: Message) -> None:
        if message.body == b"fail":
            raise RuntimeError("bad input")

    async with (
        running_registry(settings, metrics_registry=metrics) as registry,
        running_worker(settings, app, metrics_registry=metrics),
    ):
        async with Publisher(settings, metrics_registry=metrics) as publisher:
            bodies = [b"ok"] * 40 + [b"fail"]
            await asyncio.gather(
                *(publisher.publish(f"key-{n % 20}", body) for n, body in enumerate(bodies))
            )
        await eventually(
            lambda: (
                metrics.get_sample_value("rabbitkeys_dead_lettered_messages_total") == 1
                and metrics.get_sample_value("rabbitkeys_handled_messages_total") == 40
            )
        )
        assert value(metrics, "rabbitkeys_published_messages_total") == 41
        assert value(metrics, "rabbitkeys_publish_duration_seconds_count") == 41
        assert value(metrics, "rabbitkeys_publish_failures_total") == 0
        assert value(metrics, "rabbitkeys_handled_messages_total") == 40
        # the failing message: first attempt and one retry
        assert value(metrics, "rabbitkeys_handler_failures_total") == 2
        assert value(metrics, "rabbitkeys_retried_messages_total") == 1
        assert value(metrics, "rabbitkeys_handler_duration_seconds_count") == 42
        assert value(metrics, "rabbitkeys_end_to_end_latency_seconds_count") == 41
        assert value(metrics, "rabbitkeys_order_violations_total") == 0
        assert value(metrics, "rabbitkeys_leader") == 1
        assert value(metrics, "rabbitkeys_live_workers") == 1
        assert value(metrics, "rabbitkeys_live_keys") == 20
        assert value(metrics, "rabbitkeys_owned_keys") == 20
        assert value(metrics, "rabbitkeys_keys_created_total") == 20
        assert value(metrics, "rabbitkeys_info", role="worker", version=__version__) == 1
        assert registry.is_leader


async def test_no_metric_has_a_label_per_key(settings: Settings) -> None:
    """Series count stays flat however many keys there are."""
    metrics = CollectorRegistry()
    app = App()

    @app.handler()
    async def handle(message: Message) -> None:
        pass

    async with (
        running_registry(settings, metrics_registry=metrics),
        running_worker(settings, app, metrics_registry=metrics),
    ):
        async with Publisher(settings, metrics_registry=metrics) as publisher:
            await asyncio.gather(*(publisher.publish(f"k{n}", b"x") for n in range(100)))
        await eventually(
            lambda: metrics.get_sample_value("rabbitkeys_handled_messages_total") == 100
        )
        series = {
            (sample.name, tuple(sorted(sample.labels)))
            for family in metrics.collect()
            for sample in family.samples
        }
    label_names = {name for _, labels in series for name in labels}
    # reason: the refused control messages' closed set of reasons (_senders.REFUSAL_REASONS);
    # job_type: the oldest message's age, one series per job type (max_job_types bounds them)
    assert label_names <= {"le", "role", "version", "reason", "job_type"}
    assert len(series) < 150


async def test_a_move_between_workers_is_measured(settings: Settings) -> None:
    # A worker dropped for late heartbeats (a loaded machine) would have its keys reassigned,
    # not moved: give heartbeats room, so what is measured is the move.
    settings = settings.model_copy(update={"worker_timeout": 15.0})
    metrics = CollectorRegistry()
    app = App()

    @app.handler()
    async def handle(message: Message) -> None:
        pass

    async with running_registry(settings, metrics_registry=metrics):
        async with running_worker(settings, app, metrics_registry=metrics):
            async with Publisher(settings) as publisher:
                await asyncio.gather(*(publisher.publish(f"k{n}", b"x") for n in range(30)))
            async with running_worker(settings, app, metrics_registry=metrics):
                # the join, the rebalance and a release take a few round trips: on a loaded
                # machine (CI's legs, other test runs) more than the default 10 s once in a while
                await eventually(
                    lambda: (metrics.get_sample_value("rabbitkeys_keys_moved_total") or 0) > 0,
                    timeout=30.0,
                )
                await eventually(
                    lambda: (
                        metrics.get_sample_value("rabbitkeys_handoff_duration_seconds_count")
                        == metrics.get_sample_value("rabbitkeys_keys_moved_total")
                    )
                )
            assert value(metrics, "rabbitkeys_rebalances_total") >= 1
            assert value(metrics, "rabbitkeys_keys_released_total") >= value(
                metrics, "rabbitkeys_keys_moved_total"
            )


class HeldKeys:
    """A registry's view for its gauges: two parked keys, one paused job type."""

    def gauge_values(self) -> dict[str, float]:
        return {
            "rabbitkeys_leader": 1,
            "rabbitkeys_parked_keys": 2,
            "rabbitkeys_paused_keys": 5,
            "rabbitkeys_paused_job_types": 1,
        }


def test_registry_reports_held_keys_and_the_oldest_message_per_job_type() -> None:
    metrics = CollectorRegistry()
    source = HeldKeys()
    registry_metrics = RegistryMetrics(source, metrics)
    assert value(metrics, "rabbitkeys_parked_keys") == 2
    assert value(metrics, "rabbitkeys_paused_keys") == 5
    assert value(metrics, "rabbitkeys_paused_job_types") == 1
    assert value(metrics, "rabbitkeys_redriven_messages_total") == 0
    assert value(metrics, "rabbitkeys_skipped_messages_total") == 0
    registry_metrics.redriven_messages.inc(3)
    registry_metrics.skipped_messages.inc()
    assert value(metrics, "rabbitkeys_redriven_messages_total") == 3
    assert value(metrics, "rabbitkeys_skipped_messages_total") == 1

    def ages() -> dict[str, float]:
        return {
            sample.labels["job_type"]: sample.value
            for family in metrics.collect()
            if family.name == "rabbitkeys_oldest_message_age_seconds"
            for sample in family.samples
        }

    assert ages() == {}
    registry_metrics.set_oldest_ages({"email": 42.5, "invoice": 0.0})
    assert ages() == {"email": 42.5, "invoice": 0.0}
    # a job type gone from the listing loses its series; a new one gets one
    registry_metrics.set_oldest_ages({"invoice": 7.0, "sms": 1.0})
    assert ages() == {"invoice": 7.0, "sms": 1.0}
    # leadership ends: no ages
    registry_metrics.set_oldest_ages({})
    assert ages() == {}
    # a second registry in the process shares the series (one per name and job type)
    other_source = HeldKeys()
    other = RegistryMetrics(other_source, metrics)
    other.set_oldest_ages({"email": 3.0})
    registry_metrics.set_oldest_ages({"email": 4.0})
    assert ages() == {"email": 4.0}
    # and the held-key gauges add up over both (only a leader reports non-zero)
    assert value(metrics, "rabbitkeys_parked_keys") == 4


async def test_health_endpoint_answers_liveness_readiness_and_metrics() -> None:
    ready = False
    metrics = CollectorRegistry()
    Counter("rabbitkeys_example", "An example.", registry=metrics).inc(3)
    server = MetricsServer(host="127.0.0.1", port=0, ready=lambda: ready, registry=metrics)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert await http_get(f"{base}/livez") == (200, "ok\n")
        assert (await http_get(f"{base}/readyz"))[0] == 503
        ready = True
        assert await http_get(f"{base}/readyz") == (200, "ready\n")
        assert await http_get(f"{base}/metrics") == (
            200,
            generate_latest(metrics).decode(),
        )
        assert "rabbitkeys_example_total 3.0" in generate_latest(metrics).decode()
        assert (await http_get(f"{base}/nothing"))[0] == 404
    finally:
        await server.close()


@pytest.mark.processes
async def test_worker_and_registry_processes_serve_metrics_and_readiness(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace)
    registry_port, worker_port = free_port(), free_port()
    async with LocalCluster(settings) as cluster:
        await cluster.start_registry(metrics_port=registry_port)
        worker = await cluster.start_worker(
            "rabbitkeys.tools.bench.app:app", metrics_port=worker_port
        )
        await cluster.wait_for_workers(1)

        async def ready(port: int) -> bool:
            try:
                return (await http_get(f"http://127.0.0.1:{port}/readyz"))[0] == 200
            except OSError:
                return False

        for port in (registry_port, worker_port):
            deadline = asyncio.get_running_loop().time() + 15
            while not await ready(port):
                assert asyncio.get_running_loop().time() < deadline, f"port {port} never ready"
                await asyncio.sleep(0.1)
        _, registry_text = await http_get(f"http://127.0.0.1:{registry_port}/metrics")
        _, worker_text = await http_get(f"http://127.0.0.1:{worker_port}/metrics")
        assert "rabbitkeys_leader 1.0" in registry_text
        assert "rabbitkeys_live_workers 1.0" in registry_text
        assert 'rabbitkeys_info{role="worker"' in worker_text
        assert "rabbitkeys_owned_keys" in worker_text
        assert "process_resident_memory_bytes" in worker_text
        assert await LocalCluster.terminate(worker) == 0


@pytest.mark.processes
async def test_a_taken_metrics_port_stops_the_process_with_a_clear_error(
    amqp_url: str, namespace: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rabbitkeys",
            "registry",
            env={
                "RABBITKEYS_AMQP_URL": amqp_url,
                "RABBITKEYS_NAMESPACE": namespace,
                "RABBITKEYS_METRICS_HOST": "127.0.0.1",
                "RABBITKEYS_METRICS_PORT": str(port),
                "PATH": "/usr/bin:/bin",
            },
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert b"RABBITKEYS_METRICS_PORT" in stderr


@pytest.mark.parametrize("port", ["-1", "70000", "http"])
def test_a_bad_metrics_port_is_a_config_error(port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rabbitkeys import ConfigError
    from rabbitkeys._settings import load_settings

    monkeypatch.setenv("RABBITKEYS_METRICS_PORT", port)
    with pytest.raises(ConfigError, match="RABBITKEYS_METRICS_PORT"):
        load_settings()


@pytest.mark.processes
async def test_a_killed_worker_shows_as_a_failover_gap(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace)
    port = free_port()

    def metric(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    async with LocalCluster(settings) as cluster:
        await cluster.start_registry(metrics_port=port)
        doomed = await cluster.start_worker("rabbitkeys.tools.bench.app:app")
        await cluster.start_worker("rabbitkeys.tools.bench.app:app")
        await cluster.wait_for_workers(2)
        async with Publisher(settings, metrics_registry=CollectorRegistry()) as publisher:
            await asyncio.gather(*(publisher.publish(f"k{n}", b"x") for n in range(20)))
        doomed.kill()
        await doomed.wait()
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            _, text = await http_get(f"http://127.0.0.1:{port}/metrics")
            if metric(text, "rabbitkeys_failover_gap_seconds_count") >= 1:
                break
            assert asyncio.get_running_loop().time() < deadline, "no failover recorded"
            await asyncio.sleep(0.1)
        assert metric(text, "rabbitkeys_failover_gap_seconds_sum") > 0
        assert metric(text, "rabbitkeys_live_workers") == 1

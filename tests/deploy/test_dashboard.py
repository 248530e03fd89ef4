"""The Grafana dashboard and the Prometheus alert rules in ``grafana/``.

Fast tests check the files: valid JSON, a datasource and a query on every panel, every
query valid PromQL (``promtool``), every rabbitkeys metric it names one the library
exports, the alert rules' unit tests (``promtool test rules``).

The live test starts a real Prometheus scraping a registry, a standby registry, workers,
the test's publisher and RabbitMQ's ``rabbitmq_prometheus`` plugin, drives a workload in
which keys move, a worker is killed, the leading registry stops and handlers fail, then
runs every query of the dashboard through Prometheus's HTTP API and asserts it returns
data, and that order violations stay 0. The two-installation test scrapes two rabbitkeys
installations (two namespaces) into one Prometheus and shows that neither's panels nor
alerts see the other's series.

Targets are labelled as the Kubernetes ServiceMonitor labels them: jobs
``rabbitkeys-registry`` / ``rabbitkeys-worker``, and ``namespace`` and ``pod`` labels.

Needs the ``prometheus`` and ``promtool`` binaries (Debian: ``apt-get install
prometheus``) and the broker's ``rabbitmq_prometheus`` plugin (port 15692). Without them
the tests skip, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from rabbitkeys import Publisher, Settings
from rabbitkeys._observe.metrics import PublisherMetrics, RegistryMetrics, WorkerMetrics
from rabbitkeys._wire.topology import DEFAULT_JOB_TYPE
from rabbitkeys.tools.cluster import LocalCluster

from ..conftest import Broker, delete_namespace
from ..support import make_settings

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rabbitkeys.json"
ALERTS = GRAFANA / "alerts.yaml"
ALERT_TESTS = GRAFANA / "alerts.test.yaml"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "rabbitkeys.yaml"

# What Grafana puts in for its variables, viewing the last hour (a panel's min interval
# raises $__interval: see _queries).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
# What "All" stands for in the namespace and rabbitmq_cluster variables (their allValue).
ALL = ".*"

# The Prometheus job names of common deployments (ServiceMonitors, docker-compose); the
# alert rules and the "targets down" query select on "rabbitkeys" in them.
REGISTRY_JOB = "rabbitkeys-registry"
WORKER_JOB = "rabbitkeys-worker"
APP_JOB = "app"
# The namespace label of the single installation of the first live test.
INSTALLATION = "rabbitkeys"

KEYS = 24
ONCE_KEYS = 4  # published once, at the start: they go idle and are retired
PARKING = "parking"  # the job type whose failures park their key (tests/dashboard_app.py)
PARKED_KEY = "parked-0"  # its one key: a message that always fails, sent at the start
FAIL_EVERY = 20  # every 20th round, a quarter of the keys get a message that always fails


def _require(what: str, found: Any, how: str) -> Any:
    if found:
        return found
    message = f"{what} is missing: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _tool(name: str) -> str:
    path: str = _require(
        f"the {name} binary", shutil.which(name), "install it (Debian: apt-get install prometheus)"
    )
    return path


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _seconds(duration: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: panel targets and annotations. A panel's min
    interval raises ``$__interval`` in its queries, as Grafana does."""
    queries = []
    for panel in _panels(dashboard):
        interval = panel.get("interval")
        for target in panel.get("targets", []):
            where = f"{panel['title']} / {target.get('legendFormat') or target['refId']}"
            expr = target["expr"]
            if interval and _seconds(interval) > _seconds(GRAFANA_VARIABLES["$__interval"]):
                expr = expr.replace("$__interval", interval)
            queries.append((where, expr))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']}", annotation["expr"]))
    return queries


def promql(expr: str, namespace: str = ALL, rabbitmq_cluster: str = ALL) -> str:
    """The query as Grafana sends it to Prometheus, with the variables ``namespace`` and
    ``rabbitmq_cluster`` set to these regular expressions."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = expr.replace("$namespace", namespace).replace("$rabbitmq_cluster", rabbitmq_cluster)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def _exported_metric_names() -> set[str]:
    """Sample names the library's publisher, worker and registry metrics export."""

    class Source:
        def gauge_values(self) -> dict[str, float]:
            return {}

    registry = CollectorRegistry()
    source = Source()
    PublisherMetrics(registry)
    # a labelled metric has samples once a label is set: one job type
    WorkerMetrics(source, registry).job_timeouts.labels(job_type="job")
    RegistryMetrics(source, registry).set_oldest_ages({"job": 0.0})
    return {sample.name for family in registry.collect() for sample in family.samples}


# --------------------------------------------------------------------------- fast tests


def test_dashboard_json_has_a_datasource_and_queries_on_every_panel() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "rabbitkeys"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # the provisioned datasource is the default choice
    assert "uid: prometheus" in DATASOURCE.read_text()
    assert variables["datasource"]["current"]["value"] == "prometheus"
    assert "path: /var/lib/grafana/dashboards" in DASHBOARD_PROVIDER.read_text()

    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = []
    for panel in _panels(dashboard):
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        titles.append(panel["title"])
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    for row in ("Throughput", "Latency", "Backlog", "Keys", "Failures", "Order"):
        assert row in rows


def test_dashboard_and_alerts_name_only_metrics_that_exist() -> None:
    exported = _exported_metric_names()
    texts = [expr for _, expr in _queries(_dashboard())]
    texts.append(ALERTS.read_text())
    named = {name for text in texts for name in re.findall(r"\brabbitkeys_\w+", text)}
    assert named
    assert named <= exported, f"not exported by rabbitkeys: {sorted(named - exported)}"


def test_every_rabbitkeys_metric_is_on_the_dashboard() -> None:
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum|created)$", "", name)

    exported = {family(name) for name in _exported_metric_names()}
    texts = [expr for _, expr in _queries(_dashboard())]
    shown = {family(name) for text in texts for name in re.findall(r"\brabbitkeys_\w+", text)}
    assert exported <= shown, f"metrics without a panel: {sorted(exported - shown)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    # promtool parses rule files offline: one recording rule per query
    rules = [
        {"record": f"dashboard:query_{n}", "expr": promql(expr)}
        for n, (_, expr) in enumerate(_queries(_dashboard()))
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = _tool("promtool")
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run(
            [promtool, *command], capture_output=True, text=True, check=False, cwd=GRAFANA
        )
        assert done.returncode == 0, done.stdout + done.stderr


_NAMESPACE = 'namespace=~"$namespace"'
_BROKER_JOIN = (
    " * on (instance) group_left (rabbitmq_cluster)"
    ' rabbitmq_identity_info{rabbitmq_cluster=~"$rabbitmq_cluster"}'
)
_BROKER_METRIC = re.compile(r"\brabbitmq_(?!identity_info|cluster\b)\w+")
# a metric selector; `by (...)`, `on (...)` and functions are not metrics
_SELECTOR = re.compile(r"\b([a-z_]+)(\{[^}]*\})?(?=\s*(?:\[|\)|$|==|\*|>|-|/))")
_AGGREGATION = re.compile(r"\b(sum|max|min|avg|count)\b\s*(?:by \(([^)]*)\))?\s*\(")


def test_dashboard_variables_select_an_installation_and_a_rabbitmq_cluster() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    for name, source in (
        ("namespace", "label_values(rabbitkeys_leader, namespace)"),
        ("rabbitmq_cluster", "label_values(rabbitmq_identity_info, rabbitmq_cluster)"),
    ):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["query"]["query"] == variable["definition"] == source
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        # "All" must be a regular expression that matches (ALL in the live tests)
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ALL


def test_every_query_is_scoped_by_installation() -> None:
    """rabbitkeys series: filtered by $namespace and aggregated per namespace; broker
    series: joined to their RabbitMQ cluster and filtered by $rabbitmq_cluster."""
    for where, expr in _queries(_dashboard()):
        for name, selector in _SELECTOR.findall(expr):
            if name.startswith("rabbitmq_") and name != "rabbitmq_identity_info":
                assert _BROKER_JOIN in expr, (where, expr)
            elif name.startswith(("rabbitkeys_", "process_")) or name == "up":
                assert _NAMESPACE in selector, (where, name, expr)
        broker = "rabbitmq_" in expr
        for _function, by in _AGGREGATION.findall(expr):
            labels = {label.strip() for label in by.split(",")}
            assert ("rabbitmq_cluster" if broker else "namespace") in labels, (where, expr)
        assert expr.count(_BROKER_JOIN) == len(_BROKER_METRIC.findall(expr)), (where, expr)


def test_event_counts_do_not_overlap() -> None:
    """increase over $__rate_interval at a 15 s step counts each event about four times:
    counts per interval use $__interval with a min interval of four scrapes or more."""
    dashboard = _dashboard()
    for where, expr in _queries(dashboard):
        assert not re.search(r"increase\([^]]*\[\$__rate_interval\]", expr), (where, expr)
    for panel in _panels(dashboard):
        if any("$__interval" in target["expr"] for target in panel.get("targets", [])):
            assert _seconds(panel["interval"]) >= 60, panel["title"]
            assert "counted once" in panel["description"], panel["title"]


def test_alerts_are_scoped_by_namespace_and_link_their_runbook() -> None:
    text = ALERTS.read_text()
    runbooks = (ROOT / "docs" / "operate" / "alerts.md").read_text()
    rules = re.split(r"\n      - alert: ", text)[1:]
    assert len(rules) >= 11
    for rule in rules:
        name = rule.split()[0]
        anchor = f"alert-{name.lower()}"
        url = f"https://github.com/rabbitkeys/rabbitkeys/blob/main/docs/operate/alerts.md#{anchor}"
        assert f"runbook_url: {url}\n" in rule, name
        assert f'<a id="{anchor}"></a>' in runbooks, name
        expr = rule.split("expr:", 1)[1].split("\n        for:")[0].split("\n        labels:")[0]
        aggregations = _AGGREGATION.findall(expr)
        # up keeps its target's labels, namespace among them
        assert aggregations or expr.strip().startswith("up{"), name
        for _, by in aggregations:
            assert "namespace" in by, (name, expr)
        assert "$labels.namespace" in rule, name


# --------------------------------------------------------------------------- live test


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _rabbitmq_metrics_url(amqp_url: str) -> str:
    explicit = os.environ.get("RABBITKEYS_TEST_RABBITMQ_METRICS_URL")
    if explicit:
        return explicit
    host = urllib.parse.urlsplit(amqp_url).hostname or "localhost"
    return f"http://{host}:15692/metrics"


@dataclasses.dataclass(frozen=True)
class Target:
    """A scraped process: its address and the labels Kubernetes would give it."""

    address: str
    namespace: str
    pod: str


class Prometheus:
    """A Prometheus server of the test's own: temporary config and storage."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = directory / "prometheus.log"
        self.process: asyncio.subprocess.Process | None = None

    def configure(self, jobs: dict[str, list[Target]], rabbitmq_url: str) -> Path:
        """Scrape ``jobs`` (job name: its targets) and the broker, every second."""
        rabbitmq = urllib.parse.urlsplit(rabbitmq_url)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                *(
                    {
                        "job_name": job,
                        "scrape_timeout": "1s",
                        # the labels a ServiceMonitor puts on its targets
                        "static_configs": [
                            {
                                "targets": [t.address],
                                "labels": {"namespace": t.namespace, "pod": t.pod},
                            }
                            for t in targets
                        ],
                    }
                    for job, targets in jobs.items()
                ),
                {
                    "job_name": "rabbitmq",
                    "scrape_timeout": "1s",
                    "metrics_path": rabbitmq.path or "/metrics",
                    "static_configs": [{"targets": [rabbitmq.netloc]}],
                },
            ],
        }
        path = self.directory / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    @contextlib.asynccontextmanager
    async def running(self, config: Path) -> AsyncIterator[Prometheus]:
        log = await asyncio.to_thread(self.log.open, "wb")
        with log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            await self._wait_ready()
            yield self
        finally:
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.process.wait(), 10)
                except TimeoutError:
                    self.process.kill()
                    await self.process.wait()

    async def _wait_ready(self, timeout: float = 20.0) -> None:
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(_answers, f"{self.url}/-/ready"):
            if self.process.returncode is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_tail()}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"prometheus not ready in {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        answer = await asyncio.to_thread(_get_json, url)
        assert answer["status"] == "success", answer
        return answer["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, expr: str, timeout: float = 40.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a sample; fail after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await self.query(expr)
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"no data for {expr!r} within {timeout}s; {await self.targets()}\n"
                    f"{self.log_tail()}"
                )
            await asyncio.sleep(0.25)

    async def targets(self) -> str:
        """Every target's health and last error, to tell what a failed wait lacked."""
        data = await self.api("targets")
        return "targets: " + "; ".join(
            f"{t['scrapeUrl']} {t['health']} {t['lastError']}".strip()
            for t in data["activeTargets"]
        )


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(value) for value in _values(result))


@contextlib.contextmanager
def _serving(registry: CollectorRegistry, port: int) -> Iterator[None]:
    """The publisher's metrics, as the application would serve them."""
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def _traffic(publisher: Publisher, stop: asyncio.Event) -> int:
    """Rounds of one message per key until ``stop``; some messages always fail."""
    keys = [f"key-{n}" for n in range(KEYS)]
    await asyncio.gather(
        *(publisher.publish(f"once-{n}", b"once") for n in range(ONCE_KEYS)),
        # its last attempt fails: the worker parks the key, which stays parked to the end
        publisher.publish(PARKED_KEY, b"fail", job_type=PARKING),
        publisher.publish(PARKED_KEY, b"behind the parked head", job_type=PARKING),
        # past its time limit on every attempt: timed out, retried, dead-lettered
        publisher.publish("slow-key", b"hang", job_type="slow"),
    )
    sent = ONCE_KEYS + 3
    round_ = 0
    while not stop.is_set():
        round_ += 1
        failing = round_ % FAIL_EVERY == 0
        await asyncio.gather(
            *(
                publisher.publish(key, b"fail" if failing and n % 4 == 0 else b"%d" % round_)
                for n, key in enumerate(keys)
            )
        )
        sent += len(keys)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return sent


@pytest.mark.processes
@pytest.mark.slow
async def test_every_dashboard_query_returns_data(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    binary = _tool("prometheus")
    rabbitmq_url = _rabbitmq_metrics_url(amqp_url)
    _require(
        f"RabbitMQ's metrics at {rabbitmq_url}",
        await asyncio.to_thread(_answers, rabbitmq_url),
        "rabbitmq-plugins enable rabbitmq_prometheus",
    )
    settings: Settings = make_settings(
        amqp_url,
        namespace,
        max_retries=1,
        retry_backoff=0.05,
        idle_period=3.0,
        metrics_host="127.0.0.1",
    )
    leader_port, standby_port, *worker_ports, app_port, prometheus_port = _free_ports(7)
    leader, standby, app = (f"127.0.0.1:{p}" for p in (leader_port, standby_port, app_port))
    worker = [f"127.0.0.1:{port}" for port in worker_ports]
    prometheus = Prometheus(binary, tmp_path, prometheus_port)
    jobs = {
        REGISTRY_JOB: [
            Target(leader, INSTALLATION, "registry-0"),
            Target(standby, INSTALLATION, "registry-1"),
        ],
        WORKER_JOB: [
            Target(address, INSTALLATION, f"worker-{n}") for n, address in enumerate(worker)
        ],
        APP_JOB: [Target(app, INSTALLATION, "app-0")],
    }
    config = prometheus.configure(jobs, rabbitmq_url)
    app_metrics = CollectorRegistry()
    # the workers import tests.dashboard_app, wherever pytest was started
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(path)}
    target = "tests.dashboard_app:app"

    async with (
        prometheus.running(config),
        LocalCluster(settings, extra_env=env) as cluster,
    ):
        with _serving(app_metrics, app_port):
            await cluster.start_registry(metrics_port=leader_port)
            await prometheus.until(f'rabbitkeys_leader{{instance="{leader}"}} == 1')
            # the standby is scraped before it leads: its leadership counter starts at 0
            await cluster.start_registry(metrics_port=standby_port)
            await prometheus.until(f'rabbitkeys_leadership_acquired_total{{instance="{standby}"}}')
            for port in worker_ports[:2]:
                await cluster.start_worker(target, metrics_port=port)
            await cluster.wait_for_workers(2)

            stop = asyncio.Event()
            async with Publisher(settings, metrics_registry=app_metrics) as publisher:
                traffic = asyncio.create_task(_traffic(publisher, stop))
                try:
                    await prometheus.until("sum(rabbitkeys_handled_messages_total) > 0")
                    # before any worker is killed: the one that parked the key may be it
                    await prometheus.until("sum(rabbitkeys_parked_total) > 0")
                    # a third worker: keys move to it (rebalance, handoff, release)
                    await cluster.start_worker(target, metrics_port=worker_ports[2])
                    await cluster.wait_for_workers(3)
                    await prometheus.until("sum(rabbitkeys_handoff_duration_seconds_count) > 0")
                    # kill -9 a worker: its keys fail over
                    cluster.workers[0].kill()
                    await cluster.workers[0].wait()
                    await prometheus.until("sum(rabbitkeys_failover_gap_seconds_count) > 0")
                    # the leading registry stops: the standby takes over
                    await cluster.terminate(cluster.registries[0])
                    await prometheus.until(f'rabbitkeys_leader{{instance="{standby}"}} == 1')
                    await prometheus.until(f'up{{instance="{leader}"}} == 0')
                    await cluster.wait_for_workers(2)
                    # scraped after the workers joined the new leader
                    await prometheus.until(f'rabbitkeys_live_workers{{instance="{standby}"}} == 2')
                    await prometheus.until("sum(rabbitkeys_dead_lettered_messages_total) > 0")
                    # the new leader read the parked key's hold from the broker
                    await prometheus.until(f'rabbitkeys_parked_keys{{instance="{standby}"}} == 1')
                    # the keys published once went idle and were retired (by either leader)
                    await prometheus.until("sum(increase(rabbitkeys_keys_retired_total[1m])) > 0")

                    found, missing = await _run_queries(prometheus, timeout=30.0)
                    rules = await prometheus.api("rules")
                    # a dead letter fires at once; a process down for a minute: pending
                    expected = {
                        ("RabbitkeysDeadLetters", "firing", ""),
                        ("RabbitkeysProcessDown", "pending", leader),
                        ("RabbitkeysProcessDown", "pending", worker[0]),
                    }
                    alerts = await _wait_for_alerts(prometheus, expected)
                finally:
                    stop.set()
                    sent = await traffic

    print(f"\nsent {sent} messages; dashboard queries:")
    for where, expr in _queries(_dashboard()):
        values = _values(found.get(expr, []))
        text = ", ".join(f"{value:.4g}" for value in values[:4]) + (" ..." * (len(values) > 4))
        print(f"  {'DATA' if expr in found else 'NONE'}  {where}: {expr}  -> [{text}]")
    assert not missing, "queries without data:\n" + "\n".join(missing)

    # order violations stay 0, in every query that shows them
    for _, expr in _queries(_dashboard()):
        if "order_violations" in expr:
            assert set(_values(found[expr])) == {0.0}, expr

    # the panels show what happened: a registry and a worker gone, one leader, two workers
    def shown(where: str) -> dict[str, float]:
        """A query's series by their labels other than namespace (the installation's)."""
        expr = dict(_queries(_dashboard()))[where]
        series = {}
        for sample in found[expr]:
            labels = dict(sample["metric"])
            assert labels.pop("namespace", INSTALLATION) == INSTALLATION, (where, labels)
            series[",".join(labels.values())] = float(sample["value"][1])
        return series

    assert shown("Leading registries / {{namespace}}") == {"": 1.0}
    assert shown("Live workers / {{namespace}}") == {"": 2.0}
    assert shown("Processes / {{role}} {{namespace}}") == {"registry": 1.0, "worker": 2.0}
    assert shown("Processes / targets down {{namespace}}") == {"": 2.0}
    assert shown("Workers and leader / {{namespace}} leader {{pod}}") == {
        f"{standby},registry-1": 1.0
    }
    assert shown("Messages per second / published {{namespace}}")[""] > 0
    assert shown("Messages per second / handled {{namespace}}")[""] > 0
    # the killed worker's series shows only if it was scraped twice while it handled
    assert len(shown("Handled per worker / {{namespace}} {{pod}}")) >= 2
    assert shown("Keys created and retired / retired {{namespace}}")[""] > 0
    assert shown("Dead-lettered / {{namespace}}")[""] > 0
    # one key parked, none paused; every job type's oldest waiting message (the parked
    # key's head, among them) per job type
    assert shown("Parked keys / {{namespace}}") == {"": 1.0}
    assert shown("Parked and paused keys / parked keys {{namespace}}") == {"": 1.0}
    assert shown("Parked and paused keys / paused keys {{namespace}}") == {"": 0.0}
    assert shown("Parked and paused keys / paused job types {{namespace}}") == {"": 0.0}
    ages = shown("Oldest waiting message per job type / {{namespace}} {{job_type}}")
    # "slow" while its one job waits between attempts (then it is dead-lettered)
    assert {DEFAULT_JOB_TYPE, PARKING} <= set(ages) <= {DEFAULT_JOB_TYPE, PARKING, "slow"}

    # the alert rules were loaded and evaluate without error
    loaded = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in loaded} >= {"RabbitkeysOrderViolation", "RabbitkeysNoLeader"}
    assert all(rule["health"] == "ok" for rule in loaded), [
        (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"
    ]
    assert alerts >= expected
    assert not {name for name, _, _ in alerts} & {
        "RabbitkeysOrderViolation",
        "RabbitkeysNoWorkers",
        "RabbitkeysPublishFailures",
    }


async def _wait_for_alerts(
    prometheus: Prometheus, expected: set[tuple[str, str, str]], timeout: float = 15.0
) -> set[tuple[str, str, str]]:
    """Active alerts as (name, state, instance) once they include ``expected``, or at
    ``timeout`` (rules are evaluated every second, on what was scraped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        data = await prometheus.api("alerts")
        active = {
            (alert["labels"]["alertname"], alert["state"], alert["labels"].get("instance", ""))
            for alert in data["alerts"]
        }
        if active >= expected or asyncio.get_running_loop().time() > deadline:
            return active
        await asyncio.sleep(0.25)


async def _run_queries(
    prometheus: Prometheus, timeout: float
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Poll every dashboard query until each has returned data once, or ``timeout``."""
    pending = {expr: where for where, expr in _queries(_dashboard())}
    found: dict[str, list[dict[str, Any]]] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        for expr in list(pending):
            result = await prometheus.query(promql(expr))
            if _has_data(result):
                found[expr] = result
                del pending[expr]
        if not pending or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    return found, [f"{where}: {expr}" for expr, where in pending.items()]


# ------------------------------------------------------------- two installations, one Prometheus

INSTALLATIONS = ("inst-a", "inst-b")


@pytest.fixture
def other_namespace(namespace: str, broker: Broker, session_vhost: str) -> Iterator[str]:
    """A second rabbitkeys namespace in the session's vhost, removed afterwards."""
    name = f"{namespace}-b"
    yield name
    delete_namespace(broker, session_vhost, name)


async def _steady_traffic(publisher: Publisher, stop: asyncio.Event) -> None:
    """Rounds of one message to each of eight keys until ``stop``; none fails."""
    round_ = 0
    while not stop.is_set():
        round_ += 1
        await asyncio.gather(*(publisher.publish(f"key-{n}", b"%d" % round_) for n in range(8)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def _namespaces(result: list[dict[str, Any]]) -> set[str]:
    return {sample["metric"].get("namespace", "") for sample in result}


@pytest.mark.processes
@pytest.mark.slow
async def test_two_installations_see_only_their_own_series(
    amqp_url: str, namespace: str, other_namespace: str, tmp_path: Path
) -> None:
    """Two installations (a registry, a worker and a publisher each) scraped into one
    Prometheus with namespace labels inst-a and inst-b: with the dashboard's variable set
    to one, every rabbitkeys query returns that installation's series only, and no alert
    fires for either (one leader each is not "several leaders")."""
    binary = _tool("prometheus")
    rabbitmq_url = _rabbitmq_metrics_url(amqp_url)
    _require(
        f"RabbitMQ's metrics at {rabbitmq_url}",
        await asyncio.to_thread(_answers, rabbitmq_url),
        "rabbitmq-plugins enable rabbitmq_prometheus",
    )
    ports = _free_ports(3 * len(INSTALLATIONS) + 1)
    prometheus = Prometheus(binary, tmp_path, ports.pop())
    jobs: dict[str, list[Target]] = {REGISTRY_JOB: [], WORKER_JOB: [], APP_JOB: []}
    installations = []
    for label, rabbitkeys_namespace in zip(
        INSTALLATIONS, (namespace, other_namespace), strict=True
    ):
        registry_port, worker_port, app_port = ports.pop(), ports.pop(), ports.pop()
        jobs[REGISTRY_JOB].append(Target(f"127.0.0.1:{registry_port}", label, "registry-0"))
        jobs[WORKER_JOB].append(Target(f"127.0.0.1:{worker_port}", label, "worker-0"))
        jobs[APP_JOB].append(Target(f"127.0.0.1:{app_port}", label, "app-0"))
        settings = make_settings(amqp_url, rabbitkeys_namespace, metrics_host="127.0.0.1")
        installations.append((label, settings, registry_port, worker_port, app_port))
    config = prometheus.configure(jobs, rabbitmq_url)
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(path)}

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(prometheus.running(config))
        publishers = []
        for _label, settings, registry_port, worker_port, app_port in installations:
            cluster = await stack.enter_async_context(LocalCluster(settings, extra_env=env))
            await cluster.start_registry(metrics_port=registry_port)
            await cluster.start_worker("tests.dashboard_app:app", metrics_port=worker_port)
            await cluster.wait_for_workers(1)
            app_metrics = CollectorRegistry()
            stack.enter_context(_serving(app_metrics, app_port))
            publishers.append(
                await stack.enter_async_context(Publisher(settings, metrics_registry=app_metrics))
            )
        stop = asyncio.Event()
        # publishing until the end: rates need increases between scrapes
        for publisher in publishers:
            task = asyncio.create_task(_steady_traffic(publisher, stop))
            stack.push_async_callback(lambda task=task: task)  # type: ignore[misc]
        stack.callback(stop.set)
        for label in INSTALLATIONS:
            selector = f'namespace="{label}"'
            await prometheus.until(
                f"sum(rate(rabbitkeys_handled_messages_total{{{selector}}}[1m])) > 0"
            )
            await prometheus.until(
                f"sum(rate(rabbitkeys_published_messages_total{{{selector}}}[1m])) > 0"
            )
        # both leaders counted together would have made the old rule fire
        assert _values(await prometheus.query("sum(rabbitkeys_leader)")) == [2.0]
        clusters = await prometheus.api(
            "label/rabbitmq_cluster/values", **{"match[]": "rabbitmq_identity_info"}
        )
        assert clusters, "rabbitmq_identity_info has no rabbitmq_cluster"

        shown: dict[str, dict[str, set[str]]] = {}
        for where, expr in _queries(_dashboard()):
            if "rabbitmq_" in expr:
                for cluster_name in clusters:
                    one = await prometheus.query(
                        promql(expr, rabbitmq_cluster=re.escape(cluster_name))
                    )
                    assert {s["metric"].get("rabbitmq_cluster") for s in one} <= {cluster_name}
                assert not await prometheus.query(promql(expr, rabbitmq_cluster="no-such-cluster"))
                continue
            everything = await prometheus.query(promql(expr))
            shown[where] = {"all": _namespaces(everything)}
            for label in INSTALLATIONS:
                result = await prometheus.query(promql(expr, namespace=label))
                shown[where][label] = _namespaces(result)
                # nothing of the other installation, and its own series where "All" had them
                assert shown[where][label] <= {label}, (where, expr, result)
                if label in shown[where]["all"]:
                    assert shown[where][label] == {label}, (where, expr, result)
                assert "" not in shown[where]["all"], (where, "a series without namespace")

        rules = await prometheus.api("rules")
        loaded = [rule for group in rules["groups"] for rule in group["rules"]]
        fired = {}
        for rule in loaded:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            fired[rule["name"]] = await prometheus.query(rule["query"])
        alerts = (await prometheus.api("alerts"))["alerts"]

    print("\nnamespaces each rabbitkeys query shows, with All / inst-a / inst-b:")
    for where, seen in shown.items():
        print(
            f"  {where}: "
            + " / ".join(",".join(sorted(seen[k])) or "-" for k in ("all", *INSTALLATIONS))
        )
    print(f"alert expressions with a result: {sorted(n for n, r in fired.items() if r)}")
    # what both installations produce: one leader, one worker, traffic, each on its own
    for where in (
        "Leading registries / {{namespace}}",
        "Live workers / {{namespace}}",
        "Messages per second / published {{namespace}}",
        "Messages per second / handled {{namespace}}",
        "Handled per worker / {{namespace}} {{pod}}",
        "Processes / {{role}} {{namespace}}",
    ):
        assert shown[where]["all"] == set(INSTALLATIONS), where
    assert {name: result for name, result in fired.items() if result} == {}
    assert alerts == []

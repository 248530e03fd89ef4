"""``rabbitkeys chaos``: keyed traffic while workers, registries and the broker fail.

Runs real processes through the CLI (``LocalCluster``) on the local broker, publishes
``keys x messages`` in rounds, and on a timeline kills a worker (SIGKILL), starts workers,
stops one (SIGTERM, as ``kubectl scale`` does), kills the leading registry and optionally
restarts the broker. Then it counts what the workers handled (``rabbitkeys.tools.demo:app`` writes
one record per handling, with the worker's pid and the delivery's ``redelivered`` flag) and
reports loss, duplicates, order violations and failover gaps.

Each role runs as its own RabbitMQ user by default (``users="per-role"`` when the management
API answers to an administrator's login): the run creates the three users of its namespace,
starts registries with the registry's URL, workers with the worker's, publishes and asks
for status with the publisher's, and deletes the users at the end. ``users="guest"`` runs
everything with the settings' own login.

With ``rabbit`` (``rabbitkeys chaos --cluster``) the run goes to a three-node cluster
(:class:`RabbitCluster`) instead: a vhost of its own on it, every process given the three
nodes' AMQP and management URLs, and, after the worker and registry events, the node holding
most key queues SIGKILLed and restarted while traffic flows (figures in ``node_outage``).

A duplicate is explained only by a crash: the copy was a redelivery and the delivery before
it was by a worker that was SIGKILLed, or the broker restarted (or the cluster node was
killed) between the two (it requeues what was unacked, and publishers resend what was
unconfirmed). Any other duplicate (after a SIGTERM, a scale, a registry kill) is counted as
unexplained, and the run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from .._admin.permissions import Role
from .._admin.status import fetch_status
from .._admin.users import create_users, delete_users, write_url_file
from .._broker.amqp import CHANNEL_ERRORS
from .._errors import RabbitkeysError
from .._publisher.publisher import Publisher
from .._settings import Settings
from .._wire.topology import KeyRef, Names
from .cluster import LocalCluster
from .demo import overlapping_handlings, read_records
from .namespace import remove_namespace
from .node_outage import NodeOutage, group_figures, resumed_after, spread
from .rabbit_cluster import ClusterError, RabbitCluster

__all__ = ["ChaosReport", "own_rabbit_cluster", "run_chaos"]

WORKER_APP = "rabbitkeys.tools.demo:app"
#: seconds a node of the local cluster takes to restart and rejoin (~10 s here, idle): the
#: cluster run publishes long enough for the outage and as long again after it
NODE_RESTART_ALLOWANCE = 12.0
#: where the node is killed, as a fraction of the publishing time; the worker and registry
#: events happen before it (their fractions scaled by CLUSTER_EVENTS_SCALE)
NODE_KILL_AT = 0.5
CLUSTER_EVENTS_SCALE = 0.45


@dataclass
class ChaosReport:
    sent: int = 0
    handled: int = 0
    lost: int = 0
    duplicates: int = 0
    #: duplicates no SIGKILL of their worker nor the broker restart explains
    unexplained_duplicates: int = 0
    order_violations: int = 0
    #: handlings of one key that overlapped in time (one at a time per key broken)
    overlaps: int = 0
    #: seconds from a worker's SIGKILL until each of its keys was handled again (worst key)
    worker_kill_gap: float | None = None
    #: seconds from the leading registry's SIGKILL until another registry led
    registry_failover: float | None = None
    #: longest wait of any key for its next handling after the registry kill
    registry_kill_gap: float | None = None
    #: longest wait of any key for its next handling once the restarted broker was back
    broker_restart_gap: float | None = None
    #: "per-role": each role connected as its own user; "guest": all with the settings' login
    users: str = "guest"
    #: a cluster run: what the SIGKILL of a node and its restart did
    node_outage: NodeOutage | None = None
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.order_violations or self.unexplained_duplicates or self.overlaps
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}s"

        lines = [*self.events, ""]
        lines += [
            f"sent              {self.sent}",
            f"handled           {self.handled}",
            f"lost              {self.lost}",
            f"duplicates        {self.duplicates}  ({self.unexplained_duplicates} unexplained)",
            f"order violations  {self.order_violations}",
            f"overlaps          {self.overlaps}  (handlings of one key at the same time)",
            f"worker kill gap   {seconds(self.worker_kill_gap)}  (worst key of the killed worker)",
            f"registry failover {seconds(self.registry_failover)}  (until another registry led)",
            f"registry kill gap {seconds(self.registry_kill_gap)}  (worst key)",
            f"broker restart    {seconds(self.broker_restart_gap)}  (worst key, once back)",
            f"users             {self.users}",
            *(self.node_outage.format() if self.node_outage else []),
            "",
            "OK"
            if self.ok
            else "FAILED: lost, out of order, overlapping, or duplicated without a crash",
        ]
        return "\n".join(lines)


async def run_chaos(
    settings: Settings,
    *,
    keys: int = 50,
    messages: int = 60,
    workers: int = 3,
    round_interval: float = 0.1,
    broker_restart: bool = False,
    output: Path | None = None,
    users: Literal["per-role", "guest"] | None = None,
    rabbit: RabbitCluster | None = None,
    node_down: float = 5.0,
) -> ChaosReport:
    """``users``: "per-role" (each role its own user; needs an administrator's login and the
    management API), "guest" (every process with the settings' login), or None: per-role
    when the management API answers, else guest.

    ``rabbit``: a running cluster to run on instead of the settings' broker, in a vhost the
    run creates and deletes (guest, an administrator there, makes the users); its busiest
    node is killed and restarted ``node_down`` seconds later. ``settings.queue_type`` says
    which key queues the outage meets. The cluster is left running, every node up."""
    if rabbit is not None and broker_restart:
        raise RabbitkeysError("a cluster run kills a node: --broker-restart is for one broker")
    namespace = f"{settings.namespace}-chaos-{uuid.uuid4().hex[:6]}"
    # nobody retires its key queues after the run: let them expire within minutes
    expires = min(settings.key_queue_expires, 300.0)
    settings = settings.model_copy(update={"namespace": namespace, "key_queue_expires": expires})
    vhost = None
    if rabbit is not None:
        vhost = namespace  # a vhost per run: deleting it removes everything the run made
        await asyncio.to_thread(rabbit.create_vhost, vhost, "rabbitkeys chaos --cluster")
        settings = settings.model_copy(update={
            "amqp_url": SecretStr(",".join(rabbit.amqp_urls(vhost=vhost))),
            "management_url": SecretStr(",".join(rabbit.management_urls())),
            "amqp_url_file": None,
            "management_url_file": None,
        })  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rabbitkeys-chaos-") as scratch:
        directory = output or Path(scratch)
        env = {"RK_DEMO_DIR": str(directory), "RABBITKEYS_LOG_LEVEL": "WARNING"}
        report = ChaosReport()
        roles: dict[Role, Settings] = {}
        try:
            if users != "guest":
                roles = await _role_settings(settings, Path(scratch) / "secrets", users, report)
            publisher = roles.get(Role.PUBLISHER, settings)
            role_settings = {role.value: roles[role] for role in (Role.REGISTRY, Role.WORKER)}
            async with LocalCluster(
                publisher, extra_env=env, role_settings=role_settings if roles else None
            ) as cluster:
                timeline = await _scenario(
                    report, cluster, publisher, directory, keys, messages, workers,
                    round_interval, broker_restart, rabbit, node_down,
                )  # fmt: skip
                # Every worker stops (SIGTERM) before the records are read: once they have
                # exited nothing more can be handled, so a late duplicate cannot be missed.
                await cluster.stop_all()
        finally:
            if rabbit is None:
                await remove_namespace(settings)
            if users != "guest":  # also after a failure halfway through creating them
                with contextlib.suppress(RabbitkeysError):
                    await delete_users(settings)
            if rabbit is not None and vhost is not None:
                await asyncio.to_thread(_remove_vhost, rabbit, vhost)
        report = _judge(report, read_records(directory), timeline)
        if rabbit is not None:
            report.node_outage = _node_outage(report, read_records(directory), timeline)
        return report


@contextlib.asynccontextmanager
async def own_rabbit_cluster(port_base: int) -> AsyncIterator[RabbitCluster]:
    """A three-node cluster on ``port_base`` (files in /tmp/rabbitkeys-chaos-cluster-PORT_BASE)
    for the body; stopped and removed after it, also on failure and Ctrl-C (and at exit, as
    a backstop). A cluster that a killed run left on the same port base is stopped first."""
    rabbit = RabbitCluster(Path(f"/tmp/rabbitkeys-chaos-cluster-{port_base}"), port_base=port_base)
    rabbit.stop_at_exit()
    starting = asyncio.ensure_future(asyncio.to_thread(rabbit.start))
    try:
        # shielded: a Ctrl-C while the nodes boot cannot stop the boot's thread, so the
        # finally block waits for it to end before stopping what it started
        await asyncio.shield(starting)
        yield rabbit
    finally:
        with contextlib.suppress(BaseException):
            await starting
        await asyncio.to_thread(rabbit.stop)


def _remove_vhost(rabbit: RabbitCluster, vhost: str) -> None:
    """Bring every node back (a run that failed mid-outage leaves one down, and deleting a
    vhost whose queues live on a down node hangs), then delete the run's vhost."""
    with contextlib.suppress(ClusterError, OSError):
        rabbit.ensure_all_running()
        rabbit.delete_vhost(vhost)


async def _role_settings(
    settings: Settings,
    secrets_dir: Path,
    users: Literal["per-role"] | None,
    report: ChaosReport,
) -> dict[Role, Settings]:
    """Create the namespace's three users; each role's settings, its URL in a file (as in
    production). Empty, when ``users`` is None and the management API does not answer or
    the login is no administrator's: the run goes on with the settings' login."""
    try:
        made = await create_users(settings)
    except RabbitkeysError as exc:
        if users == "per-role":
            raise
        report.events.append(f"one login for every process (no per-role users: {exc})")
        return {}
    # the management API with each role's own login (a login in the URL would be the admin's)
    management = settings.management_url
    if management is not None:
        management = SecretStr(",".join(_without_login(url) for url in settings.management_urls))
    roles = {}
    for item in made:
        assert item.amqp_url is not None  # a new namespace: new users, passwords known
        path = write_url_file(secrets_dir, item.user, item.amqp_url)
        roles[item.user.role] = settings.model_copy(
            update={"amqp_url": item.amqp_url, "amqp_url_file": path, "management_url": management}
        )
    report.users = "per-role"
    report.events.append("each role with its own user: " + ", ".join(i.user.name for i in made))
    return roles


def _without_login(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass
class _Timeline:
    """What the scenario did, for the judge."""

    sent: int = 0
    names: list[str] = field(default_factory=list)
    #: epoch seconds of "worker_kill", "registry_kill", "broker_stop", "broker_back"
    marks: dict[str, float] = field(default_factory=dict)
    #: pids of the workers that were SIGKILLed: their unacked deliveries come again
    killed_pids: set[int] = field(default_factory=set)
    #: a cluster run: the killed node, and each key's queue node just before the kill
    killed_node: str | None = None
    key_nodes: dict[str, str] = field(default_factory=dict)
    cluster_nodes: list[str] = field(default_factory=list)
    queue_type: str = "classic"


async def _scenario(
    report: ChaosReport,
    cluster: LocalCluster,
    settings: Settings,
    directory: Path,
    keys: int,
    messages: int,
    workers: int,
    round_interval: float,
    broker_restart: bool,
    rabbit: RabbitCluster | None = None,
    node_down: float = 5.0,
) -> _Timeline:
    timeline = _Timeline(names=[f"key-{i}" for i in range(keys)], queue_type=settings.queue_type)
    marks = timeline.marks
    total_time = messages * round_interval
    scale = 1.0
    if rabbit is not None:
        # traffic must flow through the outage and as long again after the node's return
        total_time = max(total_time, (node_down + NODE_RESTART_ALLOWANCE) / (1 - NODE_KILL_AT))
        round_interval = total_time / messages
        scale = CLUSTER_EVENTS_SCALE

    def event(text: str) -> float:
        now = time.time()
        report.events.append(f"{time.strftime('%H:%M:%S', time.localtime(now))} {text}")
        return now

    leader = await cluster.start_registry()
    await _wait_for_leader(settings, None)
    await cluster.start_registry()  # standby
    for _ in range(workers):
        await cluster.start_worker(WORKER_APP)
    await cluster.wait_for_workers(workers)
    event(
        f"2 registries and {workers} workers up; publishing {keys} keys x {messages}, "
        f"one every {round_interval:.2f}s per key"
    )

    async with Publisher(settings) as publisher:

        async def publish_key(name: str) -> None:
            # each key at its own pace: a key that waits (its classic queue's node is down)
            # must not hold back the others' traffic, or their gaps would be its outage
            for n in range(messages):
                await publisher.publish(name, str(n).encode())
                timeline.sent += 1
                await asyncio.sleep(round_interval)

        publishing = asyncio.gather(*(publish_key(name) for name in timeline.names))

        async def at(fraction: float) -> None:
            wanted = fraction * scale * total_time
            await asyncio.sleep(max(0.0, wanted - (time.monotonic() - started)))

        started = time.monotonic()
        try:
            await at(0.15)
            victim = cluster.workers[0]
            timeline.killed_pids.add(victim.pid)
            victim.kill()
            marks["worker_kill"] = event(f"SIGKILL worker pid {victim.pid}")
            await at(0.3)
            await cluster.start_worker(WORKER_APP)
            event("started a worker")
            await at(0.45)
            stopping = cluster.workers[1]
            code = await cluster.terminate(stopping)
            event(f"SIGTERM worker pid {stopping.pid}: exit code {code}")
            await at(0.55)
            before = await _leader_id(settings)
            leader.kill()
            marks["registry_kill"] = event(f"SIGKILL leading registry pid {leader.pid}")
            failover = await _wait_for_leader(settings, before) - marks["registry_kill"]
            report.registry_failover = failover
            event(f"another registry leads after {failover:.2f}s")
            await cluster.start_registry()
            await at(0.7)
            await cluster.start_worker(WORKER_APP)
            event("started a worker")
            if broker_restart:
                await at(0.8)
                marks["broker_stop"] = event("restarting the broker")
                await asyncio.to_thread(restart_local_broker)
                marks["broker_back"] = event("broker back")
            if rabbit is not None:
                await at(NODE_KILL_AT / scale)
                await _node_kill_and_restart(rabbit, settings, timeline, node_down, event)
        except BaseException:
            publishing.cancel()
            with contextlib.suppress(BaseException):
                await publishing
            raise
        await publishing
    event(f"published {timeline.sent} messages; waiting for the workers")
    deadline = time.monotonic() + 60 + total_time
    while time.monotonic() < deadline:
        if len({(r["key"], r["seq"]) for r in read_records(directory)}) >= timeline.sent:
            break
        await asyncio.sleep(0.5)
    return timeline


async def _node_kill_and_restart(
    rabbit: RabbitCluster,
    settings: Settings,
    timeline: _Timeline,
    node_down: float,
    event: Callable[[str], float],
) -> None:
    """SIGKILL the node holding most of the run's key queues, restart it ``node_down``
    seconds later; the marks "node_kill" and "node_back" (once it is in the cluster again)."""
    names = Names(settings.namespace)
    queue_of = {names.key_queue(KeyRef.of(name)): name for name in timeline.names}
    nodes = await asyncio.to_thread(rabbit.queue_nodes, settings.vhost, names.key_queue_prefix)
    timeline.key_nodes = {queue_of[q]: node for q, node in nodes.items() if q in queue_of}
    if not timeline.key_nodes:
        raise RabbitkeysError("no key queue found on the cluster: nothing to kill a node for")
    busiest = Counter(timeline.key_nodes.values()).most_common(1)[0][0]
    victim = next(node for node in rabbit.nodes if node.name == busiest)
    timeline.killed_node = victim.name
    timeline.cluster_nodes = [node.name for node in rabbit.nodes]
    await asyncio.to_thread(rabbit.kill, victim.index)
    timeline.marks["node_kill"] = event(
        f"SIGKILL node {victim.name} ({Counter(timeline.key_nodes.values())[busiest]} of "
        f"{len(timeline.key_nodes)} key queues)"
    )
    await asyncio.sleep(node_down)
    event(f"restarting node {victim.name}")
    await asyncio.to_thread(rabbit.restart, victim.index)
    timeline.marks["node_back"] = event(f"node {victim.name} back in the cluster")


def _judge(report: ChaosReport, records: list[dict[str, Any]], timeline: _Timeline) -> ChaosReport:
    marks = timeline.marks
    records.sort(key=lambda r: r["started"])
    unique = {(r["key"], r["publisher"], r["seq"]) for r in records}
    report.sent = timeline.sent
    report.handled = len(unique)
    report.lost = timeline.sent - len(unique)
    report.duplicates = len(records) - len(unique)
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    previous: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key_records in by_key.values():
        highest = 0
        for record in key_records:
            ident = (record["key"], record["publisher"], record["seq"])
            if ident in previous:
                # a duplicate: only first handlings must follow publish order
                if not _explained(previous[ident], record, timeline):
                    report.unexplained_duplicates += 1
                previous[ident] = record
                continue
            previous[ident] = record
            if record["seq"] < highest:
                report.order_violations += 1
            highest = max(highest, record["seq"])

    report.overlaps = len(overlapping_handlings(records))

    def worst_gap(since: float, keys: set[str]) -> float | None:
        gaps = []
        for key in keys:
            after = [r["started"] for r in by_key[key] if r["started"] >= since]
            if after:
                gaps.append(after[0] - since)
        return max(gaps) if gaps else None

    if "worker_kill" in marks:
        kill = marks["worker_kill"]
        victims = {
            r["key"] for r in records if r["pid"] in timeline.killed_pids and r["started"] < kill
        }
        report.worker_kill_gap = worst_gap(kill, victims)
    if "registry_kill" in marks:
        report.registry_kill_gap = worst_gap(marks["registry_kill"], set(timeline.names))
    if "broker_back" in marks:
        report.broker_restart_gap = worst_gap(marks["broker_back"], set(timeline.names))
    return report


def _node_outage(
    report: ChaosReport, records: list[dict[str, Any]], timeline: _Timeline
) -> NodeOutage | None:
    """The per-node figures of a cluster run (None if it did not get as far as the kill)."""
    down, back = timeline.marks.get("node_kill"), timeline.marks.get("node_back")
    if timeline.killed_node is None or down is None or back is None:
        return None
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    killed = {k for k, node in timeline.key_nodes.items() if node == timeline.killed_node}
    others = set(timeline.names) - killed
    return NodeOutage(
        node=timeline.killed_node,
        queue_type=timeline.queue_type,
        queues_per_node=spread(timeline.key_nodes, timeline.cluster_nodes),
        outage=back - down,
        killed_node_keys=group_figures(by_key, sorted(killed), down, back),
        other_keys=group_figures(by_key, sorted(others), down, back),
        resumed_after_return=resumed_after(by_key, killed, back),
    )


def _explained(before: dict[str, Any], copy: dict[str, Any], timeline: _Timeline) -> bool:
    """A second handling is explained by the crash of the worker that handled the message
    before (the broker redelivers what it had not acked), or by the broker restart or a
    cluster node's SIGKILL between the two handlings (unacked deliveries requeued,
    unconfirmed publishes resent after a nack or a lost connection)."""
    if copy.get("redelivered") and before["pid"] in timeline.killed_pids:
        return True
    for stop_mark, back_mark in (("broker_stop", "broker_back"), ("node_kill", "node_back")):
        stop, back = timeline.marks.get(stop_mark), timeline.marks.get(back_mark)
        if stop is not None and back is not None:
            if before["started"] < back and copy["started"] >= stop:
                return True
    return False


async def _leader_id(settings: Settings) -> str | None:
    # A channel error too: a registry starting in a new vhost of a 4.0.5 cluster made the
    # poll's publish meet "NOT_FOUND - no exchange 'NS.requests'" once its passive check had
    # found it (the next poll asks again)
    with contextlib.suppress(RabbitkeysError, *CHANNEL_ERRORS):
        return (await fetch_status(settings, backlog=False, timeout=1.0)).registry_id
    return None


async def _wait_for_leader(settings: Settings, not_this: str | None, timeout: float = 30) -> float:
    """Wait until a registry other than ``not_this`` leads; return when (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = await _leader_id(settings)
        if leader is not None and leader != not_this:
            return time.time()
        await asyncio.sleep(0.05)
    raise RabbitkeysError(f"no registry took the lead within {timeout:g}s")


def restart_local_broker() -> None:
    """Stop and start the RabbitMQ application on this machine (``rabbitmqctl``)."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        raise RabbitkeysError("rabbitmqctl is not on PATH: cannot restart the broker")
    subprocess.run([rabbitmqctl, "stop_app"], check=True, capture_output=True, timeout=120)
    subprocess.run([rabbitmqctl, "start_app"], check=True, capture_output=True, timeout=120)
    subprocess.run([rabbitmqctl, "await_startup"], check=True, capture_output=True, timeout=120)

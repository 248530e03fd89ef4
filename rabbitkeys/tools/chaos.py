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

A duplicate is explained only by a crash: the copy was a redelivery and the delivery before
it was by a worker that was SIGKILLed, or the broker restarted between the two (it requeues
what was unacked, and publishers resend what was unconfirmed). Any other duplicate (after a
SIGTERM, a scale, a registry kill) is counted as unexplained, and the run fails.
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
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from .._errors import RabbitkeysError
from .._permissions import Role
from .._publisher import Publisher
from .._settings import Settings
from .._status import fetch_status
from .._users import create_users, delete_users, write_url_file
from .cluster import LocalCluster
from .demo import overlapping_handlings, read_records
from .namespace import remove_namespace

__all__ = ["ChaosReport", "run_chaos"]

WORKER_APP = "rabbitkeys.tools.demo:app"


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
) -> ChaosReport:
    """``users``: "per-role" (each role its own user; needs an administrator's login and the
    management API), "guest" (every process with the settings' login), or None: per-role
    when the management API answers, else guest."""
    namespace = f"{settings.namespace}-chaos-{uuid.uuid4().hex[:6]}"
    # nobody retires its key queues after the run: let them expire within minutes
    expires = min(settings.key_queue_expires, 300.0)
    settings = settings.model_copy(update={"namespace": namespace, "key_queue_expires": expires})
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
                    round_interval, broker_restart,
                )  # fmt: skip
                # Every worker stops (SIGTERM) before the records are read: once they have
                # exited nothing more can be handled, so a late duplicate cannot be missed.
                await cluster.stop_all()
        finally:
            await remove_namespace(settings)
            if users != "guest":  # also after a failure halfway through creating them
                with contextlib.suppress(RabbitkeysError):
                    await delete_users(settings)
        return _judge(report, read_records(directory), timeline)


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
) -> _Timeline:
    timeline = _Timeline(names=[f"key-{i}" for i in range(keys)])
    marks = timeline.marks

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
    event(f"2 registries and {workers} workers up; publishing {keys} keys x {messages}")

    async with Publisher(settings) as publisher:

        async def publish_rounds() -> None:
            for n in range(messages):
                await asyncio.gather(
                    *(publisher.publish(name, str(n).encode()) for name in timeline.names)
                )
                timeline.sent += len(timeline.names)
                await asyncio.sleep(round_interval)

        publishing = asyncio.create_task(publish_rounds())
        total_time = messages * round_interval

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, fraction * total_time - (time.monotonic() - started)))

        started = time.monotonic()
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
        report.registry_failover = await _wait_for_leader(settings, before) - marks["registry_kill"]
        event(f"another registry leads after {report.registry_failover:.2f}s")
        await cluster.start_registry()
        await at(0.7)
        await cluster.start_worker(WORKER_APP)
        event("started a worker")
        if broker_restart:
            await at(0.8)
            marks["broker_stop"] = event("restarting the broker")
            await asyncio.to_thread(restart_local_broker)
            marks["broker_back"] = event("broker back")
        await publishing
    event(f"published {timeline.sent} messages; waiting for the workers")
    deadline = time.monotonic() + 60 + total_time
    while time.monotonic() < deadline:
        if len({(r["key"], r["seq"]) for r in read_records(directory)}) >= timeline.sent:
            break
        await asyncio.sleep(0.5)
    return timeline


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


def _explained(before: dict[str, Any], copy: dict[str, Any], timeline: _Timeline) -> bool:
    """A second handling is explained by the crash of the worker that handled the message
    before (the broker redelivers what it had not acked), or by the broker restart between
    the two handlings (unacked deliveries requeued, unconfirmed publishes resent)."""
    if copy.get("redelivered") and before["pid"] in timeline.killed_pids:
        return True
    stop, back = timeline.marks.get("broker_stop"), timeline.marks.get("broker_back")
    if stop is None or back is None:
        return False
    return bool(before["started"] < back and copy["started"] >= stop)


async def _leader_id(settings: Settings) -> str | None:
    with contextlib.suppress(RabbitkeysError):
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

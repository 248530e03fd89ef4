"""``rabbitkeys status``: ask the leading registry, print what it says."""

from __future__ import annotations

from .._broker.connection import connect
from .._broker.control import ControlClient
from .._errors import RabbitkeysError
from .._settings import Settings
from .._wire.protocol import Status, StatusRequest
from .._wire.topology import Names

__all__ = ["fetch_status", "format_status"]


async def fetch_status(
    settings: Settings, *, backlog: bool = True, timeout: float = 10.0
) -> Status:
    connection = await connect(settings, "status")
    try:
        client = ControlClient(connection, Names(settings.namespace), settings.amqp_user)
        await client.start()
        reply = await client.request(StatusRequest(backlog=backlog), timeout=timeout)
    finally:
        await connection.close()
    if not isinstance(reply, Status):
        raise RabbitkeysError(f"unexpected reply from the registry: {reply!r}")
    return reply


def format_status(status: Status) -> str:
    lines = [
        f"namespace {status.namespace}  registry {status.registry_id}",
        f"keys {status.keys}  unassigned {status.unassigned_keys}  "
        f"retiring {status.retiring_keys}"
        + (f"  backlog {status.backlog}" if status.backlog is not None else ""),
        f"parked {status.parked_keys}  paused {status.paused_keys}"
        + (
            f"  paused job types {', '.join(status.paused_job_types)}"
            if status.paused_job_types
            else ""
        )
        + (
            "  (rabbitkeys keys --state parked|paused)"
            if status.parked_keys + status.paused_keys
            else ""
        ),
        "",
        f"{'WORKER':<16} {'JOB TYPES':<24} {'KEYS':>7} {'BACKLOG':>8} {'SEEN':>6}",
    ]
    for worker in status.workers:
        backlog = "-" if worker.backlog is None else str(worker.backlog)
        lines.append(
            f"{worker.worker_id:<16} {','.join(worker.job_types):<24} {worker.keys:>7} "
            f"{backlog:>8} {worker.last_seen_seconds:>5.1f}s"
        )
    if not status.workers:
        lines.append("(no workers)")
    return "\n".join(lines)

"""What the benchmark reads from and does to the broker beside the runs themselves: a vhost
of its own per run, CPU time from /proc, the broker's memory.

Each run gets a vhost of its own and deletes it at the end, with everything in it, also when
the run fails or is interrupted: queues, exchanges and bindings of every strategy go with it.
A run killed outright (SIGKILL) leaves its vhost behind, marked with its pid and host; the
next run on the same host removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import SecretStr

from ..._broker.management import _get, request
from ..._errors import BrokerUnavailableError
from ..._settings import Settings
from ..rabbit_cluster import process_alive

__all__ = [
    "broker_cpu_seconds",
    "broker_erlang_memory",
    "broker_memory",
    "broker_pids",
    "cpu_seconds",
    "key_queue_nodes",
    "processes_cpu",
    "run_vhost",
]

logger = logging.getLogger(__name__)

_MARK = "rabbitkeys bench: pid {pid} on {host}"


@contextlib.asynccontextmanager
async def run_vhost(settings: Settings, label: str) -> AsyncIterator[Settings]:
    """``settings`` pointing into a new vhost (named after ``label``), deleted on exit.

    Where the login may not create vhosts (or there is no management API), the run uses
    the given vhost and cleans up after itself by name, as it always did.
    """
    _remove_abandoned(settings)
    vhost = f"rabbitkeys-bench-{label}-{uuid.uuid4().hex[:6]}"
    quoted = urllib.parse.quote(vhost, safe="")
    try:
        request(
            settings,
            f"vhosts/{quoted}",
            method="PUT",
            body={"description": _MARK.format(pid=os.getpid(), host=socket.gethostname())},
        )
    except (urllib.error.HTTPError, BrokerUnavailableError) as exc:
        logger.warning("no vhost of its own for the run (%s); using %s", exc, settings.vhost)
        yield settings
        return
    try:
        user = urllib.parse.quote(settings.amqp_user, safe="")
        request(
            settings,
            f"permissions/{quoted}/{user}",
            method="PUT",
            body={"configure": ".*", "write": ".*", "read": ".*"},
        )
        urls = ",".join(
            urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{quoted}"))
            for url in settings.amqp_urls
        )
        # the URLs themselves, not a file that names the old vhost
        yield settings.model_copy(update={"amqp_url": SecretStr(urls), "amqp_url_file": None})
    finally:
        _delete_vhost(settings, quoted)


def _delete_vhost(settings: Settings, quoted: str, attempts: int = 4) -> None:
    # a broker restarting (or too busy to answer) gets some time: 2 + 4 + 8 s between tries
    for attempt in range(attempts):
        try:
            request(settings, f"vhosts/{quoted}", method="DELETE")
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return
            error: Exception = exc
        except BrokerUnavailableError as exc:
            error = exc
        if attempt + 1 < attempts:
            time.sleep(2.0 * 2**attempt)
    logger.warning(
        "could not delete vhost %s (%s): the next run on this host deletes it",
        urllib.parse.unquote(quoted),
        error,
    )


#: abandoned vhosts this process is deleting (in the background: on a busy broker
#: deleting one takes minutes, and a run must not wait for another run's leftovers)
_sweeping: set[str] = set()


def _remove_abandoned(settings: Settings) -> None:
    """Start deleting the vhosts of bench runs on this host whose process is gone."""
    try:
        vhosts = _get(settings, "vhosts?columns=name,description")
    except BrokerUnavailableError:
        return
    host = socket.gethostname()
    for vhost in vhosts:
        description = str(vhost.get("description") or "")
        prefix, _, rest = description.partition("rabbitkeys bench: pid ")
        pid, _, on_host = rest.partition(" on ")
        name = vhost["name"]
        alive = pid.isdigit() and process_alive(int(pid))
        if prefix or not pid.isdigit() or on_host != host or alive or name in _sweeping:
            continue
        logger.warning("removing vhost %s, left by an interrupted run", name)
        _sweeping.add(name)
        quoted = urllib.parse.quote(name, safe="")
        threading.Thread(
            target=_delete_vhost, args=(settings, quoted, 1), name=f"delete {name}", daemon=True
        ).start()


def broker_pids(settings: Settings) -> list[int]:
    """The OS pids of the broker's nodes on this host, as its management API tells (every
    node of a cluster whose nodes run here: their CPU is summed); with no API, the one
    ``beam.smp`` on this host (none if there are several: a second node for cluster tests
    must not be taken for the broker)."""
    try:
        nodes = _get(settings, "nodes?columns=name,os_pid")
        pids = [int(node.get("os_pid") or 0) for node in nodes]
        found = [pid for pid in pids if pid and _is_beam(pid)]
        if found:
            return found
    except (BrokerUnavailableError, ValueError, TypeError):
        pass
    beams = [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if _is_beam(int(stat.parent.name))
    ]
    return beams if len(beams) == 1 else []


def key_queue_nodes(settings: Settings, prefix: str) -> dict[str, int]:
    """How many queues of the settings' vhost whose names start with ``prefix`` have their
    leader on each node (classic queues report ``node``, quorum queues ``leader``): how
    the queue locator spread them. Empty without a management API."""
    vhost = urllib.parse.quote(settings.vhost, safe="")
    try:
        queues = _get(settings, f"queues/{vhost}?columns=name,node,leader")
    except BrokerUnavailableError:
        return {}
    counts: dict[str, int] = {}
    for queue in queues:
        if queue["name"].startswith(prefix):
            node = str(queue.get("leader") or queue.get("node") or "?")
            counts[node] = counts.get(node, 0) + 1
    return dict(sorted(counts.items()))


def _is_beam(pid: int) -> bool:
    try:
        return "(beam.smp)" in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def broker_cpu_seconds(pids: int | list[int] | None = None) -> float | None:
    """CPU time of the broker node ``pids`` (by default the one ``beam.smp`` on this host),
    summed over the nodes when a list; None if none is found or one is gone (a sum
    missing a node would read as a saving)."""
    if pids is None:
        beams = [
            stat for stat in Path("/proc").glob("[0-9]*/stat") if _is_beam(int(stat.parent.name))
        ]
        if len(beams) != 1:
            return None
        pids = [int(beams[0].parent.name)]
    elif isinstance(pids, int):
        pids = [pids]
    if not pids:
        return None
    try:
        return sum(cpu_seconds(pid) for pid in pids)
    except (OSError, ValueError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes together (one that is gone counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(pid)
    return total


def broker_erlang_memory(settings: Settings) -> float | None:
    """The Erlang VMs' memory of every node, summed, computed by each node when asked
    (``memory=true``): unlike ``mem_used``, which the management API refreshes every 5 s,
    it sees a short run's keys and the previous run's queues gone. None without the API."""
    try:
        total = 0.0
        for node in _get(settings, "nodes?columns=name"):
            quoted = urllib.parse.quote(node["name"], safe="")
            answer = _get(settings, f"nodes/{quoted}?memory=true")
            total += float(answer["memory"]["total"]["erlang"])
        return total
    except Exception:
        return None


def broker_memory(settings: Settings) -> float | None:
    try:
        nodes = _get(settings, "nodes?columns=mem_used")
        return float(sum(node["mem_used"] for node in nodes))
    except Exception:
        return None

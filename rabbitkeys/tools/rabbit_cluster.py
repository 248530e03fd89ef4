"""A RabbitMQ cluster of a few nodes on this machine, for the tests of issue 14.

The nodes run beside (never joined to) the machine's own broker ``rabbit@localhost`` (ports
4369, 5672, 15672, 15692, 25672): each has its own node name, AMQP / management / prometheus /
distribution ports, config, data, logs and enabled-plugins file, all under one directory.
They run as the ``rabbitmq`` user (so this must run as root or as that user): they and the CLI
tools then share the Erlang cookie in ``/var/lib/rabbitmq``. Everything listens on 127.0.0.1;
guest/guest works from there. Stdlib only (``check`` uses aio-pika, as rabbitkeys does).

    python -m rabbitkeys.tools.rabbit_cluster start [--dir D] [--port-base N]  # leave it up
    python -m rabbitkeys.tools.rabbit_cluster stop  [--dir D] [--port-base N]  # stop, remove
    python -m rabbitkeys.tools.rabbit_cluster check [--dir D] [--port-base N]  # start, use, stop

With ``--root R`` (``root=``) the nodes are the RabbitMQ installed in the Debian root ``R``
(another RabbitMQ than the machine's: CI's 4.0.5 in the root that ``.ci/rabbitmq4.sh root``
makes), run with ``chroot R`` as that root's ``rabbitmq`` user, with their files under
``R/tmp`` by default; root only. ``R/proc``, ``R/dev`` and ``R/sys`` are mounted if they are
not. On RabbitMQ 4 the nodes deny global QoS, as 4.3 does by default (see ``_write_files``).

Node ``i`` (1-based) of a cluster with port base ``B`` is ``rk{i}-{B}@localhost`` with AMQP on
``B+i``, management on ``B+10000+i``, prometheus on ``B+10110+i`` and Erlang distribution on
``B+20000+i``: two clusters with different port bases share no name and no port.

Pitfalls met while this was a probe (measured on RabbitMQ 3.10.8, 2 cores):

- ``/etc/rabbitmq/rabbitmq-env.conf`` sets ``NODENAME=rabbit@localhost``: each node gets an
  empty env file of its own, or every node would be the machine's broker.
- A port of the machine's broker (management on 15692, say) crashes a node at boot: reserved
  ports are refused up front.
- ``rabbitmqctl await_startup`` fails at once ("not running at all") until the new VM has
  registered with epmd, a second or so after ``rabbitmq-server -detached`` returned: retried.
- ``stop_app`` takes ~6 s on a fresh node: the followers are joined in parallel, except
  ``join_cluster`` itself, which changes the leader's membership, one at a time.
- Each ``rabbitmqctl`` call boots an Erlang VM (~1 s of CPU): state that can be read without
  it (is the node's process alive, does its AMQP port answer) is read without it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from .._errors import RabbitkeysError

__all__ = ["ClusterError", "ClusterNode", "RabbitCluster"]

log = logging.getLogger(__name__)

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = "/var/lib/rabbitmq"  # HOME of the rabbitmq user: holds .erlang.cookie
RUN_AS = "rabbitmq"
# Ports of the machine's own broker (epmd, AMQP, management, prometheus, distribution).
RESERVED_PORTS = frozenset({4369, 5672, 15672, 15692, 25672})
# event exchange: the registry hears at once when a worker's connection dies, as on the
# machine's broker (.ci/run enables it there)
PLUGINS = "[rabbitmq_management,rabbitmq_prometheus,rabbitmq_event_exchange].\n"
START_TIMEOUT = 120.0  # seconds for one node to boot (a cold boot here takes ~8 s)
# Written into the cluster's directory: stop() removes only a directory that has it, and
# start() learns from it whether a live process still owns a cluster found there.
MARKER = "rabbit-cluster.json"

_T = TypeVar("_T")


class ClusterError(RabbitkeysError, RuntimeError):
    """The cluster cannot be started, reached or changed as asked (the message says why)."""


@dataclass(frozen=True)
class ClusterNode:
    """One node: its Erlang node name and the TCP ports it listens on (all on 127.0.0.1)."""

    index: int
    name: str
    amqp: int
    management: int
    prometheus: int
    dist: int

    @property
    def short(self) -> str:
        """The node's name without ``@localhost``; also its directory's name."""
        return self.name.partition("@")[0]

    @property
    def ports(self) -> tuple[int, int, int, int]:
        return (self.amqp, self.management, self.prometheus, self.dist)


class RabbitCluster:
    """``nodes`` RabbitMQ nodes on localhost, clustered, with their files under ``directory``.

    ``start()`` boots and clusters them (~20 s for three here), ``stop()`` stops them and
    removes ``directory``; as a context manager it does both. ``kill(i)`` / ``restart(i)``
    crash and bring back node ``i`` (1-based) for failover tests.
    """

    def __init__(
        self, directory: Path, *, port_base: int = 5680, nodes: int = 3, root: Path | None = None
    ) -> None:
        if not 1 <= nodes <= 9:
            raise ClusterError(f"nodes must be 1 to 9, not {nodes}")
        if not 1024 <= port_base <= 65535 - 20000 - nodes:
            raise ClusterError(f"port_base {port_base}: its ports would not all be in 1024-65535")
        self.directory = Path(directory)
        self.port_base = port_base
        #: the Debian root whose RabbitMQ the nodes run (None: the machine's own)
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.directory.is_relative_to(self.root):
            raise ClusterError(f"{self.directory} is not inside the root {self.root}")
        self.nodes = [
            ClusterNode(
                index=i,
                name=f"rk{i}-{port_base}@localhost",
                amqp=port_base + i,
                management=port_base + 10000 + i,
                prometheus=port_base + 10110 + i,
                dist=port_base + 20000 + i,
            )
            for i in range(1, nodes + 1)
        ]
        reserved = sorted({p for n in self.nodes for p in n.ports} & RESERVED_PORTS)
        if reserved:
            raise ClusterError(
                f"port_base {port_base} takes ports of the machine's own broker {reserved}"
            )
        #: seconds taken by the last start ("boot", "cluster") and stop ("stop")
        self.timings: dict[str, float] = {}

    def __repr__(self) -> str:
        root = "" if self.root is None else f", root={str(self.root)!r}"
        return f"RabbitCluster({str(self.directory)!r}, port_base={self.port_base}{root})"

    # ------------------------------------------------------------------ what runs here

    @staticmethod
    def usable(root: Path | None = None) -> str | None:
        """None if this machine can run a cluster (of the RabbitMQ in ``root``, if given),
        else why not (for a test to skip with)."""
        if root is not None:
            if not (Path(root) / RABBIT_BIN.relative_to("/") / "rabbitmq-server").exists():
                return f"no RabbitMQ server in {Path(root) / RABBIT_BIN.relative_to('/')}"
            if _root_user(Path(root)) is None:
                return f"no {RUN_AS} user in {root}/etc/passwd"
            if os.geteuid() != 0:
                return f"the nodes run in {root} with chroot: this must run as root"
            return None
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            return f"no RabbitMQ server in {RABBIT_BIN}"
        try:
            uid = pwd.getpwnam(RUN_AS).pw_uid
        except KeyError:
            return f"no {RUN_AS} user on this machine"
        if os.geteuid() not in (0, uid):
            return f"the nodes run as {RUN_AS}: this must run as root or as {RUN_AS}"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "runuser (util-linux) is missing: root cannot start nodes as rabbitmq"
        return None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Boot all nodes, cluster them, wait until every one is in ``running_nodes``.

        A cluster left behind by a run that died (same port base, or this directory) is
        stopped first; one whose owning process is still alive is refused. If the start
        fails, whatever it started is stopped and removed before the error is raised.
        """
        if reason := self.usable(self.root):
            raise ClusterError(reason)
        if self.root is not None:
            _prepare_root(self.root)
        self._clear_leftovers()
        self._check_ports_free()
        try:
            started = time.monotonic()
            self.directory.mkdir(parents=True)
            (self.directory / MARKER).write_text(
                json.dumps({"pid": os.getpid(), "port_base": self.port_base})
            )
            for node in self.nodes:
                self._write_files(node)
            _chown_tree(self.directory, self._owner())
            _on_all(self._launch, self.nodes)
            _on_all(self._await_startup, self.nodes)
            booted = time.monotonic()
            self._join(self.nodes[1:], self.nodes[0])
            self._await_members(self.nodes)
            self.timings["boot"] = booted - started
            self.timings["cluster"] = time.monotonic() - booted
            log.info(
                "%s: %d nodes booted in %.1f s, clustered in %.1f s",
                self,
                len(self.nodes),
                self.timings["boot"],
                self.timings["cluster"],
            )
        except BaseException:
            self._log_tails()
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGKILL if one will not stop) and remove the directory.

        Idempotent: stopping a stopped cluster does nothing.
        """
        started = time.monotonic()
        if any(_node_pids(n) for n in self.nodes):
            _on_all(self._stop_node, self.nodes)
        if (self.directory / MARKER).exists():
            shutil.rmtree(self.directory, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - started

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop_at_exit(self) -> None:
        """Stop the cluster when the interpreter exits, if nothing stopped it before."""
        atexit.register(self.stop)

    # ------------------------------------------------------------------ failures

    def node(self, i: int) -> ClusterNode:
        """Node ``i``, 1-based."""
        if not 1 <= i <= len(self.nodes):
            raise ClusterError(f"no node {i}: the cluster has nodes 1 to {len(self.nodes)}")
        return self.nodes[i - 1]

    def running(self, i: int) -> bool:
        """Node ``i``'s VM is alive and its AMQP port accepts connections."""
        node = self.node(i)
        return bool(_node_pids(node)) and _answers(node.amqp)

    def pids(self, i: int) -> list[int]:
        """The pids of node ``i``'s beam.smp (none when it is down)."""
        return _node_pids(self.node(i))

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``'s beam.smp (a crash: no shutdown, no goodbye to its peers)."""
        node = self.node(i)
        pids = _node_pids(node)
        if not pids:
            raise ClusterError(f"{node.name} is not running: nothing to kill")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _wait_for(lambda: not _node_pids(node), 10):
            raise ClusterError(f"{node.name} still runs 10 s after SIGKILL")
        log.info("%s killed (pids %s)", node.name, pids)

    def restart(self, i: int) -> None:
        """Boot node ``i`` again on its data (stopping it first if it runs); return once it
        runs and the cluster counts it in ``running_nodes`` again."""
        node = self.node(i)
        started = time.monotonic()
        if _node_pids(node):
            self._stop_node(node)
        self._launch(node)
        self._await_startup(node)
        self._await_members([node])
        log.info("%s restarted in %.1f s", node.name, time.monotonic() - started)

    def ensure_all_running(self) -> None:
        """Restart every node that is down, so that one test's kill does not break the next."""
        down = [n for n in self.nodes if not self.running(n.index)]
        if down:
            _on_all(lambda n: self.restart(n.index), down)

    def running_nodes(self) -> list[str]:
        """The cluster's ``running_nodes``, as a running node sees them (sorted)."""
        node = self._any_running()
        status = json.loads(self._ctl(node, "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    # ------------------------------------------------------------------ clients

    def amqp_urls(
        self, user: str = "guest", password: str = "guest", vhost: str = "/"
    ) -> list[str]:
        """One AMQP URL per node, in node order."""
        login = f"{_quote(user)}:{_quote(password)}"
        return [f"amqp://{login}@127.0.0.1:{n.amqp}/{_quote(vhost)}" for n in self.nodes]

    def management_urls(self, user: str = "guest", password: str = "guest") -> list[str]:
        """One management API base URL per node, in node order, the login in it."""
        login = f"{_quote(user)}:{_quote(password)}"
        return [f"http://{login}@127.0.0.1:{n.management}" for n in self.nodes]

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
        """Call the management API (``/api/{path}``) as guest, on the first node that answers."""
        data = None if body is None else json.dumps(body).encode()
        token = base64.b64encode(b"guest:guest").decode()
        failures = []
        for node in self.nodes:
            if not _node_pids(node):
                continue
            request = urllib.request.Request(
                f"http://127.0.0.1:{node.management}/api/{path}", data=data, method=method
            )
            request.add_header("Authorization", f"Basic {token}")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    answer = response.read()
            except urllib.error.HTTPError:
                raise  # the API answered: its verdict stands
            except OSError as exc:
                failures.append(f"{node.name}: {exc}")
                continue
            return json.loads(answer) if answer else None
        raise ClusterError(f"no node's management API answered {path}: {failures or 'all down'}")

    def create_vhost(self, vhost: str, description: str = "") -> None:
        """Create ``vhost`` with all permissions for guest."""
        quoted = _quote(vhost)
        self.api(f"vhosts/{quoted}", "PUT", {"description": description})
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        self.api(f"permissions/{quoted}/guest", "PUT", everything)

    def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` with everything in it (a vhost already gone is fine)."""
        try:
            self.api(f"vhosts/{_quote(vhost)}", "DELETE", timeout=120)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def queue_nodes(self, vhost: str, prefix: str = "") -> dict[str, str]:
        """Queue name -> the node its leader runs on, for the queues of ``vhost`` whose names
        start with ``prefix`` (classic queues report ``node``, quorum queues ``leader``)."""
        queues = self.api(f"queues/{_quote(vhost)}?columns=name,node,leader")
        return {
            q["name"]: q.get("leader") or q["node"] for q in queues if q["name"].startswith(prefix)
        }

    # ------------------------------------------------------------------ the nodes' processes

    def _node_dir(self, node: ClusterNode) -> Path:
        return self.directory / node.short

    def _seen_by_node(self, path: Path) -> str:
        """``path`` as the nodes see it: inside the root, if they run in one."""
        if self.root is None:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    def _owner(self) -> tuple[int, int]:
        """uid and gid of the user the nodes run as."""
        if self.root is not None:
            owner = _root_user(self.root)
            if owner is None:
                raise ClusterError(f"no {RUN_AS} user in {self.root}/etc/passwd")
            return owner
        entry = pwd.getpwnam(RUN_AS)
        return entry.pw_uid, entry.pw_gid

    def _as_rabbitmq(self, command: list[str]) -> list[str]:
        """``command``, run as the rabbitmq user (of the root, in it, if there is one)."""
        if self.root is not None:
            return ["chroot", str(self.root), "runuser", "-u", RUN_AS, "--", *command]
        return _as_rabbitmq(command)

    def _home(self) -> str:
        """The rabbitmq user's home (its Erlang cookie) as this process sees it: the cwd of
        the node commands."""
        if self.root is None:
            return RABBIT_HOME
        return str(self.root / RABBIT_HOME.lstrip("/"))

    def _ctl_env(self) -> dict[str, str]:
        env = _base_env()
        # rabbitmqctl listens for distribution on a port in this range while it runs; the
        # default (35672-35682) is shared with every other rabbitmqctl on the machine
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(self.port_base + 30100)
        env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(self.port_base + 30110)
        return env

    def _node_env(self, node: ClusterNode) -> dict[str, str]:
        d = Path(self._seen_by_node(self._node_dir(node)))
        env = self._ctl_env()
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp),
            RABBITMQ_DIST_PORT=str(node.dist),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            ERL_CRASH_DUMP=str(d / "log" / "erl_crash.dump"),  # not in rabbitmq's home
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _ctl(self, node: ClusterNode, *args: str, timeout: float = 120) -> str:
        """rabbitmqctl against ``node`` (as rabbitmq, so that it reads the shared cookie)."""
        command = self._as_rabbitmq([str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args])
        try:
            done = subprocess.run(
                command,
                env=self._ctl_env(),
                cwd=self._home(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{args[0]} on {node.name}: no answer in {timeout:g} s") from exc
        if done.returncode != 0:
            raise ClusterError(f"{args[0]} on {node.name} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _write_files(self, node: ClusterNode) -> None:
        d = self._node_dir(node)
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text(PLUGINS)
        config = (
            f"listeners.tcp.default = 127.0.0.1:{node.amqp}\n"
            f"management.tcp.port = {node.management}\n"
            "management.tcp.ip = 127.0.0.1\n"
            f"prometheus.tcp.port = {node.prometheus}\n"
            "prometheus.tcp.ip = 127.0.0.1\n"
        )
        if _server_version(self.root) >= (4,):
            # global QoS denied, as RabbitMQ 4.3 does by default (3.x does not know the key: it
            # would not boot). Not transient non-exclusive queues: with that denied, a 4.0.5
            # node joining the cluster fails start_app (failed_to_deny_deprecated_features,
            # checked while Mnesia loads); the single 4.0.5 node of .ci/rabbitmq4.sh denies it.
            config += "deprecated_features.permit.global_qos = false\n"
        (d / "rabbitmq.conf").write_text(config)

    def _launch(self, node: ClusterNode) -> None:
        server = RABBIT_BIN / "rabbitmq-server"
        # the machine's broker needed 20,000 open files for many queues; so may these
        shell = f"ulimit -n 20000 2>/dev/null || true; exec {server} -detached"
        with open(self._node_dir(node) / "log" / "startup.log", "ab") as out:
            subprocess.run(
                self._as_rabbitmq(["sh", "-c", shell]),
                env=self._node_env(node),
                cwd=self._home(),
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=60,
            )

    def _await_startup(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        wait = str(int(START_TIMEOUT))
        while True:
            try:
                self._ctl(node, "await_startup", "--timeout", wait, timeout=START_TIMEOUT + 30)
                return
            except ClusterError:
                # not yet registered with epmd (see the module's docstring), or dead
                if time.monotonic() > deadline or not _node_pids(node):
                    raise
                time.sleep(0.5)

    def _join(self, followers: list[ClusterNode], leader: ClusterNode) -> None:
        if not followers:
            return
        _on_all(lambda n: self._ctl(n, "stop_app"), followers)
        _on_all(lambda n: self._ctl(n, "reset"), followers)
        for node in followers:
            self._ctl(node, "join_cluster", leader.name)
        _on_all(lambda n: self._ctl(n, "start_app"), followers)

    def _await_members(self, nodes: list[ClusterNode], timeout: float = 60) -> None:
        want = {n.name for n in nodes}
        seen: list[str] = []

        def members() -> bool:
            nonlocal seen
            seen = self.running_nodes()
            return want <= set(seen)

        if not _wait_for(members, timeout, interval=1.0):
            raise ClusterError(f"{sorted(want)} not in running_nodes {seen} after {timeout} s")

    def _stop_node(self, node: ClusterNode) -> None:
        with contextlib.suppress(ClusterError):
            self._ctl(node, "shutdown", timeout=60)  # returns once the VM has exited
        if _wait_for(lambda: not _node_pids(node), 5):
            return
        for pid in _node_pids(node):
            log.warning("%s (pid %d) did not stop: SIGKILL", node.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _node_pids(node), 10)

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if _node_pids(node):
                return node
        raise ClusterError(f"{self}: no node is running")

    def _clear_leftovers(self) -> None:
        marker = self.directory / MARKER
        if marker.exists():
            with contextlib.suppress(ValueError, OSError):
                owner = json.loads(marker.read_text()).get("pid")
                if isinstance(owner, int) and owner != os.getpid() and process_alive(owner):
                    raise ClusterError(
                        f"{self.directory} is the cluster of process {owner}, still running: "
                        "use another directory and port base"
                    )
        elif self.directory.exists():
            raise ClusterError(f"{self.directory} exists and holds no cluster: will not use it")
        if marker.exists() or any(_node_pids(n) for n in self.nodes):
            log.warning("%s: stopping a cluster left behind by an earlier run", self)
            self.stop()

    def _check_ports_free(self) -> None:
        busy = [p for n in self.nodes for p in n.ports if not _port_free(p)]
        if busy:
            raise ClusterError(
                f"ports {busy} are in use: another cluster or service holds them "
                f"(choose another port base than {self.port_base})"
            )

    def _log_tails(self, lines: int = 15) -> None:
        for node in self.nodes:
            for path in sorted((self._node_dir(node) / "log").glob("*.log")):
                with contextlib.suppress(OSError):
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    log.error("--- %s\n%s", path, "\n".join(tail))


# ---------------------------------------------------------------------- helpers


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _as_rabbitmq(command: list[str]) -> list[str]:
    """``command``, run as the rabbitmq user."""
    if os.geteuid() == pwd.getpwnam(RUN_AS).pw_uid:
        return command
    return ["runuser", "-u", RUN_AS, "--", *command]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env["HOME"] = RABBIT_HOME
    env["LANG"] = env["LC_ALL"] = "C.UTF-8"
    return env


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    if os.geteuid() != 0:
        return
    os.chown(path, *owner)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *owner)


def _root_user(root: Path) -> tuple[int, int] | None:
    """uid and gid of the rabbitmq user of the Debian root ``root`` (its own /etc/passwd:
    the same numbers may be another user on this machine)."""
    with contextlib.suppress(OSError):
        for line in (root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[0] == RUN_AS:
                return int(fields[2]), int(fields[3])
    return None


def _server_version(root: Path | None) -> tuple[int, ...]:
    """The version of the RabbitMQ installed in ``root`` (or on this machine), from the name
    of its directory (``rabbitmq_server-4.0.5``); () if none is found."""
    lib = Path(root or "/") / "usr" / "lib" / "rabbitmq" / "lib"
    versions = []
    for path in lib.glob("rabbitmq_server-*"):
        with contextlib.suppress(ValueError):
            versions.append(tuple(int(p) for p in path.name.partition("-")[2].split(".")))
    return max(versions, default=())


def _prepare_root(root: Path) -> None:
    """Mount proc, dev and sys in ``root`` (where they are not) and give its rabbitmq user an
    Erlang cookie: nodes booting at once would each write one, and differ."""
    for name, mount in (
        ("proc", ["-t", "proc", "proc"]),
        ("dev", ["--bind", "/dev"]),
        ("sys", ["--bind", "/sys"]),
    ):
        target = root / name
        if not os.path.ismount(target):
            done = subprocess.run(["mount", *mount, str(target)], capture_output=True, text=True)
            if done.returncode != 0:
                raise ClusterError(f"cannot mount {target}: {done.stderr.strip()}")
    cookie = root / RABBIT_HOME.lstrip("/") / ".erlang.cookie"
    owner = _root_user(root)
    if not cookie.exists() and owner is not None:
        cookie.parent.mkdir(parents=True, exist_ok=True)
        cookie.write_text(uuid.uuid4().hex.upper())
        os.chown(cookie, *owner)
        cookie.chmod(0o400)


def _node_pids(node: ClusterNode) -> list[int]:
    """Pids of the beam.smp running ``node``, found by the RABBITMQ_NODENAME it started with."""
    marker = f"RABBITMQ_NODENAME={node.name}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "exe").resolve().name.startswith("beam"):
                continue
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile, a zombie, or not ours to read
    return pids


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            # as servers do: a port held only by TIME_WAIT connections is free to listen on
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 2):
            return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _on_all(action: Callable[[_T], object], items: Iterable[_T]) -> None:
    """``action`` on every item in parallel (nodes boot and stop independently)."""
    items = list(items)
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        list(pool.map(action, items))


# ---------------------------------------------------------------------- CLI


async def _amqp_check(cluster: RabbitCluster) -> None:
    import aio_pika

    for node, url in zip(cluster.nodes, cluster.amqp_urls(), strict=True):
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            name = f"rabbit-cluster-check-{node.short}"
            queue = await channel.declare_queue(name, exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
            message = await queue.get(timeout=5)
            await message.ack()
            await queue.delete()
        log.info("%s: declare/publish/get/delete on %d ok", node.name, node.amqp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rabbitkeys.tools.rabbit_cluster",
        description="A RabbitMQ cluster on localhost, beside the machine's broker (run as root "
        "or rabbitmq). start: boot and cluster the nodes, leave them up; stop: stop them and "
        "remove their directory; check: start, use each node over AMQP, stop.",
    )
    parser.add_argument("command", choices=["start", "stop", "check"])
    parser.add_argument("--port-base", type=int, default=5680, help="default 5680")
    parser.add_argument("--nodes", type=int, default=3, help="default 3")
    parser.add_argument(
        "--dir",
        type=Path,
        help="the nodes' files (default /tmp/rabbitkeys-cluster-PORT_BASE, in the root if --root)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="run the RabbitMQ installed in this Debian root, with chroot (e.g. CI's 4.0.5: "
        ".ci/rabbitmq4.sh root makes /opt/rabbitkeys-rabbitmq4-trixie); default: the machine's",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%X")
    directory = args.dir or Path(args.root or "/") / f"tmp/rabbitkeys-cluster-{args.port_base}"
    try:
        cluster = RabbitCluster(
            directory, port_base=args.port_base, nodes=args.nodes, root=args.root
        )
        if args.command == "stop":
            cluster.stop()
            log.info("stopped, %s removed, in %.1f s", directory, cluster.timings["stop"])
            return 0
        cluster.start()
        if args.command == "start":
            for node, url in zip(cluster.nodes, cluster.amqp_urls(), strict=True):
                print(f"{node.name}: {url}  management {node.management}  dist {node.dist}")
            return 0
        try:
            asyncio.run(_amqp_check(cluster))
        finally:
            cluster.stop()
        log.info("check done; stop took %.1f s", cluster.timings["stop"])
        return 0
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The three-node cluster harness itself (rabbitkeys.tools.rabbit_cluster): clustered nodes,
queue placement as the management API reports it, a node killed and brought back with its
durable queue, and the ways it refuses to start.

All but the refusals share the session's cluster (the ``cluster`` fixture); the leftover test
runs a one-node cluster of its own, on the session's port base + 10.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from rabbitkeys.tools.rabbit_cluster import MARKER, ClusterError, RabbitCluster

from ..conftest import ClusterUnderTest
from ..support import skip_or_fail


async def _round_trip(url: str, name: str) -> None:
    """Declare, publish to (confirmed), get from and delete a queue through ``url``."""
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=name)
        message = await queue.get(timeout=5)
        assert message.body == b"ping"
        await message.ack()
        await queue.delete()


def _placement(cluster: ClusterUnderTest, prefix: str, count: int) -> dict[str, str]:
    """queue_nodes, once all ``count`` queues are listed with a node (the listing of a quorum
    queue can lag its declaration)."""
    for _ in range(100):
        found = cluster.cluster.queue_nodes(cluster.vhost, prefix)
        if len(found) == count and all(found.values()):
            return found
        time.sleep(0.1)
    return found


def test_three_nodes_clustered(cluster: ClusterUnderTest) -> None:
    rabbit = cluster.cluster
    assert rabbit.running_nodes() == sorted(n.name for n in rabbit.nodes)
    assert [rabbit.running(n.index) for n in rabbit.nodes] == [True, True, True]
    assert len({n.amqp for n in rabbit.nodes}) == 3
    assert cluster.amqp_urls[1].endswith(f":{rabbit.nodes[1].amqp}/{cluster.vhost}")


async def test_queue_declared_via_a_node_lives_there(cluster: ClusterUnderTest) -> None:
    node2 = cluster.cluster.nodes[1]
    async with await aio_pika.connect(cluster.amqp_urls[1], timeout=10) as connection:
        channel = await connection.channel()
        await channel.declare_queue("placed.classic", durable=True)
        await channel.declare_queue(
            "placed.quorum", durable=True, arguments={"x-queue-type": "quorum"}
        )
    placement = _placement(cluster, "placed.", 2)
    assert placement == {"placed.classic": node2.name, "placed.quorum": node2.name}


async def test_killed_node_comes_back_with_its_durable_queue(cluster: ClusterUnderTest) -> None:
    rabbit = cluster.cluster
    node3 = rabbit.nodes[2]
    async with await aio_pika.connect(cluster.amqp_urls[2], timeout=10) as connection:
        channel = await connection.channel()  # publisher confirms: each publish is on disk
        await channel.declare_queue("kept", durable=True)
        for n in range(3):
            message = aio_pika.Message(str(n).encode(), delivery_mode=2)
            await channel.default_exchange.publish(message, routing_key="kept")

    await asyncio.to_thread(rabbit.kill, 3)
    assert not rabbit.running(3)
    assert node3.name not in rabbit.running_nodes()
    for i, url in enumerate(cluster.amqp_urls[:2], 1):
        await _round_trip(url, f"alive-{i}")

    await asyncio.to_thread(rabbit.restart, 3)
    assert rabbit.running(3)
    assert rabbit.running_nodes() == sorted(n.name for n in rabbit.nodes)
    assert _placement(cluster, "kept", 1) == {"kept": node3.name}
    async with await aio_pika.connect(cluster.amqp_urls[2], timeout=10) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("kept", passive=True)
        bodies = []
        for _ in range(3):
            message = await queue.get(timeout=5)
            bodies.append(message.body)
            await message.ack()
    assert bodies == [b"0", b"1", b"2"]


def test_ensure_all_running_restarts_a_killed_node(cluster: ClusterUnderTest) -> None:
    rabbit = cluster.cluster
    rabbit.kill(1)
    assert not rabbit.running(1)
    rabbit.ensure_all_running()
    assert [rabbit.running(n.index) for n in rabbit.nodes] == [True, True, True]
    assert rabbit.running_nodes() == sorted(n.name for n in rabbit.nodes)


# --------------------------------------------------------------------------- refusals


def _own_port_base() -> int:
    """A port base no other cluster of this session uses: the session's + 10, one node."""
    return int(os.environ.get("RABBITKEYS_TEST_CLUSTER_PORT_BASE", "5680")) + 10


@pytest.fixture
def usable() -> None:
    reason = RabbitCluster.usable()
    if reason is not None:
        skip_or_fail(f"a RabbitMQ cluster cannot run here: {reason}")


def test_ports_of_the_local_broker_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"machine's own broker \[5672"):
        RabbitCluster(tmp_path, port_base=5671)
    with pytest.raises(ClusterError, match="15692"):
        RabbitCluster(tmp_path, port_base=5581)  # prometheus of node 1: 5581 + 10110 + 1


def test_bad_node_numbers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="nodes must be 1 to 9"):
        RabbitCluster(tmp_path, nodes=0)
    with pytest.raises(ClusterError, match="no node 4"):
        RabbitCluster(tmp_path).node(4)


@pytest.mark.usefixtures("usable")
def test_busy_port_is_refused_and_nothing_started(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    rabbit = RabbitCluster(directory, port_base=_own_port_base(), nodes=1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", rabbit.nodes[0].management))
        holder.listen()
        with pytest.raises(ClusterError, match=f"ports \\[{rabbit.nodes[0].management}\\]"):
            rabbit.start()
    assert not directory.exists()
    assert not rabbit.running(1)


@pytest.mark.usefixtures("usable")
def test_foreign_directory_and_live_owner_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a cluster")
    with pytest.raises(ClusterError, match="holds no cluster"):
        RabbitCluster(foreign, port_base=_own_port_base(), nodes=1).start()
    assert (foreign / "notes.txt").exists()

    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / MARKER).write_text(json.dumps({"pid": os.getppid()}))  # alive: our parent
    with pytest.raises(ClusterError, match=f"process {os.getppid()}, still running"):
        RabbitCluster(owned, port_base=_own_port_base(), nodes=1).start()
    assert (owned / MARKER).exists()


@pytest.mark.usefixtures("usable")
def test_kill_of_a_stopped_node_is_refused(tmp_path: Path) -> None:
    rabbit = RabbitCluster(tmp_path / "never", port_base=_own_port_base(), nodes=1)
    with pytest.raises(ClusterError, match="not running"):
        rabbit.kill(1)


@pytest.fixture
def leftover_dir() -> Iterator[Path]:
    directory = Path(f"/tmp/rabbitkeys-test-leftover-{_own_port_base()}")
    yield directory
    RabbitCluster(directory, port_base=_own_port_base(), nodes=1).stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("usable")
def test_leftover_of_a_dead_run_is_stopped_at_start(leftover_dir: Path) -> None:
    first = RabbitCluster(leftover_dir, port_base=_own_port_base(), nodes=1)
    first.start()
    old_pids = first.pids(1)
    # the run that started it dies without stopping it (SIGKILL of pytest): its pid is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    (leftover_dir / MARKER).write_text(json.dumps({"pid": int(dead.stdout)}))

    second = RabbitCluster(leftover_dir, port_base=_own_port_base(), nodes=1)
    second.start()
    assert second.running(1)
    assert not set(old_pids) & set(second.pids(1))
    second.stop()
    assert not leftover_dir.exists()
    assert not second.running(1)

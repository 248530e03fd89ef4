"""The chaos report's judge: a duplicate counts as explained only when its cause is a crash
(a redelivery after its worker's SIGKILL, or the broker restart between the two). Pure tests
of the judge, then the cause itself produced on the real broker: a worker SIGKILLed while it
holds a handled, unacked message (one explained duplicate) or SIGTERMed (none)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rabbitkeys import Publisher, Settings
from rabbitkeys.tools.chaos import ChaosReport, _judge, _Timeline
from rabbitkeys.tools.cluster import LocalCluster
from rabbitkeys.tools.demo import overlapping_handlings, read_records

from ..support import eventually, overlapping

KILLED, STOPPED, OTHER = 101, 102, 103


def record(seq: int, started: float, pid: int, redelivered: bool = False) -> dict[str, Any]:
    return {"key": "k", "publisher": "p", "seq": seq, "started": started, "pid": pid,
            "finished": started + 0.1, "redelivered": redelivered, "body": str(seq)}  # fmt: skip


def judge(records: list[dict[str, Any]], **marks: float) -> ChaosReport:
    timeline = _Timeline(sent=3, names=["k"], marks=dict(marks), killed_pids={KILLED})
    return _judge(ChaosReport(), records, timeline)


def test_a_redelivery_after_its_workers_sigkill_is_an_explained_duplicate() -> None:
    report = judge(
        [record(1, 1.0, KILLED), record(2, 2.0, KILLED), record(2, 3.0, OTHER, True),
         record(3, 4.0, OTHER)],
        worker_kill=2.5,
    )  # fmt: skip
    assert (report.lost, report.duplicates, report.unexplained_duplicates) == (0, 1, 0)
    assert report.order_violations == 0 and report.ok
    assert report.worker_kill_gap == 0.5


def test_a_copy_after_a_graceful_stop_is_unexplained_and_fails_the_run() -> None:
    report = judge(
        [record(1, 1.0, STOPPED), record(2, 2.0, STOPPED), record(2, 3.0, OTHER, True),
         record(3, 4.0, OTHER)]
    )  # fmt: skip
    assert (report.duplicates, report.unexplained_duplicates) == (1, 1)
    assert not report.ok
    assert "1 unexplained" in report.format()


def test_a_copy_that_was_not_redelivered_is_unexplained_even_after_a_kill() -> None:
    # a resend by the publisher, not the broker's redelivery: a crash does not explain it
    report = judge(
        [record(1, 1.0, KILLED), record(1, 3.0, OTHER, redelivered=False), record(2, 4.0, OTHER),
         record(3, 5.0, OTHER)],
        worker_kill=2.0,
    )  # fmt: skip
    assert report.unexplained_duplicates == 1 and not report.ok


def test_a_copy_across_the_broker_restart_is_explained() -> None:
    report = judge(
        [record(1, 1.0, OTHER), record(2, 2.0, OTHER), record(2, 9.0, OTHER),
         record(3, 10.0, OTHER)],
        broker_stop=3.0,
        broker_back=8.0,
    )  # fmt: skip
    assert (report.duplicates, report.unexplained_duplicates) == (1, 0) and report.ok


def test_loss_and_reordering_are_counted() -> None:
    report = judge([record(2, 1.0, OTHER), record(1, 2.0, OTHER)])
    assert (report.lost, report.order_violations) == (1, 1)
    assert not report.ok


def test_handlings_of_one_key_that_overlap_in_time_fail_the_run() -> None:
    report = judge([record(1, 1.0, OTHER), record(2, 1.05, STOPPED), record(3, 2.0, OTHER)])
    assert report.overlaps == 1 and report.order_violations == 0
    assert not report.ok


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.processes
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
async def test_a_worker_stopped_while_it_holds_a_handled_message(
    settings: Settings, tmp_path: Path, stop: str
) -> None:
    """SIGKILL: the message it handled but had not acked is redelivered to the other worker:
    one duplicate, ``redelivered`` and after the killed pid, so explained. SIGTERM: the
    worker finishes and acks before it leaves: no duplicate."""
    env = {"RK_DEMO_DIR": str(tmp_path), "RABBITKEYS_LOG_LEVEL": "WARNING"}
    async with LocalCluster(settings, extra_env=env) as cluster:
        await cluster.start_registry()
        ports = {}  # pid -> metrics port, for its readiness
        for port in free_ports(2):
            worker = await cluster.start_worker("rabbitkeys.tools.demo:app", metrics_port=port)
            ports[worker.pid] = port
        await cluster.wait_for_workers(2)
        async with Publisher(settings) as publisher:
            await publisher.publish("hold-1", b"1")
        await eventually(lambda: len(read_records(tmp_path)) == 1, timeout=30)
        [first] = read_records(tmp_path)
        [holder] = [p for p in cluster.workers if p.pid == first["pid"]]
        if stop == "SIGKILL":
            holder.kill()
            await holder.wait()
            (tmp_path / "release").touch()
            await eventually(lambda: len(read_records(tmp_path)) == 2, timeout=30)
        else:
            stopping = asyncio.create_task(cluster.terminate(holder))
            # its readiness turns 503 once it is draining: it holds the message meanwhile
            await eventually(lambda: not ready(ports[holder.pid]), timeout=30)
            (tmp_path / "release").touch()  # the handler ends; the worker acks and leaves
            assert await stopping == 0
        codes = await cluster.stop_all()  # no handling can come after this
    # every process exited cleanly, but the killed one
    assert sorted(codes) == ([-9, 0, 0] if stop == "SIGKILL" else [0, 0, 0])
    records = read_records(tmp_path)
    killed = {first["pid"]} if stop == "SIGKILL" else set()
    report = _judge(ChaosReport(), records, _Timeline(sent=1, names=["hold-1"], killed_pids=killed))
    assert report.lost == 0 and report.unexplained_duplicates == 0 and report.ok
    if stop == "SIGKILL":
        assert report.duplicates == 1
        assert records[1]["pid"] != first["pid"] and records[1]["redelivered"] is True
    else:
        assert report.duplicates == 0 and len(records) == 1


def test_the_overlap_checks_find_overlaps_and_only_those() -> None:
    """The checks behind "one at a time per key" (in-process intervals and process
    records) must be able to fail."""
    spans = {"a": [(0.0, 1.0), (1.0, 2.0)], "b": [(0.0, 1.0), (0.5, 0.7), (0.9, 1.5)]}
    assert overlapping(spans) == [("b", 0.5, 1.0), ("b", 0.9, 1.0)]
    records = [record(1, 1.0, OTHER), record(2, 1.05, OTHER), record(3, 1.5, OTHER)]
    assert [(key, started) for key, started, _ in overlapping_handlings(records)] == [("k", 1.05)]
    # one after the other, a handling starting as the previous one finishes: no overlap
    assert overlapping_handlings([record(1, 1.0, OTHER), record(2, 1.1, KILLED)]) == []

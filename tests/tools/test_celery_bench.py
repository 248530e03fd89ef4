"""Smoke run of ``rabbitkeys bench --celery``: plain Celery and the bridge run the same jobs,
the bridge keeps every key's order, every job runs exactly once on each side, the report
has its rows, and the run leaves no vhost, Redis list or process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rabbitkeys.tools.bench.celery_side_by_side import (
    CeleryPlan,
    Run,
    _interleaved,
    count_violations,
    run_celery_side_by_side,
)

from ..conftest import Broker
from ..support import make_settings, skip_or_fail

REDIS_URL = os.environ.get("RABBITKEYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


def _import_or_skip(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        skip_or_fail(f"{module} is not installed (pip install celery redis): {exc}")


def _redis() -> Any:
    redis = _import_or_skip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        skip_or_fail(f"no Redis at {REDIS_URL}: {exc}")
    return client


def _children() -> set[int]:
    """This process's live child processes (the bench's workers, had it left any)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def _bench_lists(client: Any) -> list[bytes]:
    return list(client.scan_iter("rabbitkeys-bench-celery:*"))


@pytest.mark.processes
async def test_the_bridge_keeps_order_and_every_job_runs_once(
    amqp_url: str, namespace: str, broker: Broker
) -> None:
    _import_or_skip("celery")
    client = _redis()
    settings = make_settings(amqp_url, namespace)
    plan = CeleryPlan(keys=5, jobs_per_key=10, workers=2, work_ms=1.0, redis_url=REDIS_URL)
    vhosts_before = {v["name"] for v in broker.api("vhosts?columns=name")}
    lists_before = set(_bench_lists(client))
    children_before = _children()
    lines: list[str] = []
    comparison = await run_celery_side_by_side(settings, plan, progress=lines.append)

    for side in (comparison.celery, comparison.bridge):
        assert side.missing == 0 and side.run_twice == 0, side.name
        assert sorted(side.distinct) == sorted(
            (f"key-{k}", seq) for k in range(5) for seq in range(10)
        )
        assert side.jobs_per_second > 0
        assert side.worker_cpu > 0
    assert comparison.bridge.violations == 0
    assert comparison.bridge.registry_cpu is not None
    assert len(comparison.bridge.pids) == len(comparison.celery.pids) == 2
    # each side's runs came from its own worker processes
    assert {run.pid for run in comparison.bridge.runs} <= comparison.bridge.pids
    assert {run.pid for run in comparison.celery.runs} <= comparison.celery.pids
    report = comparison.markdown()
    for row in (
        "order violations per 10,000 jobs",
        "jobs/s",
        "worker CPU ms per job",
        "broker CPU ms per job",
        "publisher CPU ms per job",
        "jobs per AMQP message",
        "jobs not run / run twice (of 50)",
    ):
        assert f"| {row}" in report
    assert "| plain Celery | bridge | bridge / Celery |" in report
    assert len(lines) == 2  # one line per side as it ends
    # nothing left behind: vhosts, Redis lists, processes
    assert {v["name"] for v in broker.api("vhosts?columns=name")} <= vhosts_before
    assert set(_bench_lists(client)) <= lists_before
    assert _children() <= children_before


def test_violations_count_jobs_that_overtook_or_overlapped_an_earlier_one() -> None:
    runs = [
        Run("a", 0, 1, 0.0, 1.0),
        Run("a", 1, 1, 1.0, 2.0),  # after 0: fine
        Run("a", 3, 2, 1.5, 1.8),  # before 2 ended (overtook it)
        Run("a", 2, 1, 2.0, 3.0),  # after 1, though 3 ran already: fine, 3 is the violation
        Run("b", 0, 1, 0.0, 1.0),
        Run("b", 1, 2, 0.5, 1.5),  # beside 0
    ]
    assert count_violations(runs) == 2


def test_jobs_are_published_in_order_per_key_keys_interleaved() -> None:
    plan = CeleryPlan(keys=2, jobs_per_key=5, burst=2)
    assert list(_interleaved(plan)) == [
        ("key-0", 0), ("key-0", 1), ("key-1", 0), ("key-1", 1),
        ("key-0", 2), ("key-0", 3), ("key-1", 2), ("key-1", 3),
        ("key-0", 4), ("key-1", 4),
    ]  # fmt: skip
    assert [seq for _, seq in _interleaved(CeleryPlan(keys=2, jobs_per_key=2))] == [0, 0, 1, 1]


def test_the_cli_refuses_celery_with_transient_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rabbitkeys", "bench", "--celery", "--transient"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--transient" in done.stderr and "Traceback" not in done.stderr

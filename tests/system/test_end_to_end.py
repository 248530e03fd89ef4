"""The whole system as users run it: registry and workers started through the CLI as
separate processes, a Publisher in the test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rabbitkeys import Publisher, Settings
from rabbitkeys.tools.cluster import LocalCluster
from rabbitkeys.tools.demo import check_order, overlapping_handlings, read_records

from ..support import eventually

KEYS = 200
MESSAGES = 20
SLOW_KEYS = 4
SLOW_SECONDS = 0.3

pytestmark = [pytest.mark.processes, pytest.mark.slow]


async def test_cli_processes_keep_per_key_order_and_spread_keys(
    settings: Settings, tmp_path: Path
) -> None:
    names = [f"slow-{i}" for i in range(SLOW_KEYS)] + [f"post-{i}" for i in range(KEYS - SLOW_KEYS)]
    env = {"RK_DEMO_DIR": str(tmp_path), "RK_DEMO_SLOW_SECONDS": str(SLOW_SECONDS)}
    async with LocalCluster(settings, extra_env=env) as cluster:
        await cluster.start_registry()
        for _ in range(3):
            await cluster.start_worker("rabbitkeys.tools.demo:app")
        await cluster.wait_for_workers(3)

        async with Publisher(settings) as publisher:
            await asyncio.gather(
                *(
                    publisher.publish(name, f"{n}".encode())
                    for n in range(1, MESSAGES + 1)
                    for name in names
                )
            )
        await eventually(lambda: len(read_records(tmp_path)) >= KEYS * MESSAGES, timeout=60)
        exit_codes = await cluster.stop_all()

    records = read_records(tmp_path)
    handled = {(r["key"], int(r["body"])) for r in records}
    assert handled == {(name, n) for name in names for n in range(1, MESSAGES + 1)}
    # per key, sequence numbers (which follow the publish calls) in handling order
    order = check_order(records)
    assert all(len(order[name]) == MESSAGES for name in names)
    assert all(order[name] == sorted(order[name]) for name in names)
    # graceful stop hands nothing twice
    assert len(records) == KEYS * MESSAGES
    workers_used = {r["pid"] for r in records}
    assert len(workers_used) > 1
    # one at a time per key: no two handlings of a key overlapped in time
    assert overlapping_handlings(records) == []
    # Slow keys do not hold up others: while a slow handling ran, the same worker handled
    # fast keys (a guarantee of concurrency across keys, unlike a comparison of speeds).
    slow = [r for r in records if r["key"].startswith("slow-")]
    alongside = [
        r
        for r in records
        if r["key"].startswith("post-")
        and any(s["pid"] == r["pid"] and s["started"] < r["started"] < s["finished"] for s in slow)
    ]
    assert alongside
    fast_done = max(r["finished"] for r in records if r["key"].startswith("post-"))
    slow_done = max(r["finished"] for r in records if r["key"].startswith("slow-"))
    first = min(r["started"] for r in records)
    print(
        f"fast keys done after {fast_done - first:.2f}s, slow keys after {slow_done - first:.2f}s;"
        f" {len(alongside)} fast handlings started during a slow one on the same worker"
    )
    assert exit_codes == [0, 0, 0, 0]

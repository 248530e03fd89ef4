"""``rabbitkeys demo``: a registry, workers and a publisher, showing per-key order and spread.

``app`` here is the public demo app, ``rabbitkeys worker rabbitkeys.tools.demo:app``: what the
images and manifests in ``deploy/`` run until you give them your own app. Each message it
handles is appended, as a JSON line, to a file per worker process in ``$RK_DEMO_DIR`` (which
must be set); keys starting with ``slow-`` sleep ``$RK_DEMO_SLOW_SECONDS`` (default 0.2 s) per
message; keys starting with ``hold-`` are recorded, then held (not acked) until a file named
``release`` appears in ``$RK_DEMO_DIR``: the tests use them to kill or stop a worker while it
holds a handled message.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .._publisher.publisher import Publisher
from .._settings import Settings
from .._worker.app import App, Message
from .cluster import LocalCluster
from .namespace import remove_namespace

__all__ = ["app", "check_order", "overlapping_handlings", "read_records", "run_demo"]

app = App()


@app.handler()
async def record(message: Message) -> None:
    started = time.time()
    if message.key.startswith("slow-"):
        await asyncio.sleep(float(os.environ.get("RK_DEMO_SLOW_SECONDS", "0.2")))
    line = json.dumps(
        {
            "key": message.key,
            "seq": message.sequence,
            "publisher": message.publisher_id,
            "body": message.body.decode(),
            "pid": os.getpid(),
            "started": started,
            "finished": time.time(),
            "redelivered": message.redelivered,
        }
    )
    # one short line to a local file: not worth a thread
    path = Path(os.environ["RK_DEMO_DIR"]) / f"{os.getpid()}.jsonl"
    with open(path, "a") as output:  # noqa: ASYNC230
        output.write(line + "\n")
    if message.key.startswith("hold-"):
        while not (path.parent / "release").exists():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def read_records(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def check_order(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per key, the publisher's sequence numbers in handling order (first handling of each
    message). They grow with the publish calls, so in order means each list is increasing."""
    first_seen: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple[str, str, int]] = set()
    for record in sorted(records, key=lambda r: r["started"]):
        ident = (record["key"], record["publisher"], record["seq"])
        if ident not in seen:
            seen.add(ident)
            first_seen[record["key"]].append(record["seq"])
    return first_seen


def overlapping_handlings(records: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Handlings of one key that overlapped in time: (key, when the later one started, when
    the earlier one finished). One at a time per key means none, across workers too (the
    records' times are the host's clock, shared by every process on it)."""
    found = []
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    for key, handlings in by_key.items():
        handlings.sort(key=lambda r: r["started"])
        busy_until = float("-inf")
        for record in handlings:
            if record["started"] < busy_until:
                found.append((key, record["started"], busy_until))
            busy_until = max(busy_until, record["finished"])
    return found


async def run_demo(settings: Settings, *, keys: int, messages: int, workers: int) -> int:
    namespace = f"{settings.namespace}-demo-{uuid.uuid4().hex[:6]}"
    # its key queues are not retired by anyone once the demo ends: let them expire soon
    demo_settings = settings.model_copy(update={"namespace": namespace, "key_queue_expires": 60.0})
    slow_keys = max(1, keys // 15)
    names = [f"slow-{i}" for i in range(slow_keys)] + [f"post-{i}" for i in range(keys - slow_keys)]
    with tempfile.TemporaryDirectory(prefix="rabbitkeys-demo-") as directory:
        # the demo prints its own summary; the processes only speak up when something is wrong
        env = {"RK_DEMO_DIR": directory, "RABBITKEYS_LOG_LEVEL": "WARNING"}
        try:
            async with LocalCluster(demo_settings, extra_env=env) as cluster:
                print(f"namespace {namespace}: starting a registry and {workers} workers ...")
                await cluster.start_registry()
                for _ in range(workers):
                    await cluster.start_worker("rabbitkeys.tools.demo:app")
                await cluster.wait_for_workers(workers)
                print(f"publishing {keys} keys x {messages} messages ({slow_keys} slow keys) ...")
                started = time.monotonic()
                async with Publisher(demo_settings) as publisher:
                    await asyncio.gather(
                        *(
                            publisher.publish(name, f"comment {n} of {name}".encode())
                            for n in range(1, messages + 1)
                            for name in names
                        )
                    )
                total = keys * messages
                while len(read_records(Path(directory))) < total:
                    if time.monotonic() - started > 120:
                        print("timed out waiting for the workers")
                        return 1
                    await asyncio.sleep(0.2)
                records = read_records(Path(directory))
        finally:
            await remove_namespace(demo_settings)
        return _report(records, names, started)


def _report(records: list[dict[str, Any]], names: list[str], started: float) -> int:
    order = check_order(records)
    broken = [key for key, seqs in order.items() if seqs != sorted(seqs)]
    per_worker_keys: dict[int, set[str]] = defaultdict(set)
    per_worker_messages: Counter[int] = Counter()
    for record in records:
        per_worker_keys[record["pid"]].add(record["key"])
        per_worker_messages[record["pid"]] += 1
    fast_done = max(r["finished"] for r in records if not r["key"].startswith("slow-"))
    slow_done = max(r["finished"] for r in records if r["key"].startswith("slow-"))
    first = min(r["started"] for r in records)
    print()
    print(f"{'WORKER PID':>10} {'KEYS':>6} {'MESSAGES':>9}")
    for pid in sorted(per_worker_keys):
        print(f"{pid:>10} {len(per_worker_keys[pid]):>6} {per_worker_messages[pid]:>9}")
    print()
    sample = names[len(names) // 2]
    comments = [
        int(r["body"].split()[1])
        for r in sorted(records, key=lambda r: r["started"])
        if r["key"] == sample
    ]
    print(f"key {sample!r}: comments handled in this order: {comments}")
    print(f"keys handled in publish order: {len(order) - len(broken)}/{len(order)}")
    print(
        f"fast keys all done {fast_done - first:.2f}s after the first message; "
        f"slow keys done after {slow_done - first:.2f}s (they did not hold the others up)"
    )
    return 0 if not broken else 1

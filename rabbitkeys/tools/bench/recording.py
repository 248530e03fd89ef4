"""What a benchmark worker records per handled message, and how the runner reads it back.

Each worker process appends ``key seq published started finished`` lines to its own file
in ``$RK_BENCH_DIR`` (flushed every 0.2 s), so the runner can follow progress and compute
latency and order without any extra broker traffic.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .workloads import SLOW_SECONDS

__all__ = ["HEADER_PUBLISHED", "HEADER_SEQ", "Record", "Recorder", "read_all"]

HEADER_SEQ = "bench-seq"
HEADER_PUBLISHED = "bench-published"


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    seq: int
    published: float
    started: float
    finished: float


class Recorder:
    def __init__(self) -> None:
        directory = Path(os.environ["RK_BENCH_DIR"])
        self._path = directory / f"{os.getpid()}.txt"
        self._slow = frozenset(filter(None, os.environ.get("RK_BENCH_SLOW", "").split(",")))
        # every job awaits this long (an I/O-bound job), slow keys SLOW_SECONDS
        self._work = float(os.environ.get("RK_BENCH_WORK_MS", "1")) / 1000
        self._lines: list[str] = []
        self._flusher: asyncio.Task[None] | None = None

    async def handle(self, key: str, seq: int, published: float) -> None:
        started = time.time()
        await asyncio.sleep(SLOW_SECONDS if key in self._slow else self._work)
        self._lines.append(f"{key} {seq} {published:.6f} {started:.6f} {time.time():.6f}\n")
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(0.2)
        self.flush()
        self._flusher = None

    def flush(self) -> None:
        if self._lines:
            with open(self._path, "a") as output:
                output.writelines(self._lines)
            self._lines.clear()


def read_all(directory: Path) -> list[Record]:
    records = []
    for path in directory.glob("*.txt"):
        for line in path.read_text().splitlines():
            key, seq, published, started, finished = line.split(" ")
            records.append(Record(key, int(seq), float(published), float(started), float(finished)))
    return records


def count_all(directory: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in directory.glob("*.txt"))

"""The keyed workloads the benchmark runs: which key each message goes to, in publish order."""

from __future__ import annotations

import dataclasses
import itertools
import random
import uuid
from dataclasses import dataclass

__all__ = ["WORKLOADS", "Workload", "make_workload"]

#: Handler time of a slow key in the "slow" workload.
SLOW_SECONDS = 0.1


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    #: the key of each message, in publish order
    keys: list[str]
    #: keys whose handler takes SLOW_SECONDS
    slow_keys: frozenset[str]
    #: the keys of the latency phase, published at a fixed rate (same distribution)
    paced_keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def distinct_keys(self) -> int:
        return len(set(self.keys))


def _uniform(messages: int, rng: random.Random) -> Workload:
    keys = [f"u{i}" for i in range(1000)]
    return Workload(
        "uniform", "1,000 keys, uniform", [rng.choice(keys) for _ in range(messages)], frozenset()
    )


def _zipf(messages: int, rng: random.Random) -> Workload:
    keys = [f"z{i}" for i in range(10_000)]
    weights = [1.0 / (rank**1.1) for rank in range(1, len(keys) + 1)]
    cumulative = list(itertools.accumulate(weights))
    chosen = rng.choices(keys, cum_weights=cumulative, k=messages)
    return Workload("zipf", "Zipf(1.1) over 10,000 keys", chosen, frozenset())


def _slow(messages: int, rng: random.Random) -> Workload:
    keys = [f"s{i}" for i in range(1000)]
    slow = frozenset(keys[:10])  # 1 %
    return Workload(
        "slow",
        f"1,000 keys, 1 % slow ({SLOW_SECONDS * 1000:.0f} ms)",
        [rng.choice(keys) for _ in range(messages)],
        slow,
    )


def _churn(messages: int, rng: random.Random) -> Workload:
    return Workload(
        "churn",
        "every message a new key",
        [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(messages)],
        frozenset(),
    )


WORKLOADS = {"uniform": _uniform, "zipf": _zipf, "slow": _slow, "churn": _churn}


def make_workload(name: str, messages: int, paced_messages: int = 0, seed: int = 1) -> Workload:
    """``messages`` published as fast as they are confirmed (throughput), then
    ``paced_messages`` more at a fixed rate (latency, free of queueing behind the first)."""
    workload = WORKLOADS[name](messages, random.Random(seed))
    paced = WORKLOADS[name](paced_messages, random.Random(seed + 1)).keys
    return dataclasses.replace(workload, paced_keys=paced)

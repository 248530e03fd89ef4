"""The keyed workloads the benchmark runs: which key each message goes to, in publish order."""

from __future__ import annotations

import dataclasses
import itertools
import random
import uuid
from dataclasses import dataclass

__all__ = ["COLD_WORKLOADS", "DEFAULT_WORKLOADS", "WORKLOADS", "Workload", "make_workload"]

#: Handler time of a slow key in the "slow" workload.
SLOW_SECONDS = 0.1
#: Messages per key in "bursts" and "interleaved" (--messages 10000: 1,000 keys x 10).
BURST = 10


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


def _burst_keys(messages: int) -> list[str]:
    # each key's BURST messages back to back: b0 x 10, b1 x 10, ...
    return [f"b{i // BURST}" for i in range(messages)]


def _bursts(messages: int, rng: random.Random) -> Workload:
    keys = _burst_keys(messages)
    return Workload(
        "bursts",
        f"{len(set(keys)):,} keys x {BURST}, each key's messages back to back",
        keys,
        frozenset(),
    )


def _new_bursts(messages: int, rng: random.Random) -> Workload:
    # the bursts, measured cold: every key is new when its first message is published
    keys = [f"n{i // BURST}" for i in range(messages)]
    return Workload(
        "new-bursts",
        f"{len(set(keys)):,} new keys x {BURST}, each key's messages back to back",
        keys,
        frozenset(),
    )


def _interleaved(messages: int, rng: random.Random) -> Workload:
    keys = _burst_keys(messages)
    rng.shuffle(keys)
    return Workload(
        "interleaved",
        f"{len(set(keys)):,} keys x {BURST}, in random key order",
        keys,
        frozenset(),
    )


def _slow(messages: int, rng: random.Random) -> Workload:
    # the interleaved messages (same seed, same order) with 1 % of the keys slow, so that
    # the interleaved row is the "without slow keys" of this one
    keys = _interleaved(messages, rng).keys
    distinct = sorted(set(keys), key=lambda key: int(key[1:]))
    slow = frozenset(distinct[: max(1, len(distinct) // 100)])
    return Workload(
        "slow",
        f"interleaved, 1 % of the keys slow ({SLOW_SECONDS * 1000:.0f} ms)",
        keys,
        slow,
    )


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


def _churn(messages: int, rng: random.Random) -> Workload:
    return Workload(
        "churn",
        "every message a new key",
        [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(messages)],
        frozenset(),
    )


WORKLOADS = {
    "bursts": _bursts,
    "new-bursts": _new_bursts,
    "interleaved": _interleaved,
    "slow": _slow,
    "churn": _churn,
    "uniform": _uniform,
    "zipf": _zipf,
}
#: What ``rabbitkeys bench`` runs unless told otherwise (issue 13's rows).
DEFAULT_WORKLOADS = ("bursts", "interleaved", "slow", "churn")
#: Workloads measured cold, without a warm-up message per key: their keys are new.
COLD_WORKLOADS = frozenset({"churn", "new-bursts"})


def make_workload(name: str, messages: int, paced_messages: int = 0, seed: int = 1) -> Workload:
    """``messages`` published as fast as they are confirmed (throughput), then
    ``paced_messages`` more at a fixed rate (latency, free of queueing behind the first)."""
    workload = WORKLOADS[name](messages, random.Random(seed))
    paced = WORKLOADS[name](paced_messages, random.Random(seed + 1)).keys
    if name in _BURSTY:
        paced = _spread(paced, workload.distinct_keys)
    elif name == "new-bursts":  # new keys in the paced phase too, not the fast phase's
        paced = [f"p{key[1:]}" for key in paced]
    return dataclasses.replace(workload, paced_keys=paced)


_BURSTY = frozenset({"bursts", "interleaved", "slow"})


def _spread(keys: list[str], key_count: int) -> list[str]:
    """Fewer paced keys than fast-phase ones, renamed to keys spread evenly over those
    (b0, b5, b10, ... of 1,000): the paced phase meets known keys, and 1 % of them slow."""
    paced_count = len(set(keys))
    step = max(1, key_count // max(1, paced_count))
    return [f"b{int(key[1:]) * step}" for key in keys]

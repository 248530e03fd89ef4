"""The figures of one cluster node's outage in ``rabbitkeys chaos --cluster``.

A node is SIGKILLed while keyed traffic flows and restarted some seconds later. What the
outage does depends on the key queue type: a classic key queue lives on one node, so the keys
whose queues were on the killed node wait for its return while the other keys flow; a quorum
key queue is replicated, elects a new leader and keeps flowing. The figures below say which
happened, for the killed node's keys and for the others separately.

Pure: computed from the handling records (``rabbitkeys.tools.demo:app`` writes them) and the
times of the kill and of the return, so that the judge can be tested without a cluster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KeyGroupFigures",
    "NodeOutage",
    "group_figures",
    "resumed_after",
    "spread",
    "worst_wait",
]


@dataclass
class KeyGroupFigures:
    """One group of keys (those of the killed node, or the others) during the outage."""

    keys: int
    #: handlings that started while the node was down
    handled: int
    #: the longest wait of any key of the group for its next handling, counting the waits
    #: that began during the outage (from the kill, or from a handling before the return)
    worst_gap: float | None


@dataclass
class NodeOutage:
    """What the SIGKILL of one node and its restart did to the keys."""

    node: str
    queue_type: str
    #: key queues per node just before the kill (quorum: the node of each queue's leader)
    queues_per_node: dict[str, int]
    #: seconds from the SIGKILL until the restarted node was back in the cluster
    outage: float
    killed_node_keys: KeyGroupFigures
    other_keys: KeyGroupFigures
    #: seconds from the node's return until every one of its keys was handled again (worst
    #: key); about 0 when they flowed during the outage
    resumed_after_return: float | None

    @property
    def flowed_during_outage(self) -> bool:
        """The killed node's keys were handled while it was down, none waiting for it as
        long as half the outage (quorum); False when they waited for its return (classic:
        what a worker held when the node died may still be handled just after the kill, so
        a handling during the outage alone does not tell)."""
        figures = self.killed_node_keys
        return (
            figures.handled > 0
            and figures.worst_gap is not None
            and figures.worst_gap < self.outage / 2
        )

    def format(self) -> list[str]:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}s"

        per_node = sorted(self.queues_per_node.items())
        queues = ", ".join(f"{node.partition('@')[0]} {count}" for node, count in per_node)
        killed, other = self.killed_node_keys, self.other_keys
        return [
            f"node outage       {self.node} down {self.outage:.2f}s ({self.queue_type} key queues)",
            f"  key queues      {queues}  (per node, before the kill)",
            f"  killed node's   {killed.keys} keys: {killed.handled} handled while down, "
            f"worst gap {seconds(killed.worst_gap)}",
            f"  other keys      {other.keys} keys: {other.handled} handled while down, "
            f"worst gap {seconds(other.worst_gap)}",
            f"  killed node's keys flowed during the outage: "
            f"{'yes' if self.flowed_during_outage else 'no'}; all handled again "
            f"{seconds(self.resumed_after_return)} after its return",
        ]


def spread(queue_nodes: Mapping[str, str], nodes: Iterable[str] = ()) -> dict[str, int]:
    """Queues per node, from ``{queue: node}``; each of ``nodes`` listed, holding none too."""
    counts = Counter(queue_nodes.values())
    return {node: counts[node] for node in sorted({*nodes, *counts})}


def worst_wait(times: Iterable[float], down: float, back: float) -> float | None:
    """The longest wait for a next handling that began during [down, back): from ``down``
    itself, or from a handling in between. None when nothing was handled after ``down``
    (the key's traffic had ended)."""
    after = sorted(t for t in times if t >= down)
    waits = []
    start = down
    for t in after:
        if start >= back:
            break
        waits.append(t - start)
        start = t
    return max(waits) if waits else None


def group_figures(
    by_key: Mapping[str, list[dict[str, Any]]], keys: Iterable[str], down: float, back: float
) -> KeyGroupFigures:
    """The figures of ``keys`` over the outage [down, back) from each key's records."""
    keys = list(keys)
    handled = 0
    waits = []
    for key in keys:
        times = [r["started"] for r in by_key.get(key, ())]
        handled += sum(1 for t in times if down <= t < back)
        wait = worst_wait(times, down, back)
        if wait is not None:
            waits.append(wait)
    return KeyGroupFigures(len(keys), handled, max(waits) if waits else None)


def resumed_after(
    by_key: Mapping[str, list[dict[str, Any]]], keys: Iterable[str], back: float
) -> float | None:
    """Seconds from ``back`` until every key of ``keys`` had a handling at or after it (the
    worst key); None when none of them was handled after it."""
    firsts = []
    for key in keys:
        after = [r["started"] for r in by_key.get(key, ()) if r["started"] >= back]
        if after:
            firsts.append(min(after) - back)
    return max(firsts) if firsts else None

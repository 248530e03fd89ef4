"""Which messages of a key a worker has handled, by publisher and sequence number.

A publisher numbers its messages per key. After a lost connection it sends unconfirmed
messages again, some of which the broker may already have had: the copy carries the same
publisher id and sequence number, and is dropped here. A lower sequence number that was *not*
seen is no copy: it is handled (never lost) and counted as an order violation.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from enum import Enum

__all__ = ["SequenceHistory", "Verdict"]

# Per key: how many publishers and how many recent sequence numbers of each to remember.
_MAX_PUBLISHERS = 64
_MAX_SEQUENCES = 1024


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"


class _Publisher:
    __slots__ = ("highest", "recent", "recent_set")

    def __init__(self) -> None:
        self.highest = 0
        self.recent: deque[int] = deque()
        self.recent_set: set[int] = set()


class SequenceHistory:
    """The recent sequence numbers handled for one key, per publisher."""

    def __init__(self) -> None:
        self._publishers: OrderedDict[str, _Publisher] = OrderedDict()

    def __bool__(self) -> bool:
        """Whether any job was recorded."""
        return bool(self._publishers)

    def check(self, publisher: str, sequence: int) -> Verdict:
        seen = self._publishers.get(publisher)
        if seen is None or sequence > seen.highest:
            return Verdict.NEW
        if sequence in seen.recent_set:
            return Verdict.DUPLICATE
        return Verdict.OUT_OF_ORDER

    def record(self, publisher: str, sequence: int) -> None:
        seen = self._publishers.get(publisher)
        if seen is None:
            seen = self._publishers[publisher] = _Publisher()
            if len(self._publishers) > _MAX_PUBLISHERS:
                self._publishers.popitem(last=False)
        else:
            self._publishers.move_to_end(publisher)
        if sequence > seen.highest:
            seen.highest = sequence
        seen.recent.append(sequence)
        seen.recent_set.add(sequence)
        if len(seen.recent) > _MAX_SEQUENCES:
            seen.recent_set.discard(seen.recent.popleft())

"""Room: first-come, first-served admission under two bounds, a count and a size.

What a :class:`~rabbitkeys.Publisher` holds (messages waiting to be sent or for their
confirm) is bounded by ``max_pending_messages`` and ``max_pending_bytes``. A publish that
finds no room waits in line; room that frees up goes to the oldest waiter first, and a
later, smaller one never jumps ahead of it, so waiting callers are admitted in call order
(what per-key order needs). Pure and synchronous: the publisher owns the event loop side.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Room"]

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Waiter(Generic[T]):
    item: T | None
    size: int


class Room(Generic[T]):
    """Admits items while fewer than ``max_items`` and at most ``max_bytes`` are held.

    :meth:`ask` admits an item at once if it fits and nobody waits, else queues it and
    calls ``grant(item)`` when its turn comes. :meth:`give_back` returns an admitted item's
    room; :meth:`withdraw` takes a waiting item out of the line.
    """

    def __init__(self, max_items: int, max_bytes: int, grant: Callable[[T], None]) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("a room needs space for at least one item and one byte")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._grant = grant
        #: what admitted items hold now
        self.items = 0
        self.bytes = 0
        self._line: deque[_Waiter[T]] = deque()
        self._waiting: dict[T, _Waiter[T]] = {}

    @property
    def waiting(self) -> int:
        """Items in line for room."""
        return len(self._waiting)

    def ask(self, item: T, size: int) -> bool:
        """Admit ``item`` (True), or put it in line (False; ``grant`` is called later).

        ``size`` must not exceed ``max_bytes``: such an item could never be admitted."""
        if size > self.max_bytes:
            raise ValueError(f"an item of {size} bytes never fits in {self.max_bytes}")
        if not self._waiting and self._fits(size):
            self._take(size)
            return True
        waiter = _Waiter(item, size)
        self._line.append(waiter)
        self._waiting[item] = waiter
        return False

    def withdraw(self, item: T) -> bool:
        """Take ``item`` out of the line; False if it was not waiting."""
        waiter = self._waiting.pop(item, None)
        if waiter is None:
            return False
        waiter.item = None  # a husk until it reaches the front (or the line is compacted)
        if len(self._line) > 2 * len(self._waiting) + 16:
            self._line = deque(w for w in self._line if w.item is not None)
        self._admit_waiters()  # the one behind it may fit where it did not
        return True

    def give_back(self, size: int) -> None:
        """An admitted item of ``size`` bytes is gone; admit waiters that now fit."""
        self.items -= 1
        self.bytes -= size
        assert self.items >= 0 and self.bytes >= 0, "room given back twice"
        self._admit_waiters()

    def _fits(self, size: int) -> bool:
        return self.items < self.max_items and self.bytes + size <= self.max_bytes

    def _take(self, size: int) -> None:
        self.items += 1
        self.bytes += size

    def _admit_waiters(self) -> None:
        while self._line:
            waiter = self._line[0]
            if waiter.item is None:
                self._line.popleft()
                continue
            if not self._fits(waiter.size):
                return
            self._line.popleft()
            item = waiter.item
            del self._waiting[item]
            self._take(waiter.size)
            self._grant(item)  # may ask, give back or withdraw: the state is consistent here

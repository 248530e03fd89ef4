"""``rabbitkeys keys``: one page of the book's keys, filtered and sorted. Pure: the registry
hands it the book, the reconciler's last listing of the key queues and the clocks, and
sends back what it returns (:class:`~rabbitkeys._wire.protocol.KeysPage`).

A namespace may hold 100,000 keys, and each page is asked for on the registry's event loop:
one pass filters them, and a page is the ``offset + limit`` smallest by the sort
(``heapq.nsmallest``), not a sort of every key (but for a page deep in them, where one
sort is the faster).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .._wire.protocol import MAX_JOB_TYPES, KeyInfo, KeysPage, KeysRequest
from .keybook import RETIRING, Key, KeyBook

__all__ = ["QueueStats", "page"]


@dataclass(frozen=True)
class QueueStats:
    """A key queue as the management API listed it."""

    #: ready + unacked
    messages: int
    #: Unix seconds of its oldest message (``head_message_timestamp``); None when empty, or
    #: when the broker does not tell it
    head_timestamp: int | None


def _matches(book: KeyBook, request: KeysRequest) -> Callable[[Key], bool]:
    """The state filter as one test per key."""
    state = request.state
    if state is None:
        return lambda key: True
    if state == "retiring":
        return lambda key: key.state in RETIRING
    if state == "parked":
        return lambda key: key.parked is not None
    if state == "paused":
        paused_types = book.paused_types
        return lambda key: key.paused or key.ref.job_type in paused_types
    if state == "failing":
        return lambda key: key.failures > 0
    return lambda key: key.state.value == state


# Sort rows: tuples of ints and strings ending with the key id (unique: ties go by it), and
# nothing else, so that the garbage collector stops tracking them; a deep page sorts a row
# per key, and tracked rows woke its full pass, which doubled the time.
_Row = tuple[int | str, ...]
_UNKNOWN_LAST = 2**63
#: a page ending beyond 1/_HEAP_FRACTION of the book's keys is cut from a full sort
_HEAP_FRACTION = 8


def _row_maker(sort: str, stats: Mapping[str, QueueStats] | None) -> Callable[[str, Key], _Row]:
    """A key's row for ``sort``, from its id (the book's table is keyed by it: ``KeyRef.id``
    would build each id again) and its record."""
    if sort == "key":
        return lambda key_id, k: (k.ref.job_type, k.ref.key, key_id)
    known = stats or {}
    if sort == "backlog":  # most first, unknown last

        def backlog(key_id: str, k: Key) -> _Row:
            s = known.get(k.queue)
            return (1, key_id) if s is None else (-s.messages, key_id)

        return backlog

    def age(key_id: str, k: Key) -> _Row:  # the oldest head first, unknown last
        s = known.get(k.queue)
        head = None if s is None else s.head_timestamp
        return (_UNKNOWN_LAST if head is None else head, key_id)

    return age


def page(
    book: KeyBook,
    request: KeysRequest,
    stats: Mapping[str, QueueStats] | None,
    listed_at: float | None,
    now: float,
    wall_now: float,
) -> KeysPage:
    """One page of ``book``'s keys for ``request``. ``stats``: the key queues' last listing
    by queue name (None: none yet); ``listed_at``, ``now``: monotonic; ``wall_now``: Unix
    time (the broker's head timestamps are Unix seconds)."""
    job_type, worker_id = request.job_type, request.worker_id
    matches = _matches(book, request)
    row = _row_maker(request.sort, stats)
    total = 0

    def matching() -> Iterator[_Row]:
        # one pass, counting; rows are made as the heap takes them and dropped when it
        # does not keep them: 100,000 rows kept alive at once would wake the garbage
        # collector's full pass, which costs more than the rest
        nonlocal total
        for key_id, key in book.keys.items():
            if (
                (job_type is None or key.ref.job_type == job_type)
                and (worker_id is None or key.owner == worker_id)
                and matches(key)
            ):
                total += 1
                yield row(key_id, key)

    end = request.offset + request.limit
    if end * _HEAP_FRACTION < len(book.keys):
        first = heapq.nsmallest(end, matching())
    else:  # a deep page (``--all``): one sort beats a heap of most of the rows
        first = sorted(matching())
    chosen = first[request.offset : end]
    return KeysPage(
        keys=[_info(book, book.keys[str(picked[-1])], stats, wall_now) for picked in chosen],
        total=total,
        next_offset=end if end < total else None,
        listed_seconds_ago=(
            max(0.0, round(now - listed_at, 3))
            if listed_at is not None and stats is not None
            else None
        ),
        paused_job_types=sorted(book.paused_types)[:MAX_JOB_TYPES],
    )


def _info(
    book: KeyBook, key: Key, stats: Mapping[str, QueueStats] | None, wall_now: float
) -> KeyInfo:
    listed = stats.get(key.queue) if stats is not None else None
    age = None
    if listed is not None and listed.head_timestamp is not None:
        age = max(0.0, round(wall_now - listed.head_timestamp, 3))
    parked = key.parked
    return KeyInfo(
        key_id=key.ref.id,
        job_type=key.ref.job_type,
        key=key.ref.key,
        state="retiring" if key.state in RETIRING else key.state.value,
        owner=key.owner,
        holds=book.holds_of(key),
        backlog=listed.messages if listed is not None else None,
        oldest_age_seconds=age,
        failures=key.failures or (parked.attempts if parked is not None else 0),
        last_error=key.last_error or (parked.error if parked is not None else None),
        parked_at=float(parked.at) if parked is not None else None,
    )

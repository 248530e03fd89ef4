"""``rabbitkeys keys``: the page the registry answers with, from a book built by hand (pure,
no broker): filters, sorts, paging, and a page of 100,000 keys."""

from __future__ import annotations

import time
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitkeys._registry.keybook import DeclareAndBind, KeyBook, KeyState, Parked
from rabbitkeys._registry.keylist import QueueStats, page
from rabbitkeys._wire.protocol import KeysPage, KeysRequest
from rabbitkeys._wire.topology import KeyRef, Names

NOW = 1_000.0  # monotonic
WALL = 1_700_000_000.0  # Unix time


def new_book() -> KeyBook:
    return KeyBook(Names("t").key_queue, namespace="t", max_keys=10**6, max_job_types=100)


def add(
    book: KeyBook,
    key: str,
    job_type: str = "a",
    *,
    state: KeyState = KeyState.UNOWNED,
    owner: str | None = None,
) -> str:
    """A key as the book holds it after its declare (through the book's own events: an
    ensure and its declare-ok), then put in ``state`` by hand."""
    ref = KeyRef.of(key, job_type)
    (declare,) = book.ensure(ref, None, waiter=0)
    assert isinstance(declare, DeclareAndBind)
    book.declared(ref.id, declare.epoch, f"{ref.token}|rk", NOW)
    record = book.keys[ref.id]
    record.state, record.owner = state, owner
    return ref.id


def ids(result: KeysPage) -> list[str]:
    return [info.key_id for info in result.keys]


def ask(
    book: KeyBook,
    stats: dict[str, QueueStats] | None = None,
    *,
    listed_at: float | None = NOW - 5,
    **request: object,
) -> KeysPage:
    return page(book, KeysRequest.model_validate(request), stats, listed_at, NOW, WALL)


def stats_of(book: KeyBook, counts: Iterable[tuple[str, int, int | None]]) -> dict[str, QueueStats]:
    return {book.keys[key_id].queue: QueueStats(n, head) for key_id, n, head in counts}


def test_filters_by_job_type_worker_and_state() -> None:
    book = new_book()
    a1 = add(book, "a1", state=KeyState.OWNED, owner="w1")
    a2 = add(book, "a2", state=KeyState.OWNED, owner="w2")
    b1 = add(book, "b1", "b", state=KeyState.MOVING, owner="w1")
    b2 = add(book, "b2", "b", state=KeyState.GRACE, owner="w1")
    b3 = add(book, "b3", "b", state=KeyState.DELETING)
    c1 = add(book, "c1", "c", state=KeyState.REDRIVING)
    c2 = add(book, "c2", "c")

    assert ids(ask(book)) == [a1, a2, b1, b2, b3, c1, c2]
    assert ids(ask(book, job_type="b")) == [b1, b2, b3]
    assert ids(ask(book, worker_id="w1")) == [a1, b1, b2]
    assert ids(ask(book, worker_id="w1", job_type="a")) == [a1]
    assert ids(ask(book, state="owned")) == [a1, a2]
    assert ids(ask(book, state="moving")) == [b1]
    assert ids(ask(book, state="retiring")) == [b2, b3]
    assert ids(ask(book, state="redriving")) == [c1]
    assert ids(ask(book, state="unowned")) == [c2]
    assert ids(ask(book, state="declaring")) == []
    assert ids(ask(book, worker_id="nobody")) == []
    # one state for the four retiring steps
    assert {info.state for info in ask(book, job_type="b").keys} == {"moving", "retiring"}


def test_holds_and_failing() -> None:
    book = new_book()
    paused = add(book, "paused")
    parked = add(book, "parked")
    failing = add(book, "failing", state=KeyState.OWNED, owner="w1")
    redrive = add(book, "redrive")
    plain = add(book, "plain")
    book.keys[paused].paused = True
    book.keys[parked].parked = Parked("ValueError: bad", 5, 0, "w1", int(WALL) - 60)
    book.keys[failing].failures, book.keys[failing].last_error = 2, "KeyError: 'x'"
    book.keys[redrive].redrive = "r1"

    assert ids(ask(book, state="paused")) == [paused]
    assert ids(ask(book, state="parked")) == [parked]
    assert ids(ask(book, state="failing")) == [failing]
    by_id = {info.key_id: info for info in ask(book).keys}
    assert by_id[paused].holds == ["paused"]
    assert by_id[redrive].holds == ["redrive"]
    assert by_id[plain].holds == []
    assert by_id[plain].failures == 0 and by_id[plain].last_error is None
    parked_info = by_id[parked]
    assert parked_info.holds == ["parked"]
    assert (parked_info.failures, parked_info.last_error) == (5, "ValueError: bad")
    assert parked_info.parked_at == int(WALL) - 60
    assert (by_id[failing].failures, by_id[failing].last_error) == (2, "KeyError: 'x'")


def test_a_paused_job_type_holds_its_keys() -> None:
    book = new_book()
    a = add(book, "k", "a")
    add(book, "k", "b")
    book.pause_type("a")
    result = ask(book, state="paused")
    assert ids(result) == [a]
    assert result.keys[0].holds == ["type_paused"]
    assert result.paused_job_types == ["a"]


def test_sorts_by_key_backlog_and_age_unknown_last() -> None:
    book = new_book()
    # by key: job type first, then the key's text (not its id's token)
    b_x = add(book, "x", "b")
    a_z = add(book, "z", "a")
    a_y = add(book, "y", "a")
    a_w = add(book, "w", "a")
    assert ids(ask(book, sort="key")) == [a_w, a_y, a_z, b_x]

    stats = stats_of(
        book,
        [(b_x, 10, int(WALL) - 30), (a_z, 50, int(WALL) - 10), (a_y, 10, int(WALL) - 300)],
    )
    # a_w was not listed: unknown, last; a tie of 10 goes by key id
    assert ids(ask(book, stats, sort="backlog")) == [a_z, a_y, b_x, a_w]
    assert ids(ask(book, stats, sort="age")) == [a_y, b_x, a_z, a_w]
    # an empty queue has no head timestamp: unknown age, last, by key id
    stats[book.keys[a_y].queue] = QueueStats(0, None)
    assert ids(ask(book, stats, sort="age")) == [b_x, a_z, a_w, a_y]
    assert ids(ask(book, stats, sort="backlog")) == [a_z, b_x, a_y, a_w]
    # no listing at all: every figure unknown, by key id
    assert ids(ask(book, None, sort="backlog")) == sorted([a_w, a_y, a_z, b_x])


def test_figures_from_the_listing() -> None:
    book = new_book()
    listed = add(book, "listed")
    empty = add(book, "empty")
    unlisted = add(book, "unlisted")
    stats = stats_of(book, [(listed, 7, int(WALL) - 90), (empty, 0, None)])
    by_id = {info.key_id: info for info in ask(book, stats).keys}
    assert (by_id[listed].backlog, by_id[listed].oldest_age_seconds) == (7, 90.0)
    assert (by_id[empty].backlog, by_id[empty].oldest_age_seconds) == (0, None)
    assert (by_id[unlisted].backlog, by_id[unlisted].oldest_age_seconds) == (None, None)
    assert ask(book, stats).listed_seconds_ago == 5.0
    assert ask(book, None).listed_seconds_ago is None
    # a head timestamp ahead of this clock (another host's): age 0, never negative
    future = stats_of(book, [(listed, 1, int(WALL) + 60)])
    by_id = {info.key_id: info for info in ask(book, future).keys}
    assert by_id[listed].oldest_age_seconds == 0.0


def test_paging() -> None:
    book = new_book()
    all_ids = sorted(add(book, f"k{i:02}") for i in range(25))
    first = ask(book, limit=10)
    assert (ids(first), first.total, first.next_offset) == (all_ids[:10], 25, 10)
    second = ask(book, limit=10, offset=10)
    assert (ids(second), second.next_offset) == (all_ids[10:20], 20)
    last = ask(book, limit=10, offset=20)
    assert (ids(last), last.total, last.next_offset) == (all_ids[20:], 25, None)
    beyond = ask(book, limit=10, offset=100)
    assert (ids(beyond), beyond.total, beyond.next_offset) == ([], 25, None)
    exact = ask(book, limit=25)
    assert (len(exact.keys), exact.next_offset) == (25, None)


@settings(max_examples=60, deadline=None)
@given(
    backlogs=st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=0, max_size=40),
    sort=st.sampled_from(["key", "backlog", "age"]),
    limit=st.integers(1, 7),
)
def test_pages_together_are_the_full_sort(
    backlogs: list[int | None], sort: str, limit: int
) -> None:
    """Walking every page by ``next_offset`` yields each matching key once, in the order
    a full sort gives."""
    book = new_book()
    stats: dict[str, QueueStats] = {}
    expected_rows: list[tuple[tuple[object, ...], str]] = []
    for i, backlog in enumerate(backlogs):
        key_id = add(book, f"key-{i}", "ab"[i % 2])
        record = book.keys[key_id]
        head = None if not backlog else int(WALL) - 10 * backlog
        if backlog is not None:
            stats[record.queue] = QueueStats(backlog, head)
        if sort == "key":
            expected_rows.append(((record.ref.job_type, record.ref.key), key_id))
        elif sort == "backlog":
            expected_rows.append(((0, -backlog) if backlog is not None else (1, 0), key_id))
        else:
            expected_rows.append(((0, head) if head is not None else (1, 0), key_id))
    expected = [key_id for _, key_id in sorted(expected_rows)]
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        result = ask(book, stats, sort=sort, limit=limit, offset=offset)
        assert result.total == len(expected)
        seen += ids(result)
        offset = result.next_offset
    assert seen == expected


def test_a_page_of_100000_keys() -> None:
    """At 100,000 keys a page is right, and takes milliseconds, not seconds (the registry
    answers it on its event loop). The time is printed (``-s``); the bound is loose."""
    book = new_book()
    stats: dict[str, QueueStats] = {}
    for i in range(100_000):
        ref = KeyRef.of(f"customer-{i}", ("orders", "mail")[i % 2])
        record = book._new_key(ref, KeyState.OWNED if i % 3 else KeyState.UNOWNED, "rk", NOW)
        if i % 3:
            record.owner = f"w{i % 7}"
        if i % 10:  # a tenth not listed (yet)
            stats[record.queue] = QueueStats(i % 997, int(WALL) - (i * 7919) % 86_400)
    assert len(book.keys) == 100_000

    def reference(sort: str) -> list[str]:
        """The whole book sorted (what a page must be a slice of)."""
        rows: list[tuple[tuple[object, ...], str]] = []
        for k in book.keys.values():
            s = stats.get(k.queue)
            if sort == "key":
                rows.append(((k.ref.job_type, k.ref.key), k.ref.id))
            elif sort == "backlog":
                rows.append(((0, -s.messages) if s else (1, 0), k.ref.id))
            else:
                rows.append(((0, s.head_timestamp) if s and s.head_timestamp else (1, 0), k.ref.id))
        return [key_id for _, key_id in sorted(rows)]

    timings = {}
    for sort in ("key", "backlog", "age"):
        started = time.perf_counter()
        result = ask(book, stats, sort=sort, limit=100, offset=500)
        timings[sort] = round(time.perf_counter() - started, 4)
        assert result.total == 100_000 and result.next_offset == 600
        assert ids(result) == reference(sort)[500:600]
    print(f"\n100,000 keys, page of 100 at offset 500: {timings}")

    # a filtered page, checked against the full sort
    started = time.perf_counter()
    result = ask(book, stats, sort="backlog", job_type="mail", worker_id="w3", limit=1000)
    filtered_time = time.perf_counter() - started
    print(f"filtered (mail, w3), page of 1000: {filtered_time:.3f}s")
    rows = sorted(
        (
            (0, -stats[k.queue].messages) if k.queue in stats else (1, 0),
            k.ref.id,
        )
        for k in book.keys.values()
        if k.ref.job_type == "mail" and k.owner == "w3"
    )
    assert result.total == len(rows)
    assert ids(result) == [key_id for _, key_id in rows[:1000]]
    assert max(*timings.values(), filtered_time) < 5.0

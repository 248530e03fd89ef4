"""The key book: a key's lifecycle and the registry's rules, without a broker.

A small simulation stands in for the registry's shell, the broker's key queues and their
hold bindings, and the workers: it carries out the book's commands as late as hypothesis
likes (a declare, an unbind, a delete's outcome, a worker's release, a skip, a redrive's
rearrangement), in any order with joins, crashes, ensures, idle reports, parked keys and
operators' pauses, resumes, skips and redrives, and checks the rules after every step.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitkeys._registry import assignment as _assignment
from rabbitkeys._registry.keybook import (
    RETIRING,
    AssignKeys,
    CheckAndDelete,
    Command,
    DeclareAndBind,
    HandoffDone,
    HoldRefused,
    Key,
    KeyBook,
    KeyState,
    Parked,
    Rearrange,
    Rebalance,
    ReleaseKeys,
    Reply,
    Retired,
    SetHold,
    SkipHead,
    SyncWorker,
    Unbind,
    WaitGrace,
    WaitRelease,
    named_by_hold,
)
from rabbitkeys._wire.protocol import REFUSED_QUOTA_EXCEEDED, REFUSED_UNAVAILABLE
from rabbitkeys._wire.topology import HOLD_PARKED, HOLD_PAUSED, HOLD_REDRIVE, KeyRef, Names

JOB_TYPES = ("a", "b")
WORKERS = ("w1", "w2", "w3")


def ref(key: str, job_type: str = "a") -> KeyRef:
    return KeyRef.of(key, job_type)


def new_book(max_keys: int = 1_000, max_job_types: int = 100) -> KeyBook:
    return KeyBook(
        Names("t").key_queue, namespace="t", max_keys=max_keys, max_job_types=max_job_types
    )


def queue_ref(queue: str) -> KeyRef:
    """The key a queue's name tells (a hashed key: its token only), as a leader reads it."""
    found = Names("t").key_of_queue(queue)
    assert found is not None, queue
    return found


class Violation(AssertionError):
    pass


Binding = tuple[str, tuple[tuple[str, str | int], ...]]


def book_holds(key: Key) -> set[Binding]:
    """The hold bindings a key's queue should have, from the book: each carries the key's
    text first, unless the key is its own token."""
    text: tuple[tuple[str, str | int], ...] = ()
    if key.ref.key != key.ref.token:
        text = (("x-rabbitkeys-key", key.ref.key),)
    holds: set[Binding] = set()
    if key.paused:
        holds.add((HOLD_PAUSED, text))
    if key.parked is not None:
        p = key.parked
        arguments = (
            ("x-error", p.error),
            ("x-attempts", p.attempts),
            ("x-job-index", p.job_index),
            ("x-worker", p.worker_id),
            ("x-at", p.at),
        )
        holds.add((HOLD_PARKED, text + arguments))
    if key.redrive is not None:
        holds.add((HOLD_REDRIVE, (*text, ("x-redrive", key.redrive))))
    return holds


@dataclass
class Sim:
    """The book's shell and its workers, each step as late as the test wants."""

    book: KeyBook = field(default_factory=new_book)
    #: what each live worker consumes now (as the broker sees it)
    holds: dict[str, set[str]] = field(default_factory=dict)
    job_types: dict[str, frozenset[str]] = field(default_factory=dict)
    #: the shell's work in flight: declares, unbinds, timers, deletes
    pending: list[Command] = field(default_factory=list)
    #: Release commands not yet acted on by their worker
    releases: list[tuple[str, str]] = field(default_factory=list)
    replies: dict[int, Reply] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    waiters: itertools.count[int] = field(default_factory=itertools.count)
    routing_keys: itertools.count[int] = field(default_factory=itertools.count)
    retired: int = 0
    rebalance_wanted: bool = False
    refs: dict[str, KeyRef] = field(default_factory=dict)
    time: float = 0.0
    #: the key whose declare-ok is being reported now: the only one that may be fresh
    just_declared: str | None = None
    #: the broker: key queues that exist, and their hold bindings (and the job types')
    queues: dict[str, KeyRef] = field(default_factory=dict)
    bindings: dict[str, set[Binding]] = field(default_factory=dict)
    type_holds: set[str] = field(default_factory=set)
    #: Released reports a worker owes after parking a key (it let go at once)
    parking: list[tuple[str, str]] = field(default_factory=list)
    redrive_ids: itertools.count[int] = field(default_factory=itertools.count)
    refused: int = 0

    # --- carrying out commands ---------------------------------------------------------

    def do(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case AssignKeys(worker_id=worker, keys=keys):
                    for assignment in keys:
                        key = self.book.keys[assignment.key_id]
                        # (a key placed as its retirement ends may be bound again at once)
                        owned = (KeyState.OWNED, KeyState.DECLARING)
                        if key.state not in owned or key.owner != worker:
                            raise Violation(f"assigned {assignment.key_id} in {key.state}")
                        if self.book.held(key):
                            raise Violation(f"assigned {assignment.key_id}, held: {key}")
                        if assignment.fresh and assignment.key_id != self.just_declared:
                            # the worker would consume it unchecked: its queue may be gone
                            raise Violation(f"{assignment.key_id} assigned fresh, not declared")
                        if worker not in self.holds:
                            continue  # it has left (or is leaving): its inbox is gone
                        # The worker consumes at once (the earliest it could): nobody else may.
                        others = [w for w, h in self.holds.items() if assignment.key_id in h]
                        if set(others) - {worker}:
                            raise Violation(f"{assignment.key_id}: consumed by {others} too")
                        self.holds[worker].add(assignment.key_id)
                case ReleaseKeys(worker_id=worker, key_ids=key_ids):
                    self.releases += [(worker, key_id) for key_id in key_ids]
                case Reply(waiter=waiter):
                    assert waiter not in self.replies, "answered twice"
                    self.replies[waiter] = command
                case CheckAndDelete(key_id=key_id):
                    key = self.book.keys[key_id]
                    if key.owner is not None or key.routing_keys or self.holders(key_id):
                        raise Violation(f"delete of {key_id}: {key}, held {self.holders(key_id)}")
                    if self.book.held(key):
                        raise Violation(f"delete of held {key_id}: {key}")
                    self.pending.append(command)
                case SkipHead(key_id=key_id) | Rearrange(key_id=key_id):
                    key = self.book.keys[key_id]
                    if key.owner is not None or self.holders(key_id):
                        raise Violation(f"{command} while consumed: {key}")
                    self.pending.append(command)
                case SetHold(hold=hold, add=add, queue=queue, job_type=job_type, arguments=a):
                    if job_type is not None:
                        assert queue is None and hold == HOLD_PAUSED
                        (self.type_holds.add if add else self.type_holds.discard)(job_type)
                    elif add:
                        assert queue is not None
                        if queue not in self.queues:
                            raise Violation(f"{command}: the queue does not exist")
                        self.bindings.setdefault(queue, set()).add((hold, a))
                    else:
                        assert queue is not None
                        self.bindings.get(queue, set()).discard((hold, a))
                case DeclareAndBind() | Unbind() | WaitGrace() | WaitRelease():
                    self.pending.append(command)
                case Retired():
                    self.retired += 1
                case Rebalance():
                    self.rebalance_wanted = True
                case SyncWorker() | HandoffDone():
                    pass

    def holders(self, key_id: str) -> list[str]:
        return [w for w, held in self.holds.items() if key_id in held]

    def complete(self, index: int, success: bool) -> None:
        """Carry out one piece of the shell's work in flight."""
        command = self.pending.pop(index % len(self.pending))
        book = self.book
        match command:
            case DeclareAndBind(key_id=key_id, epoch=epoch, queue=queue, ref=r):
                if success:
                    self.queues[queue] = r
                    routing_key = f"rk{next(self.routing_keys)}"
                    self.just_declared = key_id
                    try:
                        self.do(book.declared(key_id, epoch, routing_key, self.time))
                    finally:
                        self.just_declared = None
                else:
                    self.do(book.declare_failed(key_id, epoch, "refused", None))
            case Unbind(key_id=key_id, epoch=epoch, routing_keys=routing_keys):
                removed = routing_keys if success else routing_keys[:1]
                self.do(book.unbound(key_id, epoch, removed, ok=success))
            case WaitGrace(key_id=key_id, epoch=epoch):
                self.do(book.grace_over(key_id, epoch))
            case WaitRelease(key_id=key_id, epoch=epoch):
                self.do(book.release_wait_over(key_id, epoch))
            case CheckAndDelete(key_id=key_id, epoch=epoch, queue=queue):
                if self.holders(key_id):  # the broker's if_unused would refuse: never asked
                    raise Violation(f"{key_id} deleted while consumed")
                if success:
                    if self.bindings.get(queue):
                        raise Violation(f"{key_id} deleted with holds {self.bindings[queue]}")
                    self.queues.pop(queue, None)
                    self.bindings.pop(queue, None)
                self.do(book.delete_outcome(key_id, epoch, deleted=success))
            case SkipHead(key_id=key_id, epoch=epoch):
                if self.holders(key_id):
                    raise Violation(f"{key_id}: head skipped while consumed")
                self.do(book.skipped(key_id, epoch, ok=success))
            case Rearrange(key_id=key_id, epoch=epoch, routing_keys=routing_keys):
                if self.holders(key_id):
                    raise Violation(f"{key_id}: rearranged while consumed")
                removed = routing_keys if success else routing_keys[:1]
                self.do(book.rearranged(key_id, epoch, success, removed))

    # --- what workers and publishers do --------------------------------------------------

    def join(self, worker: str, job_types: frozenset[str]) -> None:
        if worker not in self.holds:
            self.holds[worker] = set()
            self.job_types[worker] = job_types
        reported = [(self.refs[k], self.book_routing_key(k)) for k in sorted(self.holds[worker])]
        self.do(self.book.joined(worker, self.job_types[worker], reported, self.time))

    def book_routing_key(self, key_id: str) -> str | None:
        key = self.book.keys.get(key_id)
        return key.routing_key if key else None

    def crash(self, worker: str) -> None:
        self.holds.pop(worker, None)  # the broker requeues and frees what it held
        self.releases = [(w, k) for w, k in self.releases if w != worker]
        self.parking = [(w, k) for w, k in self.parking if w != worker]
        self.do(self.book.gone(worker))

    def leave(self, worker: str) -> None:
        held = self.holds.pop(worker, set()) | {k for w, k in self.parking if w == worker}
        self.releases = [(w, k) for w, k in self.releases if w != worker]
        self.parking = [(w, k) for w, k in self.parking if w != worker]
        self.do(self.book.released(worker, [(self.refs[k], None) for k in held], self.time))
        self.do(self.book.gone(worker))

    def park(self, worker: str, key_id: str, attempts: int) -> None:
        """The key's head failed its last attempt (policy park): the worker lets go at once
        (head requeued), reports KeyParked, and owes its Released (:meth:`report_parked`)."""
        if key_id not in self.holds.get(worker, set()):
            return
        self.holds[worker].discard(key_id)
        parked = Parked(f"ValueError: {attempts}", attempts, 0, worker, int(self.time))
        r = self.refs[key_id]
        self.do(self.book.key_parked(worker, r, self.book_routing_key(key_id), parked, self.time))
        self.parking.append((worker, key_id))

    def report_parked(self, index: int) -> None:
        worker, key_id = self.parking.pop(index % len(self.parking))
        self.do(self.book.released(worker, [(self.refs[key_id], None)], self.time))

    def operate(self, action: str, key: str, job_type: str) -> None:
        """An operator's request; a refusal is an answer too."""
        r = self.refs.setdefault(ref(key, job_type).id, ref(key, job_type))
        book = self.book
        try:
            if action == "pause":
                self.do(book.pause(r))
            elif action == "resume":
                self.do(book.resume(r))
            elif action == "pause type":
                self.do(book.pause_type(job_type))
            elif action == "resume type":
                self.do(book.resume_type(job_type))
            elif action == "skip":
                self.do(book.skip(r))
            elif action == "redrive":
                self.do(book.redrive(r, f"r{next(self.redrive_ids)}"))
        except HoldRefused as refused:
            assert str(refused)
            self.refused += 1

    def release(self, index: int) -> None:
        """A worker acts on a Release: settles the key and reports it (if it holds it)."""
        worker, key_id = self.releases.pop(index % len(self.releases))
        if key_id in self.holds.get(worker, set()):
            self.holds[worker].discard(key_id)
            self.do(self.book.released(worker, [(self.refs[key_id], None)], self.time))

    def let_go(self, worker: str, key_id: str) -> None:
        """A worker lets go of a key on its own (its consumer was cancelled)."""
        if key_id in self.holds.get(worker, set()):
            self.holds[worker].discard(key_id)
            self.do(self.book.released(worker, [(self.refs[key_id], None)], self.time))

    def ensure(self, key: str, job_type: str, stale: bool) -> int:
        r = self.refs.setdefault(ref(key, job_type).id, ref(key, job_type))
        waiter = next(self.waiters)
        self.asked.add(waiter)
        stale_key = self.book_routing_key(r.id) if stale else None
        self.do(self.book.ensure(r, stale_key, waiter))
        return waiter

    def idle(self, worker: str, key_id: str) -> None:
        if key_id in self.holds.get(worker, set()):
            self.do(self.book.heartbeat(worker, 0, [key_id], self.time))

    def rebalance(self) -> None:
        self.rebalance_wanted = False
        self.do(self.book.rebalance(self.time))

    def restart_registry(self) -> None:
        """Another registry leads with an empty book; workers keep their keys, report them
        (``Sync``), and act on the releases they had been sent."""
        max_keys, max_job_types = self.book._max_keys, self.book._max_job_types
        self.book = new_book(max_keys, max_job_types)
        self.pending.clear()  # the old leader's work in flight went with it
        abandoned = self.asked - set(self.replies)
        self.replies.update({w: Reply(w, reason="no answer: the leader died") for w in abandoned})
        # Before it consumes its control queue, the new leader reads the holds back, each
        # key as its queue's name tells it (a hashed key's text is in its holds only).
        listed = [
            (queue_ref(queue), hold, dict(arguments))
            for queue, holds in sorted(self.bindings.items())
            for hold, arguments in sorted(holds)
        ]
        self.do(self.book.holds_listed(listed, sorted(self.type_holds), self.time))
        # then the reports queued for the old leader (a parked key's Released): they come
        # before the joins its Sync asks for, and before any later operator request
        while self.parking:
            self.report_parked(0)
        for worker in sorted(self.holds):
            self.join(worker, self.job_types[worker])

    def settle(self) -> None:
        """Everything in flight completes (successfully), workers act on every release."""
        for _ in range(100_000):
            if self.releases:
                self.release(0)
            elif self.parking:
                self.report_parked(0)
            elif self.pending:
                self.complete(0, success=True)
            else:
                before = {k: (v.state, v.owner) for k, v in self.book.keys.items()}
                self.rebalance()
                if not self.releases and not self.pending:
                    after = {k: (v.state, v.owner) for k, v in self.book.keys.items()}
                    if after == before:
                        return
        raise AssertionError("the book does not settle")

    # --- the rules ----------------------------------------------------------------------

    def check(self) -> None:
        book = self.book
        for key_id, key in book.keys.items():
            holders = self.holders(key_id)
            if len(holders) > 1:
                raise Violation(f"{key_id} has two consumers: {holders}")
            if key.owner is not None:
                assert key.owner in book.workers, key
                assert key_id in book.workers[key.owner].keys
            if holders and key.state not in (KeyState.DECLARING, *RETIRING):
                # a consumer is always the key's owner (or hands it over to someone else)
                assert key.owner == holders[0], (key, holders)
            if key.state is KeyState.MOVING:
                assert key.owner is not None
            if key.state is KeyState.REDRIVING:
                assert key.redrive is not None and key.owner is None, key
            if key.skipping is not None:
                assert key.parked is not None and key.owner is None, key
            assert set(book.holds_of(key)) <= {"paused", "parked", "type_paused", "redrive"}
            assert (bool(book.holds_of(key)) or key.skipping is not None) == book.held(key)
            # known by its text, also after a failover (its holds tell it)
            assert key.ref == self.refs[key_id], (key.ref, self.refs[key_id])
        for c in self.pending:
            if isinstance(c, (SkipHead, Rearrange)) and c.key_id in book.keys:
                if self.holders(c.key_id):
                    raise Violation(f"{c} under way while consumed")
        for worker_id, worker in book.workers.items():
            for key_id in worker.keys:
                assert book.keys[key_id].owner == worker_id
        assert book.keys.job_types == Counter(k.ref.job_type for k in book.keys.values())
        assert book.retiring() == sum(1 for k in book.keys.values() if k.state in RETIRING)
        counts = book.held_counts()
        assert counts["parked"] == sum(k.parked is not None for k in book.keys.values())
        assert counts["paused_job_types"] == len(book.paused_types)

    def check_holds_recorded(self) -> None:
        """Once settled, the broker's hold bindings are exactly the book's holds."""
        book = self.book
        for key in book.keys.values():
            assert self.bindings.get(key.queue, set()) == book_holds(key), key
        known = {k.queue for k in book.keys.values()}
        for queue, holds in self.bindings.items():
            assert not holds or queue in known, (queue, holds)
        assert self.type_holds == book.paused_types


# --- random sequences of events ----------------------------------------------------------

# Each event: its kind, then an index or number, a key number and a flag, read as it needs.
# Kinds that move keys along their lifecycle come more often than the ones that reset it.
_OPERATIONS = ("pause", "resume", "pause type", "resume type", "skip", "redrive")
_KINDS = (
    ["complete"] * 4
    + ["release"] * 3
    + ["idle", "ensure", "rebalance", "join"] * 2
    + ["let_go", "crash", "leave", "restart", "unknown heartbeat"]
    + ["park", "report parked", *_OPERATIONS, "skip", "resume"]
)
_events = st.lists(
    st.tuples(st.sampled_from(_KINDS), st.integers(0, 20), st.integers(0, 5), st.booleans()),
    min_size=40,
    max_size=150,
)
_JOB_TYPE_SETS = (frozenset("a"), frozenset("b"), frozenset("ab"))
# plain keys (their own token) and hashed ones (the token hides the text)
KEYS = ("k0", "post 1", "k2", "été/3", "k4", 'k "5"')


def run(sim: Sim, events: list[tuple[str, int, int, bool]]) -> None:
    for kind, index, n, flag in events:
        sim.time += 1.0
        held = sorted((w, k) for w, keys in sim.holds.items() for k in keys)
        worker = WORKERS[index % len(WORKERS)]
        if kind == "join":
            sim.join(worker, _JOB_TYPE_SETS[n % 3])
        elif kind == "crash":
            sim.crash(worker)
        elif kind == "leave":
            sim.leave(worker)
        elif kind == "ensure":
            sim.ensure(KEYS[n], JOB_TYPES[index % 2], stale=flag)
        elif kind == "idle" and held:
            sim.idle(*held[index % len(held)])
        elif kind == "let_go" and held:
            sim.let_go(*held[index % len(held)])
        elif kind == "complete" and sim.pending:
            # mostly successful: a failure ends a declare or a retirement early
            sim.complete(index, success=flag or n > 1)
        elif kind == "release" and sim.releases:
            sim.release(index)
        elif kind == "rebalance":
            sim.rebalance()
        elif kind == "restart":
            sim.restart_registry()
        elif kind == "unknown heartbeat":
            assert sim.book.heartbeat("stranger", 0, [], sim.time) == [SyncWorker("stranger")]
        elif kind == "park" and held:
            sim.park(*held[index % len(held)], attempts=n + 1)
        elif kind == "report parked" and sim.parking:
            sim.report_parked(index)
        elif kind in _OPERATIONS:
            sim.operate(kind, KEYS[n], JOB_TYPES[index % 2])
        if sim.rebalance_wanted and flag:  # as the registry does, a moment later
            sim.rebalance()
        sim.check()


@settings(max_examples=500, deadline=None)
@given(_events)
def test_any_order_of_events_keeps_the_rules_and_settles_with_every_key_owned(
    events: list[tuple[str, int, int, bool]],
) -> None:
    sim = Sim()
    run(sim, events)
    sim.settle()
    sim.check()
    sim.check_holds_recorded()
    book = sim.book
    # every ensure was answered, once
    assert set(sim.replies) == sim.asked
    for key_id, key in book.keys.items():
        eligible = [w for w, rec in book.workers.items() if key.ref.job_type in rec.job_types]
        if book.held(key):  # no worker has it: it waits, with its queue and messages
            assert key.state is KeyState.UNOWNED and key.owner is None, key
            assert not sim.holders(key_id) and key.redrive is None and key.skipping is None
        elif eligible:
            assert key.state is KeyState.OWNED, key
            assert sim.holders(key_id) == [key.owner]
        else:
            assert key.state is KeyState.UNOWNED and key.owner is None, key
    # once settled, the owners of the keys not held are what rendezvous hashing says
    for job_type in JOB_TYPES:
        keys = [k for k in book.keys.values() if k.ref.job_type == job_type and not book.held(k)]
        eligible = [w for w, rec in book.workers.items() if job_type in rec.job_types]
        desired = _assignment.assign((k.ref.id for k in keys), eligible)
        assert {k.ref.id: k.owner for k in keys if k.owner} == desired


@settings(max_examples=200, deadline=None)
@given(
    keys=st.integers(1, 120),
    workers=st.integers(1, 4),
    newcomer=st.booleans(),
)
def test_a_membership_change_moves_only_the_keys_rendezvous_hashing_moves(
    keys: int, workers: int, newcomer: bool
) -> None:
    sim = Sim()
    names = [f"w{i}" for i in range(workers + 1)]
    for worker in names[:workers]:
        sim.join(worker, frozenset("a"))
    for n in range(keys):
        sim.ensure(f"k{n}", "a", stale=False)
    sim.settle()
    before = {k: v.owner for k, v in sim.book.keys.items()}
    if newcomer:
        sim.join(names[workers], frozenset("a"))
        after_workers = names[: workers + 1]
    else:
        sim.crash(names[0])
        after_workers = names[1:workers]
    commands = sim.book.rebalance(sim.time)
    released = {k for c in commands if isinstance(c, ReleaseKeys) for k in c.key_ids}
    assigned = {a.key_id for c in commands if isinstance(c, AssignKeys) for a in c.keys}
    sim.do(commands)
    expected = _assignment.moves(before, _assignment.assign(before, after_workers))
    # a key moves from a live owner by a release, from a lost one by a plain assign: just
    # the keys _assignment moves (about 1/N of them: tests/registry/test_assignment.py)
    assert released | assigned == {k for k, (_, new) in expected.items() if new is not None}
    assert not released & assigned
    sim.settle()
    sim.check()


def test_a_worker_joining_four_moves_about_a_fifth_of_the_keys() -> None:
    sim = Sim()
    for worker in ("w1", "w2", "w3", "w4"):
        sim.join(worker, frozenset("a"))
    for n in range(2_000):
        sim.ensure(f"k{n}", "a", stale=False)
    sim.settle()
    sim.join("w5", frozenset("a"))
    commands = sim.book.rebalance(sim.time)
    moved = sum(len(c.key_ids) for c in commands if isinstance(c, ReleaseKeys))
    assert 0 < moved <= 1.1 * 2_000 / 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from("abc")), max_size=40))
def test_the_quotas_count_every_key_in_the_book_whatever_its_state(
    ensures: list[tuple[int, str]],
) -> None:
    sim = Sim(book=new_book(max_keys=4, max_job_types=2))
    sim.join("w1", frozenset("abc"))
    for n, job_type in ensures:
        keys_before = len(sim.book.keys)
        types_before = set(sim.book.keys.job_types)
        waiter = sim.ensure(f"k{n}", job_type, stale=False)
        reply = sim.replies.get(waiter)
        if reply is not None and reply.code == REFUSED_QUOTA_EXCEEDED:
            assert keys_before >= 4 or (job_type not in types_before and len(types_before) >= 2)
        assert len(sim.book.keys) <= 4 and len(sim.book.keys.job_types) <= 2
        if n % 3 == 0 and sim.pending:
            sim.complete(0, success=n % 2 == 0)
        sim.check()


# --- the lifecycle, by example -------------------------------------------------------------


def test_a_new_key_is_declared_then_owned_and_its_ensure_answered() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    first, second = sim.ensure("k", "a", False), sim.ensure("k", "a", False)
    [key] = sim.book.keys.values()
    assert key.state is KeyState.DECLARING and len(sim.pending) == 1  # declared once
    sim.complete(0, success=True)
    assert key.state is KeyState.OWNED and key.owner == "w1"
    assert sim.replies[first].routing_key == sim.replies[second].routing_key == "rk0"
    assert sim.holds["w1"] == {key.ref.id}


def test_only_a_key_just_declared_is_assigned_fresh() -> None:
    """A worker consumes a fresh key without checking its queue: only the declare-ok the
    registry has just had may say so, never an adoption, a move or a rebalance."""
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("new", "a", False)
    declared = sim.book.declared(*_declaring(sim), "rk0", 1.0)
    [assigned] = [c for c in declared if isinstance(c, AssignKeys)]
    assert [a.fresh for a in assigned.keys] == [True]
    sim.book.adopt_listed(ref("adopted"), consumers=0, bound=["rk1"], now=1.0)
    placed = sim.book.rebalance(2.0)
    assert [a.fresh for c in placed if isinstance(c, AssignKeys) for a in c.keys] == [False]
    sim.holds["w1"] = set(sim.book.keys)
    sim.join("w2", frozenset("a"))  # some keys move: assigned to w2 once w1 released them
    sim.do(sim.book.rebalance(3.0))
    moved = [
        a
        for worker, key_id in list(sim.releases)
        for c in sim.book.released(worker, [(sim.refs.get(key_id) or ref(key_id[2:]), None)], 4)
        if isinstance(c, AssignKeys)
        for a in c.keys
    ]
    assert all(not a.fresh for a in moved)


def _declaring(sim: Sim) -> tuple[str, int]:
    [command] = [c for c in sim.pending if isinstance(c, DeclareAndBind)]
    sim.pending.remove(command)
    return command.key_id, command.epoch


def test_a_declare_that_fails_leaves_no_key_and_refuses_every_waiter() -> None:
    sim = Sim()
    waiters = [sim.ensure("k", "a", False) for _ in range(3)]
    sim.complete(0, success=False)
    assert not sim.book.keys
    assert [sim.replies[w].reason for w in waiters] == ["refused"] * 3


def test_a_key_of_a_job_type_nobody_serves_waits_unowned_and_keeps_its_lease() -> None:
    sim = Sim()
    sim.ensure("k", "b", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    assert key.state is KeyState.UNOWNED
    assert sim.book.leases_due(now=100.0, period=10.0) == [key]
    sim.book.lease_renewed(key.ref.id, 100.0)
    assert sim.book.leases_due(now=105.0, period=10.0) == []
    sim.join("w1", frozenset("b"))
    sim.settle()
    assert key.state is KeyState.OWNED and key.owner == "w1"


def test_retiring_an_idle_key_unbinds_waits_has_it_released_then_deletes() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    sim.idle("w1", key.ref.id)
    assert key.state is KeyState.UNBINDING
    assert sim.pending == [Unbind(key.ref.id, key.ref, key.queue, ("rk0",), key.epoch)]
    sim.complete(0, success=True)
    assert key.state is KeyState.GRACE and key.routing_keys == []
    sim.complete(0, success=True)  # grace over
    assert key.state is KeyState.RELEASING and sim.releases == [("w1", key.ref.id)]
    # a publish comes back meanwhile: its ensure waits for the retirement
    waiter = sim.ensure("k", "a", stale=False)
    assert waiter not in sim.replies
    sim.release(0)
    assert key.state is KeyState.DELETING
    [_timer, delete] = sim.pending
    assert isinstance(delete, CheckAndDelete)
    sim.complete(1, success=True)  # deleted
    assert sim.retired == 1
    # the waiting ensure starts the key afresh
    [fresh] = sim.book.keys.values()
    assert fresh is not key and fresh.state is KeyState.DECLARING
    sim.settle()
    assert sim.replies[waiter].routing_key is not None and fresh.state is KeyState.OWNED


def test_a_retirement_that_finds_messages_keeps_the_key_owned_and_unbound() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=True)  # unbound
    sim.complete(0, success=True)  # grace over
    sim.release(0)
    delete = next(i for i, c in enumerate(sim.pending) if isinstance(c, CheckAndDelete))
    sim.complete(delete, success=False)  # not empty: kept
    assert key.state is KeyState.OWNED and key.owner == "w1" and key.routing_keys == []
    # the next publish comes back with the old routing key: bound again behind them
    waiter = sim.ensure("k", "a", stale=True)
    assert key.state is KeyState.DECLARING
    sim.settle()
    assert sim.replies[waiter].routing_key == key.routing_key == "rk1"


def test_an_owner_busy_beyond_the_release_wait_keeps_the_key_and_hands_it_on_later() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=True)
    sim.complete(0, success=True)
    [timer] = sim.pending
    assert isinstance(timer, WaitRelease)
    sim.complete(0, success=True)  # RELEASE_WAIT is over, no Released yet
    assert key.state is KeyState.MOVING and key.owner == "w1"
    sim.release(0)  # the long handler finished
    assert key.state is KeyState.OWNED and key.owner == "w1"
    assert sim.retired == 0


def test_a_worker_lost_while_its_key_is_released_lets_the_retirement_go_on() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=True)
    sim.crash("w1")  # during the grace
    assert key.state is KeyState.GRACE and key.owner is None
    sim.complete(0, success=True)  # grace over: nothing to wait for
    assert key.state is KeyState.DELETING


def test_a_move_asks_the_owner_first_and_assigns_the_target_only_once_released() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    for n in range(30):
        sim.ensure(f"k{n}", "a", False)
    sim.settle()
    sim.join("w2", frozenset("a"))
    commands = sim.book.rebalance(10.0)
    moving = [k for k in sim.book.keys.values() if k.state is KeyState.MOVING]
    assert moving and all(k.owner == "w1" and k.target == "w2" for k in moving)
    assert not any(isinstance(c, AssignKeys) for c in commands)
    sim.do(commands)
    sim.time = 12.0
    sim.release(0)
    assert any(k.owner == "w2" and k.state is KeyState.OWNED for k in moving)
    handed = sim.book.released("w1", [], 12.0)
    assert handed == []


def test_a_lost_queue_is_declared_again_and_its_owner_told_to_consume_it_again() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    assert sim.book.ensure(key.ref, "an older one", 99) == [Reply(99, routing_key="rk0")]
    commands = sim.book.ensure(key.ref, "rk0", 100)  # came back on the newest: queue lost
    # its routing key stays known: a retirement must unbind it if it still exists
    assert key.state is KeyState.DECLARING and key.routing_keys == ["rk0"]
    assert commands == [DeclareAndBind(key.ref.id, key.ref, key.queue, key.epoch)]
    assigned = sim.book.declared(key.ref.id, key.epoch, "rk9", 5.0)
    # just declared again: the owner may consume it without checking it first
    assert AssignKeys("w1", (key.assignment(fresh=True),)) in assigned
    assert Reply(100, routing_key="rk9") in assigned and key.state is KeyState.OWNED
    assert key.routing_keys == ["rk0", "rk9"]


def test_an_unavailable_queue_keeps_its_key_and_bindings_and_the_publisher_is_told() -> None:
    # On a cluster, a classic queue whose node is down returns what is published to it and
    # refuses declares ("unavailable"); it comes back with the node, bindings and messages.
    sim = Sim()
    sim.ensure("k", "a", False)  # no worker serves "a": the key stays unowned
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    commands = sim.book.ensure(key.ref, "rk0", 100)
    assert commands == [DeclareAndBind(key.ref.id, key.ref, key.queue, key.epoch)]
    why = "the key's queue is unavailable (home node 'rk2@localhost' ... is down)"
    replies = sim.book.declare_failed(key.ref.id, key.epoch, why, REFUSED_UNAVAILABLE)
    assert Reply(100, reason=why, code=REFUSED_UNAVAILABLE) in replies
    assert sim.book.keys[key.ref.id] is key and key.routing_keys == ["rk0"]
    assert key.state is KeyState.UNOWNED


def test_a_declare_that_fails_for_a_consumed_key_keeps_it_with_its_owner() -> None:
    # Found by the property test: forgetting a key its owner still consumes let the next
    # ensure place it on a second worker.
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=False)  # the unbind failed after removing the one binding
    assert key.state is KeyState.OWNED and key.routing_keys == []
    waiter = sim.ensure("k", "a", stale=True)
    sim.complete(0, success=False)  # so does the declare that would bind it again
    assert sim.replies[waiter].reason == "refused"
    assert sim.book.keys[key.ref.id] is key and key.state is KeyState.OWNED
    assert key.owner == "w1"


def test_an_outcome_of_an_earlier_declare_or_retirement_is_ignored() -> None:
    sim = Sim()
    sim.ensure("k", "a", False)
    [declare] = sim.pending
    assert isinstance(declare, DeclareAndBind)
    assert sim.book.declared(declare.key_id, declare.epoch + 1, "rk", 0.0) == []
    assert sim.book.grace_over(declare.key_id, declare.epoch) == []  # not in GRACE
    assert sim.book.delete_outcome("unknown", 0, deleted=True) == []


def test_keys_listed_by_the_broker_are_adopted_only_if_unconsumed_and_bindings_merged() -> None:
    book = new_book()
    assert not book.adopt_listed(ref("busy"), consumers=1, bound=["rk1"], now=5.0)
    assert book.adopt_listed(ref("idle"), consumers=0, bound=["rk1"], now=5.0)
    key = book.keys[ref("idle").id]
    key.routing_keys.append("rk2")  # bound after the listing
    assert not book.adopt_listed(ref("idle"), consumers=0, bound=["rk1", "rk0"], now=6.0)
    assert key.routing_keys == ["rk0", "rk1", "rk2"] and key.state is KeyState.UNOWNED
    assert book.leases_due(now=10.0, period=10.0) == []  # its queue was listed at 5.0
    assert book.leases_due(now=16.0, period=10.0) == [key]
    assert book.queue_lost(key.ref.id) and not book.keys


def test_a_worker_reporting_a_key_another_owns_is_told_to_release_it() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.ensure("k", "a", False)
    sim.complete(0, success=True)
    [key] = sim.book.keys.values()
    commands = sim.book.joined("w2", ["a"], [(key.ref, "rk0")], 1.0)
    assert ReleaseKeys("w2", (key.ref.id,)) in commands and key.owner == "w1"


@pytest.mark.parametrize("state", list(KeyState))
def test_every_state_is_named_and_documented(state: KeyState) -> None:
    assert state.value == state.name.lower()


# --- holds: pause, park, skip, redrive, by example ------------------------------------------


def owned_key(sim: Sim, key: str = "k", workers: tuple[str, ...] = ("w1",)) -> Key:
    for worker in workers:
        sim.join(worker, frozenset("a"))
    sim.ensure(key, "a", False)
    sim.settle()
    owned = sim.book.keys[ref(key).id]
    assert owned.state is KeyState.OWNED
    return owned


def parked_key(sim: Sim) -> Key:
    """A key whose head failed its last attempt on w1, which has let go of it."""
    key = owned_key(sim)
    sim.park("w1", key.ref.id, attempts=5)
    sim.report_parked(0)
    assert key.state is KeyState.UNOWNED and key.owner is None
    return key


PARKED = Parked("ValueError: 5", 5, 0, "w1", 7)
PARKED_ARGUMENTS = (
    ("x-error", "ValueError: 5"),
    ("x-attempts", 5),
    ("x-job-index", 0),
    ("x-worker", "w1"),
    ("x-at", 7),
)


def test_a_paused_key_is_released_by_its_owner_and_given_to_nobody_until_resumed() -> None:
    sim = Sim()
    key = owned_key(sim)
    commands = sim.book.pause(key.ref)
    assert commands == [
        SetHold(HOLD_PAUSED, True, queue=key.queue),
        ReleaseKeys("w1", (key.ref.id,)),
    ]
    sim.do(commands)
    assert sim.book.pause(key.ref) == []  # already paused
    sim.settle()
    assert key.state is KeyState.UNOWNED and not sim.holders(key.ref.id)
    assert sim.book.holds_of(key) == ["paused"] and sim.book.held(key)
    assert sim.book.rebalance(sim.time) == []
    assert sim.book.held_counts() == {"parked": 0, "paused": 1, "paused_job_types": 0}
    # its lease is renewed while it waits
    assert key in sim.book.leases_due(now=sim.time + 1_000, period=10.0)
    commands = sim.book.resume(key.ref)
    assert commands[0] == SetHold(HOLD_PAUSED, False, queue=key.queue)
    assert commands[1:] == [AssignKeys("w1", (key.assignment(),))]
    sim.do(commands)
    assert key.state is KeyState.OWNED and sim.holders(key.ref.id) == ["w1"]
    with pytest.raises(HoldRefused, match="not paused"):
        sim.book.resume(key.ref)
    with pytest.raises(HoldRefused, match="not known"):
        sim.book.resume(ref("nobody"))


def test_pausing_a_key_not_in_the_book_declares_it_held_and_counts_it_in_the_quota() -> None:
    sim = Sim(book=new_book(max_keys=1))
    sim.join("w1", frozenset("a"))
    commands = sim.book.pause(ref("new"))
    key = sim.book.keys[ref("new").id]
    assert commands == [DeclareAndBind(key.ref.id, key.ref, key.queue, key.epoch)]
    sim.do(commands)
    sim.complete(0, success=True)
    # its hold is bound once the queue exists; no worker gets it
    assert sim.bindings[key.queue] == {(HOLD_PAUSED, ())}
    assert key.state is KeyState.UNOWNED and key.owner is None and not sim.holders(key.ref.id)
    with pytest.raises(HoldRefused, match="RABBITKEYS_MAX_KEYS"):
        sim.book.pause(ref("another"))
    waiter = sim.ensure("new", "a", False)  # a publish to it is answered: it just waits
    assert sim.replies[waiter].routing_key == key.routing_key


def test_a_paused_job_type_releases_its_keys_at_the_next_rebalance_and_places_them_back() -> None:
    sim = Sim()
    for n in range(6):
        owned_key(sim, f"k{n}", workers=("w1", "w2"))
    sim.ensure("other", "b", False)
    sim.join("w3", frozenset("b"))
    sim.settle()
    before = {k: v.owner for k, v in sim.book.keys.items()}
    assert sim.book.pause_type("a") == [SetHold(HOLD_PAUSED, True, job_type="a"), Rebalance()]
    assert sim.book.pause_type("a") == []
    commands = sim.book.rebalance(sim.time)
    released = {k for c in commands if isinstance(c, ReleaseKeys) for k in c.key_ids}
    assert released == {k for k, v in sim.book.keys.items() if v.ref.job_type == "a"}
    sim.do(commands)
    sim.type_holds.add("a")
    sim.settle()
    held = [k for k in sim.book.keys.values() if k.ref.job_type == "a"]
    assert all(
        k.state is KeyState.UNOWNED and sim.book.holds_of(k) == ["type_paused"] for k in held
    )
    assert sim.book.keys[ref("other", "b").id].owner == "w3"
    assert sim.book.held_counts() == {"parked": 0, "paused": 6, "paused_job_types": 1}
    with pytest.raises(HoldRefused, match="its job type"):
        sim.book.resume(held[0].ref)
    assert sim.book.resume_type("a") == [SetHold(HOLD_PAUSED, False, job_type="a"), Rebalance()]
    with pytest.raises(HoldRefused, match="not paused"):
        sim.book.resume_type("a")
    sim.type_holds.discard("a")
    sim.settle()
    assert {k: v.owner for k, v in sim.book.keys.items()} == before


def test_a_held_key_reported_idle_is_not_retired() -> None:
    sim = Sim()
    key = owned_key(sim)
    sim.do(sim.book.pause_type("a"))  # the rebalance that releases it has not run yet
    assert sim.book.heartbeat("w1", 0, [key.ref.id], sim.time) == []
    assert key.state is KeyState.OWNED


def test_a_parked_key_waits_unowned_with_its_hold_bound_until_resumed() -> None:
    sim = Sim()
    key = owned_key(sim)
    parked = sim.book.key_parked("w1", key.ref, key.routing_key, PARKED, sim.time)
    assert parked == [SetHold(HOLD_PARKED, True, queue=key.queue, arguments=PARKED_ARGUMENTS)]
    assert key.parked == PARKED and key.owner == "w1"  # its Released follows
    assert sim.book.key_parked("w1", key.ref, None, PARKED, sim.time) == []  # repeated
    with pytest.raises(HoldRefused, match="not let go"):
        sim.book.skip(key.ref)
    sim.holds["w1"].discard(key.ref.id)
    assert sim.book.released("w1", [(key.ref, None)], sim.time) == []
    assert key.state is KeyState.UNOWNED and sim.book.holds_of(key) == ["parked"]
    assert sim.book.held_counts()["parked"] == 1
    commands = sim.book.resume(key.ref)  # its head is tried again, with fresh attempts
    assert commands == [
        SetHold(HOLD_PARKED, False, queue=key.queue, arguments=PARKED_ARGUMENTS),
        AssignKeys("w1", (key.assignment(),)),
    ]
    assert key.parked is None and key.state is KeyState.OWNED


def test_a_parked_key_whose_owner_is_gone_stays_unowned() -> None:
    sim = Sim()
    key = owned_key(sim, workers=("w1", "w2"))
    owner = key.owner
    assert owner is not None
    sim.park(owner, key.ref.id, attempts=3)
    sim.crash(owner)  # before its Released
    assert key.state is KeyState.UNOWNED and key.owner is None and key.parked is not None
    sim.settle()
    assert key.state is KeyState.UNOWNED and not sim.holders(key.ref.id)


def test_a_parked_report_from_a_worker_that_does_not_own_the_key_is_ignored() -> None:
    sim = Sim()
    key = owned_key(sim, workers=("w1", "w2"))
    other = "w2" if key.owner == "w1" else "w1"
    assert sim.book.key_parked(other, key.ref, None, PARKED, sim.time) == []
    assert key.parked is None
    # a key not in the book (parked on a registry that led before us): added, held
    unknown = ref("elsewhere")
    commands = sim.book.key_parked("w1", unknown, "rk7", PARKED, sim.time)
    added = sim.book.keys[unknown.id]
    assert commands == [SetHold(HOLD_PARKED, True, queue=added.queue, arguments=PARKED_ARGUMENTS)]
    assert added.state is KeyState.UNOWNED and added.routing_keys == ["rk7"]


def test_a_key_parked_again_keeps_one_parked_hold_the_newest() -> None:
    book = new_book()
    r = ref("k")
    book.key_parked("w1", r, "rk0", PARKED, 1.0)
    queue = book.keys[r.id].queue
    newer = Parked("KeyError: 'x'", 2, 1, "w2", 9)
    commands = book.key_parked("w2", r, "rk0", newer, 2.0)
    assert commands == [
        SetHold(HOLD_PARKED, False, queue=queue, arguments=PARKED_ARGUMENTS),
        SetHold(HOLD_PARKED, True, queue=queue, arguments=commands[1].arguments),  # type: ignore[union-attr]
    ]
    assert book.keys[r.id].parked == newer


def test_skipping_a_parked_head_dead_letters_it_then_places_the_key() -> None:
    sim = Sim()
    key = parked_key(sim)
    assert key.parked is not None
    commands = sim.book.skip(key.ref)
    assert commands == [
        SkipHead(
            key.ref.id,
            key.ref,
            key.queue,
            key.epoch,
            key.parked.error,
            key.parked.attempts,
            key.parked.job_index,
        )
    ]
    with pytest.raises(HoldRefused, match="under way"):
        sim.book.skip(key.ref)
    with pytest.raises(HoldRefused, match="under way"):
        sim.book.resume(key.ref)
    sim.do(commands)
    [skip] = sim.pending
    sim.complete(0, success=False)  # it failed: still parked, may be tried again
    assert key.parked is not None and key.skipping is None and key.state is KeyState.UNOWNED
    sim.do(sim.book.skip(key.ref))
    sim.complete(0, success=True)
    assert key.parked is None and key.state is KeyState.OWNED and sim.holders(key.ref.id)
    assert sim.bindings[key.queue] == set()
    assert sim.book.skipped(skip.key_id, skip.epoch, ok=True) == []  # once only


def test_a_skip_is_refused_unless_the_key_is_parked_and_let_go() -> None:
    sim = Sim()
    with pytest.raises(HoldRefused, match="not known"):
        sim.book.skip(ref("nobody"))
    key = owned_key(sim)
    with pytest.raises(HoldRefused, match="not parked"):
        sim.book.skip(key.ref)
    sim.do(sim.book.key_parked("w1", key.ref, None, PARKED, sim.time))
    with pytest.raises(HoldRefused, match="owned: its worker has not let go"):
        sim.book.skip(key.ref)


def test_a_redrive_releases_the_owner_then_rearranges_the_queue_unconsumed() -> None:
    sim = Sim()
    key = owned_key(sim)
    commands = sim.book.redrive(key.ref, "r1")
    assert commands == [ReleaseKeys("w1", (key.ref.id,))]  # its hold is bound once unconsumed
    sim.do(commands)
    with pytest.raises(HoldRefused, match=r"redrive .* under way"):
        sim.book.redrive(key.ref, "r2")
    assert sim.book.holds_of(key) == ["redrive"]
    sim.release(0)
    assert key.state is KeyState.REDRIVING and key.owner is None
    rearrange = Rearrange(key.ref.id, key.ref, key.queue, ("rk0",), key.epoch, "r1")
    assert sim.pending == [rearrange]
    assert sim.bindings[key.queue] == {(HOLD_REDRIVE, (("x-redrive", "r1"),))}
    # publishes come back (unbound): their ensures wait for the redrive
    waiter = sim.ensure("k", "a", stale=True)
    assert waiter not in sim.replies
    assert sim.book.rebalance(sim.time) == []
    commands = sim.book.rearranged(key.ref.id, key.epoch, True, ["rk0"])
    assert commands == [
        SetHold(HOLD_REDRIVE, False, queue=key.queue, arguments=(("x-redrive", "r1"),)),
        DeclareAndBind(key.ref.id, key.ref, key.queue, key.epoch),
    ]
    sim.pending.clear()
    sim.do(commands)
    assert key.routing_keys == [] and key.redrive is None
    sim.complete(0, success=True)
    assert sim.replies[waiter].routing_key == key.routing_key == "rk1"
    assert key.state is KeyState.OWNED and sim.holders(key.ref.id) == ["w1"]
    assert sim.book.rearranged(key.ref.id, key.epoch, True, []) == []  # stale


def test_a_redrive_of_a_key_not_in_the_book_declares_it_first() -> None:
    sim = Sim()
    sim.join("w1", frozenset("a"))
    sim.do(sim.book.redrive(ref("gone"), "r1"))
    key = sim.book.keys[ref("gone").id]
    assert key.state is KeyState.DECLARING
    sim.complete(0, success=True)
    assert key.state is KeyState.REDRIVING and not sim.holders(key.ref.id)
    [rearrange] = sim.pending
    assert isinstance(rearrange, Rearrange) and rearrange.routing_keys == ("rk0",)
    sim.complete(0, success=False)  # failed: its dead letters stay put; the key goes on
    assert key.redrive is None and key.state is KeyState.DECLARING
    sim.settle()
    assert key.state is KeyState.OWNED and sim.bindings[key.queue] == set()


def test_a_redrive_waits_for_a_skip_under_way_and_a_skip_for_a_redrive() -> None:
    sim = Sim()
    key = parked_key(sim)
    sim.do(sim.book.skip(key.ref))
    sim.do(sim.book.redrive(key.ref, "r1"))
    assert key.state is KeyState.UNOWNED  # not rearranged while its head is skipped
    with pytest.raises(HoldRefused):
        sim.book.skip(key.ref)
    sim.complete(0, success=True)  # skipped: now rearranged
    assert key.state is KeyState.REDRIVING and key.parked is None
    sim.settle()
    assert key.state is KeyState.OWNED


@pytest.mark.parametrize("when", ["grace", "releasing", "deleting kept", "deleting deleted"])
def test_a_retirement_that_finds_the_key_held_keeps_it(when: str) -> None:
    sim = Sim()
    key = owned_key(sim)
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=True)  # unbound
    if when == "grace":
        sim.do(sim.book.pause(key.ref))
        sim.complete(0, success=True)  # grace over: kept, its owner asked to let go
    else:
        sim.complete(0, success=True)  # grace over
        if when == "releasing":
            sim.do(sim.book.pause(key.ref))
        sim.release(0)
        if when.startswith("deleting"):
            assert key.state is KeyState.DELETING
            assert sim.book.pause(key.ref) == []  # bound once the outcome is known
            delete = next(i for i, c in enumerate(sim.pending) if isinstance(c, CheckAndDelete))
            # an empty queue is deleted, its bindings with it: the key starts again, held
            sim.complete(delete, success=when == "deleting deleted")
    sim.settle()
    kept = sim.book.keys[key.ref.id]
    assert kept.paused and kept.state is KeyState.UNOWNED and not sim.holders(key.ref.id)
    assert sim.bindings[kept.queue] == {(HOLD_PAUSED, ())}
    assert sim.retired == (1 if when == "deleting deleted" else 0)


def test_a_new_leader_reads_the_holds_back_and_places_no_held_key() -> None:
    book = new_book()
    book.joined("w1", ["a", "b"], [], 0.0)
    listed = [
        (ref("paused"), HOLD_PAUSED, {}),
        (ref("parked"), HOLD_PARKED, dict(PARKED_ARGUMENTS)),
        (ref("cut"), HOLD_REDRIVE, {"x-redrive": "r1"}),
        (ref("odd"), "frozen", {}),
    ]
    commands = book.holds_listed(listed, ["b"], 5.0)
    paused, parked, cut = (book.keys[ref(k).id] for k in ("paused", "parked", "cut"))
    assert paused.paused and paused.state is KeyState.UNOWNED
    assert parked.parked == PARKED  # the same as the worker reported
    assert book.paused_types == {"b"}
    assert cut.state is KeyState.REDRIVING
    assert [c for c in commands if isinstance(c, Rearrange)] == [
        Rearrange(cut.ref.id, cut.ref, cut.queue, (), cut.epoch, "r1")
    ]
    assert Rebalance() in commands
    assert not [c for c in commands if isinstance(c, AssignKeys)]
    assert book.rebalance(6.0) == []
    assert ref("odd").id not in book.keys
    assert book.leases_due(now=5.0 + 1, period=10.0) == []  # known to exist at 5.0


def test_two_parked_holds_read_back_keep_the_newest() -> None:
    book = new_book()
    newer = dict(PARKED_ARGUMENTS) | {"x-at": 9, "x-attempts": "6"}
    commands = book.holds_listed(
        [(ref("k"), HOLD_PARKED, dict(PARKED_ARGUMENTS)), (ref("k"), HOLD_PARKED, newer)], [], 1.0
    )
    key = book.keys[ref("k").id]
    assert key.parked == Parked("ValueError: 5", 6, 0, "w1", 9)
    assert commands == [
        SetHold(HOLD_PARKED, False, queue=key.queue, arguments=PARKED_ARGUMENTS),
    ]


def test_heartbeats_say_which_keys_are_failing_on_their_owner() -> None:
    sim = Sim()
    key = owned_key(sim)
    other = owned_key(sim, "k2")
    sim.book.heartbeat("w1", 0, [], 1.0, failing=[(key.ref.id, 2, "OSError: " + "x" * 2000)])
    assert key.failures == 2 and key.last_error is not None and len(key.last_error) == 1000
    assert other.failures == 0 and other.last_error is None
    sim.book.heartbeat("w2", 0, [], 1.0, failing=[(other.ref.id, 1, "no")])  # unknown worker
    sim.book.heartbeat("w1", 0, [], 2.0, failing=[(other.ref.id, 1, "E: 1")])
    assert key.failures == 0 and key.last_error is None
    assert other.failures == 1 and other.last_error == "E: 1"


def test_holds_are_named_in_one_order() -> None:
    book = new_book()
    book.holds_listed(
        [
            (ref("k"), HOLD_REDRIVE, {"x-redrive": "r"}),
            (ref("k"), HOLD_PARKED, dict(PARKED_ARGUMENTS)),
            (ref("k"), HOLD_PAUSED, {}),
        ],
        ["a"],
        0.0,
    )
    key = book.keys[ref("k").id]
    assert book.holds_of(key) == ["paused", "parked", "type_paused", "redrive"]
    assert book.held_counts() == {"parked": 1, "paused": 1, "paused_job_types": 1}


def token_ref(key: str, job_type: str = "a") -> KeyRef:
    """``key`` as a new leader first knows it: by its queue's name, so by its token."""
    return queue_ref(Names("t").key_queue(ref(key, job_type)))


LONG_KEY = "ключ/" * 113 + "x" * 7  # 1,024 bytes in UTF-8, the most a key may have


@pytest.mark.parametrize("text", ["post A", "été/ \"x\" 'y' \\ ✓", LONG_KEY, "k"])
def test_a_hold_carries_the_keys_text_and_a_new_leader_knows_the_key_by_it(text: str) -> None:
    sim = Sim()
    key = owned_key(sim, text)
    named = () if ref(text).token == text else (("x-rabbitkeys-key", text),)
    paused = sim.book.pause(key.ref)
    assert paused[0] == SetHold(HOLD_PAUSED, True, queue=key.queue, arguments=named)
    sim.do(paused)
    sim.park("w1", key.ref.id, attempts=5)
    sim.settle()
    assert sim.bindings[key.queue] == book_holds(key)
    sim.restart_registry()  # reads the holds back by queue name and binding arguments
    sim.settle()
    again = sim.book.keys[key.ref.id]
    assert again.ref == ref(text) and again.paused and again.parked is not None
    assert sim.bindings[key.queue] == book_holds(again)  # nothing bound anew
    resumed = sim.book.resume(ref(text))  # by the key's text, as an operator names it
    assert [c for c in resumed if isinstance(c, SetHold)] == [
        SetHold(HOLD_PAUSED, False, queue=key.queue, arguments=named),
        SetHold(HOLD_PARKED, False, queue=key.queue, arguments=named + PARKED_AT_ZERO),
    ]


PARKED_AT_ZERO = (*PARKED_ARGUMENTS[:-1], ("x-at", 0))


def test_a_hold_of_an_earlier_version_is_read_back_by_its_token_and_left_as_it_is() -> None:
    book = new_book()
    listed = token_ref("post A")
    commands = book.holds_listed(
        [(listed, HOLD_PAUSED, {}), (listed, HOLD_PARKED, dict(PARKED_ARGUMENTS))], [], 1.0
    )
    key = book.keys[listed.id]
    assert key.ref == listed and key.ref.key == key.ref.token  # its text is not known
    assert key.paused and key.parked == PARKED and commands == []
    # resumed by its text (the same id): the bindings are removed as they were made
    assert book.resume(ref("post A"))[:2] == [
        SetHold(HOLD_PAUSED, False, queue=key.queue),
        SetHold(HOLD_PARKED, False, queue=key.queue, arguments=PARKED_ARGUMENTS),
    ]


@pytest.mark.parametrize(
    "forged",
    ["post B", "post_A", 42, "\ud800", "x" * 2000, ""],
    ids=["another key", "the hint", "a number", "a lone surrogate", "too long", "empty"],
)
def test_a_hold_whose_text_is_not_its_keys_is_known_by_its_token_and_bound_again(
    forged: str | int,
) -> None:
    book = new_book()
    listed = token_ref("post A")
    commands = book.holds_listed([(listed, HOLD_PAUSED, {"x-rabbitkeys-key": forged})], [], 1.0)
    key = book.keys[listed.id]
    assert key.ref == listed and key.paused
    assert commands == [
        SetHold(HOLD_PAUSED, False, queue=key.queue, arguments=(("x-rabbitkeys-key", forged),)),
        SetHold(HOLD_PAUSED, True, queue=key.queue),
    ]


def test_a_key_whose_holds_disagree_is_known_by_the_text_one_of_them_tells() -> None:
    """One hold without the text (an earlier version's), one with it: the key is known by
    its text, and the first is bound again with it, so that a resume removes both."""
    book = new_book()
    listed = token_ref("post A")
    named = (("x-rabbitkeys-key", "post A"),)
    commands = book.holds_listed(
        [
            (listed, HOLD_PAUSED, {}),
            (listed, HOLD_PARKED, dict(named + PARKED_ARGUMENTS)),
        ],
        [],
        1.0,
    )
    key = book.keys[listed.id]
    assert key.ref == ref("post A")
    assert commands == [
        SetHold(HOLD_PAUSED, False, queue=key.queue),
        SetHold(HOLD_PAUSED, True, queue=key.queue, arguments=named),
    ]
    # a redrive hold cut by a crash, known by its text: bound again as it is rearranged
    book = new_book()
    commands = book.holds_listed([(listed, HOLD_REDRIVE, {"x-redrive": "r1"} | dict(named))], [], 1)
    key = book.keys[listed.id]
    assert key.ref == ref("post A") and key.state is KeyState.REDRIVING
    assert commands[0] == SetHold(
        HOLD_REDRIVE, True, queue=key.queue, arguments=(*named, ("x-redrive", "r1"))
    )
    assert isinstance(commands[1], Rearrange) and commands[1].ref == ref("post A")


def test_named_by_hold_checks_the_text_against_the_token() -> None:
    listed = token_ref("post A", "b")
    assert named_by_hold(listed, {"x-rabbitkeys-key": "post A"}) == ref("post A", "b")
    assert named_by_hold(listed, {}) is None
    assert named_by_hold(listed, {"x-rabbitkeys-key": "post a"}) is None
    assert named_by_hold(token_ref("k"), {"x-rabbitkeys-key": "k"}) == ref("k")


def test_a_job_type_paused_while_a_key_is_deleted_does_not_bring_the_key_back() -> None:
    sim = Sim()
    key = owned_key(sim)
    sim.idle("w1", key.ref.id)
    sim.complete(0, success=True)  # unbound
    sim.complete(0, success=True)  # grace over
    sim.release(0)
    assert key.state is KeyState.DELETING
    sim.do(sim.book.pause_type("a"))
    delete = next(i for i, c in enumerate(sim.pending) if isinstance(c, CheckAndDelete))
    sim.complete(delete, success=True)
    sim.settle()
    assert sim.retired == 1 and not sim.book.keys

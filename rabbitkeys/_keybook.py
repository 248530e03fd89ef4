"""The key book: the registry's knowledge of keys, workers and who consumes what, and the one
home of a key's lifecycle. Pure and synchronous: it imports no AMQP library and does no I/O.

Every event (an ensure, a worker's join, a queue declared, a delete's outcome...) is a method
call that changes the book and returns the :data:`Command` s that follow from it; the registry
(``_registry``) carries them out and reports their outcomes back as further events. So a
reader finds here, in one place, why a key is declared, assigned, moved or deleted, and the
property tests (``tests/test_keybook.py``) check the rules with no broker.

A key's life (:class:`KeyState`; docs/design.md has the table)::

    ensure ──> DECLARING ──declared──> OWNED / UNOWNED (placed on a worker, if one serves it)
                   │ declare failed: forgotten, waiters refused
    OWNED ──rebalance──> MOVING ──released──> OWNED by the target (or placed)
    OWNED ──idle──> UNBINDING ──> GRACE ──> RELEASING ──released──> DELETING ──> gone
                                                │ still busy after RELEASE_WAIT: MOVING
                                                                 └─ not empty: OWNED (kept)

Transitions happen only in :meth:`_Ledger._enter`. The rules they keep:

* a key has at most one owner, and a new owner is assigned a key only once the old one has
  reported it released (or is gone): never two consumers;
* a key queue is deleted only after it was unbound, the grace for messages already routed
  is over, and its owner released it (or is gone); the broker then checks it is empty;
* a key being declared or retired is neither placed nor moved; ensures for it wait and are
  answered when that ends;
* the quota counts every key in the book, whatever its state, until it is forgotten.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import _assignment
from ._protocol import (
    REFUSED_QUOTA_EXCEEDED,
    REFUSED_UNAVAILABLE,
    KeyAssignment,
    Status,
    WorkerStatus,
)
from ._topology import KeyRef

__all__ = [
    "RELEASE_WAIT",
    "AssignKeys",
    "CheckAndDelete",
    "Command",
    "DeclareAndBind",
    "HandoffDone",
    "RETIRING",
    "Key",
    "KeyBook",
    "KeyState",
    "KeyTable",
    "Rebalance",
    "ReleaseKeys",
    "Reply",
    "Retired",
    "Parked",
    "Rearrange",
    "SetHold",
    "SkipHead",
    "SyncWorker",
    "Unbind",
    "WaitGrace",
    "WaitRelease",
    "WorkerRecord",
]

log = logging.getLogger("rabbitkeys.registry")

#: How long retirement waits for the owner to settle its in-flight message and let go.
RELEASE_WAIT = 60.0


class KeyState(enum.Enum):
    #: its queue is being declared and bound (a new key, or one that lost its binding)
    DECLARING = "declaring"
    #: known, no worker consumes it (none serves its job type yet, or it was just freed)
    UNOWNED = "unowned"
    #: one worker consumes it
    OWNED = "owned"
    #: its owner was asked to release it; the target (if any) gets it once released
    MOVING = "moving"
    #: retiring, 1: its bindings are being removed
    UNBINDING = "unbinding"
    #: retiring, 2: messages routed before the unbind may still be landing in the queue
    GRACE = "grace"
    #: retiring, 3: its owner was asked to settle what it holds and release it
    RELEASING = "releasing"
    #: retiring, 4: the broker deletes the queue if it is empty and unconsumed
    DELETING = "deleting"
    #: unbound and unconsumed while dead letters are put back at the head of its queue
    #: (``rabbitkeys redrive``); ensures wait
    REDRIVING = "redriving"


RETIRING = frozenset({KeyState.UNBINDING, KeyState.GRACE, KeyState.RELEASING, KeyState.DELETING})
#: keys a rebalance may place or move (not while their queue is declared or retired)
_PLACEABLE = frozenset({KeyState.UNOWNED, KeyState.OWNED, KeyState.MOVING})


# --- commands: what the registry carries out -------------------------------------------


@dataclass(frozen=True)
class DeclareAndBind:
    """Declare the key's queue and bind it with a fresh routing key; report
    :meth:`KeyBook.declared` or :meth:`KeyBook.declare_failed`."""

    key_id: str
    ref: KeyRef
    queue: str
    epoch: int


@dataclass(frozen=True)
class Unbind:
    """Remove these bindings of the key's queue; report :meth:`KeyBook.unbound`."""

    key_id: str
    ref: KeyRef
    queue: str
    routing_keys: tuple[str, ...]
    epoch: int


@dataclass(frozen=True)
class WaitGrace:
    """Wait ``retire_grace``; report :meth:`KeyBook.grace_over`."""

    key_id: str
    epoch: int


@dataclass(frozen=True)
class WaitRelease:
    """Wait :data:`RELEASE_WAIT`; report :meth:`KeyBook.release_wait_over`."""

    key_id: str
    epoch: int


@dataclass(frozen=True)
class CheckAndDelete:
    """Delete the queue if it is empty and unconsumed; report :meth:`KeyBook.delete_outcome`."""

    key_id: str
    queue: str
    epoch: int


@dataclass(frozen=True)
class AssignKeys:
    worker_id: str
    keys: tuple[KeyAssignment, ...]


@dataclass(frozen=True)
class ReleaseKeys:
    worker_id: str
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class SyncWorker:
    """Ask a worker the book does not know to join again (with its keys)."""

    worker_id: str


@dataclass(frozen=True)
class Reply:
    """Answer an ensure: a routing key, or a refusal (``reason``; ``code`` for quotas)."""

    waiter: int
    routing_key: str | None = None
    reason: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Rebalance:
    """Membership or the keys changed: rebalance soon (:meth:`KeyBook.rebalance`)."""


@dataclass(frozen=True)
class Retired:
    key_id: str


@dataclass(frozen=True)
class HandoffDone:
    seconds: float


@dataclass(frozen=True)
class SetHold:
    """Record a hold durably, or remove it (``add`` False): bind (unbind) the key's
    ``queue``, or for a whole ``job_type`` its jobs exchange, to ``Names.holds_exchange``
    with routing key ``hold`` (``HOLD_PAUSED``, ``HOLD_PARKED``, ``HOLD_REDRIVE``) and
    ``arguments`` (a removal carries the arguments the binding was made with). No event
    follows; a failure is logged (a registry that takes over would not know this hold)."""

    hold: str
    add: bool
    queue: str | None = None
    job_type: str | None = None
    arguments: tuple[tuple[str, str | int], ...] = ()


@dataclass(frozen=True)
class SkipHead:
    """A parked key, unconsumed: dead-letter its head (the jobs from ``job_index`` on, each
    alone, with the parked error and attempts), then ack it; report
    :meth:`KeyBook.skipped`."""

    key_id: str
    ref: KeyRef
    queue: str
    epoch: int
    error: str
    attempts: int
    job_index: int


@dataclass(frozen=True)
class Rearrange:
    """A key in REDRIVING (no consumer): remove ``routing_keys`` (publishes come back to
    their publishers, whose ensures wait), wait ``retire_grace`` for messages already
    routed, then put redrive ``redrive_id``'s dead letters at the head of the queue, before
    what waits there, in their order; report :meth:`KeyBook.rearranged`."""

    key_id: str
    ref: KeyRef
    queue: str
    routing_keys: tuple[str, ...]
    epoch: int
    redrive_id: str


Command = (
    DeclareAndBind
    | Unbind
    | WaitGrace
    | WaitRelease
    | CheckAndDelete
    | AssignKeys
    | ReleaseKeys
    | SyncWorker
    | Reply
    | Rebalance
    | Retired
    | HandoffDone
    | SetHold
    | SkipHead
    | Rearrange
)


# --- the records ------------------------------------------------------------------------


@dataclass(eq=False)
class WorkerRecord:
    worker_id: str
    job_types: frozenset[str]
    last_seen: float
    keys: set[str] = field(default_factory=set)
    #: deliveries it holds that no handler has started (from its last heartbeat)
    waiting: int = 0


@dataclass(frozen=True)
class Parked:
    """Why a key is parked: its head failed every attempt (``KeyParked``)."""

    error: str
    attempts: int
    #: which job of the head delivery failed (0 for a plain message)
    job_index: int
    worker_id: str
    #: when, Unix time in whole seconds
    at: int


@dataclass(eq=False)
class Key:
    ref: KeyRef
    queue: str
    state: KeyState
    #: routing keys bound to the queue now; the newest is what publishers are told
    routing_keys: list[str] = field(default_factory=list)
    #: the worker consuming the key (while MOVING or retiring: still settling it)
    owner: str | None = None
    #: MOVING: the worker that gets the key once the owner reports it released
    target: str | None = None
    #: DECLARING: the ownership state to go back to once declared (OWNED or MOVING)
    resume: KeyState = KeyState.UNOWNED
    #: DECLARING: the queue had been lost; its owner must be assigned it again
    recreated: bool = False
    #: its last declare found the queue unavailable (on a cluster, its node is down)
    unavailable: bool = False
    #: ensures waiting for a declare or a retirement to end
    waiters: list[int] = field(default_factory=list)
    #: counts declares and retirements: a late outcome of an earlier one is ignored
    epoch: int = 0
    last_lease_renewal: float = 0.0
    #: when a move (not a retirement) asked the owner to release the key
    move_started: float | None = None
    #: holds: while any is set (or its job type is paused) no worker is given the key,
    #: and it is never retired
    paused: bool = False
    parked: Parked | None = None
    #: the id of a redrive that wants (or is putting) dead letters at its head
    redrive: str | None = None
    #: its head is failing now on its owner (from heartbeats): attempts, last error
    failures: int = 0
    last_error: str | None = None

    @property
    def routing_key(self) -> str | None:
        return self.routing_keys[-1] if self.routing_keys else None

    def assignment(self, *, fresh: bool = False) -> KeyAssignment:
        """What a worker is told; ``fresh`` only right after the queue's declare-ok."""
        return KeyAssignment(
            key_id=self.ref.id,
            job_type=self.ref.job_type,
            key=self.ref.key,
            queue=self.queue,
            routing_key=self.routing_key,
            fresh=fresh,
        )


class KeyTable(dict[str, Key]):
    """The live keys by id, counting their job types as keys come and go (the job-type
    quota is checked on every new key: it must not walk 50,000 keys each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.job_types: Counter[str] = Counter()

    def __setitem__(self, key_id: str, key: Key) -> None:
        if key_id in self:
            self._uncount(self[key_id])
        super().__setitem__(key_id, key)
        self.job_types[key.ref.job_type] += 1

    def __delitem__(self, key_id: str) -> None:
        self._uncount(self[key_id])
        super().__delitem__(key_id)

    def _uncount(self, key: Key) -> None:
        self.job_types[key.ref.job_type] -= 1
        if self.job_types[key.ref.job_type] <= 0:
            del self.job_types[key.ref.job_type]

    def pop(self, key_id: str, *default: Any) -> Any:
        if key_id in self:
            self._uncount(self[key_id])
        return super().pop(key_id, *default)

    def clear(self) -> None:
        super().clear()
        self.job_types.clear()

    # Mutators that bypass __setitem__/__delitem__ would break the count.
    def setdefault(self, *_: object) -> Key:
        raise NotImplementedError

    def update(self, *_: object, **__: object) -> None:
        raise NotImplementedError

    def popitem(self) -> tuple[str, Key]:
        raise NotImplementedError


# --- the book ---------------------------------------------------------------------------


class _Ledger:
    """The records (keys and workers), what is read from them, and the one place a key
    changes state (:meth:`_enter`). The events are :class:`KeyBook`'s."""

    def __init__(
        self,
        queue_of: Callable[[KeyRef], str],
        *,
        namespace: str,
        max_keys: int,
        max_job_types: int,
    ) -> None:
        self._queue_of = queue_of
        self._namespace = namespace
        self._max_keys = max_keys
        self._max_job_types = max_job_types
        self.keys = KeyTable()
        self.workers: dict[str, WorkerRecord] = {}

    # --- reading ----------------------------------------------------------------------

    def count(self, *states: KeyState) -> int:
        return sum(1 for k in self.keys.values() if k.state in states)

    def unassigned(self) -> int:
        return sum(1 for k in self.keys.values() if k.owner is None)

    def retiring(self) -> int:
        return self.count(*RETIRING)

    def unavailable(self) -> int:
        """Keys whose queue was unavailable when last declared (its cluster node down)."""
        return sum(1 for k in self.keys.values() if k.unavailable)

    def status(self, registry_id: str, backlog: dict[str, int] | None, now: float) -> Status:
        """The leader's view for ``rabbitkeys status``; ``backlog``: ready messages per key,
        if asked for (what workers hold but have not started is backlog too)."""
        counted = backlog or {}
        workers = [
            WorkerStatus(
                worker_id=w.worker_id,
                job_types=sorted(w.job_types),
                keys=len(w.keys),
                backlog=(
                    sum(counted.get(k, 0) for k in w.keys) + w.waiting
                    if backlog is not None
                    else None
                ),
                last_seen_seconds=round(now - w.last_seen, 3),
            )
            for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
        ]
        return Status(
            namespace=self._namespace,
            registry_id=registry_id,
            workers=workers,
            keys=len(self.keys),
            unassigned_keys=self.unassigned(),
            retiring_keys=self.retiring(),
            backlog=(
                sum(counted.values()) + sum(w.waiting for w in self.workers.values())
                if backlog is not None
                else None
            ),
        )

    def leases_due(self, now: float, period: float) -> list[Key]:
        """Keys no worker consumes whose queue's ``x-expires`` lease wants renewing (a key
        being declared or retired is looked after by that)."""
        return [
            k
            for k in self.keys.values()
            if k.state is KeyState.UNOWNED and now - k.last_lease_renewal > period
        ]

    def silent_workers(self, seen_before: float) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.last_seen < seen_before]

    # --- the one place a key changes state ---------------------------------------------

    def _enter(self, key: Key, state: KeyState) -> None:
        if state is KeyState.DECLARING or (
            state is KeyState.UNBINDING and key.state not in RETIRING
        ):
            key.epoch += 1  # a new declare or retirement: earlier outcomes are stale
        if state in (KeyState.OWNED, KeyState.UNOWNED):  # a move ends
            key.target, key.move_started = None, None
        key.state = state

    def _set_owner(self, key: Key, owner: str | None) -> None:
        if key.owner is not None and key.owner in self.workers:
            self.workers[key.owner].keys.discard(key.ref.id)
        key.owner = owner
        if owner is not None:
            self.workers[owner].keys.add(key.ref.id)

    def _new_key(
        self, ref: KeyRef, state: KeyState, routing_key: str | None = None, now: float = 0.0
    ) -> Key:
        """A key new to the book; ``now``: when its queue is known to exist (its lease)."""
        key = self.keys[ref.id] = Key(ref, self._queue_of(ref), state, last_lease_renewal=now)
        if routing_key:
            key.routing_keys.append(routing_key)
        return key

    def _forget(self, key: Key) -> None:
        self._set_owner(key, None)
        del self.keys[key.ref.id]

    def _current(self, key_id: str, epoch: int, *states: KeyState) -> Key | None:
        """The key an outcome is about, if it is still in the state that asked for it."""
        key = self.keys.get(key_id)
        if key is None or key.epoch != epoch or key.state not in states:
            return None
        return key

    def _place(self, key: Key, *, fresh: bool = False) -> list[Command]:
        """Give an unowned key to a worker, without moving any other key."""
        eligible = [w for w, s in self.workers.items() if key.ref.job_type in s.job_types]
        loads = {w: len(self.workers[w].keys) for w in eligible}
        owner = _assignment.pick(key.ref.id, eligible, loads, sum(loads.values()) + 1)
        return self._give(key, owner, fresh=fresh)

    def _give(self, key: Key, owner: str | None, *, fresh: bool = False) -> list[Command]:
        self._set_owner(key, owner)
        if owner is None:
            self._enter(key, KeyState.UNOWNED)
            return []
        self._enter(key, KeyState.OWNED)
        return [AssignKeys(owner, (key.assignment(fresh=fresh),))]

    def still_connected(self, worker_id: str, now: float) -> None:
        """Its heartbeats are late but its connection lives: look again later."""
        if worker_id in self.workers:
            self.workers[worker_id].last_seen = now

    # --- the broker's view ----------------------------------------------------------------

    def adopt_listed(self, ref: KeyRef, consumers: int, bound: list[str], now: float) -> bool:
        """A key queue the broker lists: adopt it if nobody consumes it (whether it was
        adopted) and learn its bindings. Merge, never replace: a binding made after the
        listing must not be forgotten, or a retirement would delete a queue that still
        routes."""
        key = self.keys.get(ref.id)
        adopted = False
        if key is None:
            if consumers:
                return False  # a worker consumes it; it reports it on its next join
            key = self._new_key(ref, KeyState.UNOWNED, now=now)
            adopted = True
        if key.state in _PLACEABLE:
            key.routing_keys[:0] = [rk for rk in bound if rk not in key.routing_keys]
        return adopted

    def lease_renewed(self, key_id: str, now: float) -> None:
        if (key := self.keys.get(key_id)) is not None:
            key.last_lease_renewal = now
            self.queue_reachable(key_id)  # the passive declare reached it

    def queue_reachable(self, key_id: str) -> None:
        """A key's queue answered a (passive) declare: it is not unavailable (any more)."""
        key = self.keys.get(key_id)
        if key is not None and key.unavailable:
            key.unavailable = False
            log.warning("key %s: its queue is available again", key_id)

    def queue_lost(self, key_id: str) -> bool:
        """A key's queue is not there (expired, or deleted by an operator). Only a key in
        no declare or retirement is ours to drop (a retirement may have just deleted it)."""
        key = self.keys.get(key_id)
        if key is None or key.state not in _PLACEABLE:
            return False
        self._forget(key)
        return True


class KeyBook(_Ledger):
    """What the leading registry knows; each event returns the commands that follow.

    ``queue_of`` names a key's queue (``Names.key_queue``); ``max_keys`` and
    ``max_job_types`` are the quotas an ensure of a new key is checked against.
    """

    # --- ensures and declares ------------------------------------------------------------

    def ensure(self, ref: KeyRef, stale_routing_key: str | None, waiter: int) -> list[Command]:
        """A publisher needs a routing key for ``ref``; ``waiter`` gets the :class:`Reply`."""
        key = self.keys.get(ref.id)
        if key is None:
            refused = self._beyond_quota(ref)
            if refused is not None:
                return [Reply(waiter, reason=refused, code=REFUSED_QUOTA_EXCEEDED)]
            key = self._new_key(ref, KeyState.UNOWNED)
            key.waiters.append(waiter)
            return self._declare(key)
        if key.state is KeyState.DECLARING or key.state in RETIRING:
            key.waiters.append(waiter)  # answered when that ends
            return []
        current = key.routing_key
        if current is not None and current != stale_routing_key:
            return [Reply(waiter, routing_key=current)]
        key.recreated = current is not None
        if key.recreated and not key.unavailable:
            # A message came back on the newest binding: the queue was deleted under us
            # (x-expires or an operator), or, on a cluster, its node is down (then the
            # declare fails "unavailable", and the queue comes back with the node, bindings
            # and all). Its routing keys stay in the book either way: a retirement unbinds
            # every one it knows (unbinding a binding that is gone is a no-op), and one it
            # forgot could route a publish into a queue being deleted.
            log.warning("key %s: a message came back on its binding; declaring it again", ref.id)
        key.waiters.append(waiter)
        return self._declare(key)

    def _declare(self, key: Key) -> list[Command]:
        # how the key is held now, to go back to once declared (see _resume)
        held = key.state in (KeyState.OWNED, KeyState.MOVING)
        key.resume = key.state if held else KeyState.UNOWNED
        self._enter(key, KeyState.DECLARING)
        return [DeclareAndBind(key.ref.id, key.ref, key.queue, key.epoch)]

    def _beyond_quota(self, ref: KeyRef) -> str | None:
        """Refuse a new key once the namespace holds ``max_keys`` keys, or if it would bring
        a job type beyond ``max_job_types``. Every key in the book counts, whatever its state
        (one being retired until its queue is gone); keys adopted from workers or the broker
        are never refused (their queues exist), so a lowered limit is reached again as keys
        retire."""
        if len(self.keys) >= self._max_keys:
            return (
                f"namespace {self._namespace!r} holds {len(self.keys):,} live keys, its "
                f"limit (RABBITKEYS_MAX_KEYS={self._max_keys:,}); a key frees its place when "
                "it is retired, after RABBITKEYS_IDLE_PERIOD without traffic"
            )
        if (
            ref.job_type not in self.keys.job_types
            and len(self.keys.job_types) >= self._max_job_types
        ):
            return (
                f"namespace {self._namespace!r} has live keys of "
                f"{len(self.keys.job_types):,} job types, its limit "
                f"(RABBITKEYS_MAX_JOB_TYPES={self._max_job_types:,}); job type "
                f"{ref.job_type!r} would be one more"
            )
        return None

    def declared(self, key_id: str, epoch: int, routing_key: str, now: float) -> list[Command]:
        key = self._current(key_id, epoch, KeyState.DECLARING)
        if key is None:
            return []
        key.routing_keys.append(routing_key)
        key.last_lease_renewal = now
        self.queue_reachable(key_id)
        recreated, key.recreated = key.recreated, False
        # The queue exists as of this declare-ok: a worker given the key now need not check
        # it (``KeyAssignment.fresh``).
        commands = self._resume(key, fresh=True)
        if recreated and key.state is KeyState.OWNED and not commands:
            # the queue was recreated: its old consumer was cancelled by the broker
            assert key.owner is not None
            commands.append(AssignKeys(key.owner, (key.assignment(fresh=True),)))
        return commands + self._answer(key, routing_key)

    def declare_failed(
        self, key_id: str, epoch: int, reason: str, code: str | None
    ) -> list[Command]:
        """A key nothing routes to and no worker consumes is forgotten, so that no worker is
        told to consume a queue that may not exist; one a worker consumes stays as it was
        (forgetting it would let a later ensure give it a second consumer). Every ensure
        waiting for it gets the reason."""
        key = self._current(key_id, epoch, KeyState.DECLARING)
        if key is None:
            return []
        waiters, key.waiters = key.waiters, []
        key.recreated = False
        if code == REFUSED_UNAVAILABLE and not key.unavailable:
            key.unavailable = True
            log.warning("key %s: %s; its publishes wait for it", key_id, reason)
        commands: list[Command] = [Reply(w, reason=reason, code=code) for w in waiters]
        if key.routing_keys or (key.owner is not None and key.owner in self.workers):
            return self._resume(key) + commands
        self._forget(key)
        return commands

    def _resume(self, key: Key, *, fresh: bool = False) -> list[Command]:
        """Out of DECLARING: held as before (its owner, a move under way), or placed."""
        if key.owner is not None and key.owner in self.workers:
            moving = key.resume is KeyState.MOVING
            self._enter(key, KeyState.MOVING if moving else KeyState.OWNED)
            return []
        return self._place(key, fresh=fresh)

    def _answer(self, key: Key, routing_key: str) -> list[Command]:
        waiters, key.waiters = key.waiters, []
        return [Reply(w, routing_key=routing_key) for w in waiters]

    # --- retiring an idle key -------------------------------------------------------------

    def _retire(self, key_id: str, reporter: str) -> list[Command]:
        """The owner reports the key idle: start retiring it (only a key it plainly owns)."""
        key = self.keys.get(key_id)
        if key is None or key.state is not KeyState.OWNED or key.owner != reporter:
            return []
        self._enter(key, KeyState.UNBINDING)
        # from here on, publishes come back to their publisher
        return [Unbind(key_id, key.ref, key.queue, tuple(key.routing_keys), key.epoch)]

    def unbound(self, key_id: str, epoch: int, removed: Iterable[str], ok: bool) -> list[Command]:
        key = self._current(key_id, epoch, KeyState.UNBINDING)
        if key is None:
            return []
        gone = set(removed)
        key.routing_keys = [rk for rk in key.routing_keys if rk not in gone]
        if not ok:  # the retirement ends; the key stays with what is still bound
            return self._end_retirement(key, [])
        self._enter(key, KeyState.GRACE)
        return [WaitGrace(key_id, key.epoch)]

    def grace_over(self, key_id: str, epoch: int) -> list[Command]:
        key = self._current(key_id, epoch, KeyState.GRACE)
        if key is None:
            return []
        if key.owner is None:  # released meanwhile, or its worker is gone
            self._enter(key, KeyState.DELETING)
            return [CheckAndDelete(key_id, key.queue, key.epoch)]
        # The owner settles what it holds (acks what it handled, requeues the rest) and
        # reports the key released; only then do the queue's counts tell the truth.
        self._enter(key, KeyState.RELEASING)
        return [ReleaseKeys(key.owner, (key_id,)), WaitRelease(key_id, key.epoch)]

    def release_wait_over(self, key_id: str, epoch: int) -> list[Command]:
        key = self._current(key_id, epoch, KeyState.RELEASING)
        if key is None:
            return []
        # A long handler: leave the handoff open; its Released places the key.
        log.info("key %s: owner still busy after %gs; not retired", key_id, RELEASE_WAIT)
        self._enter(key, KeyState.MOVING)
        return self._after_retirement(key, [])

    def delete_outcome(self, key_id: str, epoch: int, deleted: bool) -> list[Command]:
        """``deleted``: the queue is gone (deleted now, or already). Otherwise something
        arrived meanwhile: the key is kept, consumed and unbound; the next publish comes
        back, and its ensure binds the key again behind these messages."""
        key = self._current(key_id, epoch, KeyState.DELETING)
        if key is None:
            return []
        if not deleted:
            return self._end_retirement(key, [])
        waiters = key.waiters
        self._forget(key)
        commands: list[Command] = [Retired(key_id), Rebalance()]
        if waiters:  # ensures that waited for the retirement: a new key, from the start
            fresh = self._new_key(key.ref, KeyState.UNOWNED)
            fresh.waiters = waiters
            commands += self._declare(fresh)
        return commands

    def _end_retirement(self, key: Key, commands: list[Command]) -> list[Command]:
        if key.owner is not None and key.owner in self.workers:
            self._enter(key, KeyState.OWNED)
        else:
            commands += self._place(key)
        return self._after_retirement(key, commands)

    def _after_retirement(self, key: Key, commands: list[Command]) -> list[Command]:
        commands.append(Rebalance())  # whatever happened, the key gets a home
        if key.waiters and key.routing_key is not None:  # an unbind failed: still bound
            commands += self._answer(key, key.routing_key)
        elif key.waiters:  # ensures waited for the retirement: bind the key again
            commands += self._declare(key)
        return commands

    # --- workers ----------------------------------------------------------------------------

    def joined(
        self,
        worker_id: str,
        job_types: Iterable[str],
        reported: Iterable[tuple[KeyRef, str | None]],
        now: float,
    ) -> list[Command]:
        """A worker joins, or says again which keys it consumes (after a registry restart)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(worker_id, frozenset(job_types), now)
            log.info("worker %s joined (%s)", worker_id, ", ".join(sorted(worker.job_types)))
        worker.last_seen = now
        commands: list[Command] = [Rebalance()]
        for ref, routing_key in reported:
            key = self.keys.get(ref.id) or self._new_key(ref, KeyState.UNOWNED, routing_key, now)
            if key.owner is None or key.owner not in self.workers:
                self._set_owner(key, worker_id)
                if key.state is KeyState.UNOWNED:
                    self._enter(key, KeyState.OWNED)
            elif key.owner != worker_id:
                commands.append(ReleaseKeys(worker_id, (ref.id,)))
        return commands

    def heartbeat(
        self, worker_id: str, waiting: int, idle: Iterable[str], now: float
    ) -> list[Command]:
        worker = self.workers.get(worker_id)
        if worker is None:
            # We do not know it (we started after it joined): ask it to join again.
            return [SyncWorker(worker_id)]
        worker.last_seen = now
        worker.waiting = waiting
        return [c for key_id in idle for c in self._retire(key_id, worker_id)]

    def gone(self, worker_id: str) -> list[Command]:
        """A worker left or was lost. Its connection is gone (or it let go of every key
        before leaving), so nothing consumes its keys any more: they can go elsewhere."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return []
        commands: list[Command] = [Rebalance()]
        for key_id in worker.keys:
            key = self.keys.get(key_id)
            if key is None:
                continue
            key.owner = None
            if key.state in (KeyState.OWNED, KeyState.MOVING):
                self._enter(key, KeyState.UNOWNED)
            elif key.state is KeyState.DECLARING:
                key.resume = KeyState.UNOWNED
            elif key.state is KeyState.RELEASING:
                self._enter(key, KeyState.DELETING)
                commands.append(CheckAndDelete(key_id, key.queue, key.epoch))
            # UNBINDING, GRACE: the retirement goes on with no owner to wait for
        return commands

    def released(
        self, worker_id: str, keys: Iterable[tuple[KeyRef, str | None]], now: float
    ) -> list[Command]:
        """The worker has settled these keys and no longer consumes them: hand them on."""
        commands: list[Command] = []
        for ref, routing_key in keys:
            key = self.keys.get(ref.id)
            if key is None:
                # Released to a registry that led before us: adopt the key, or it would sit
                # unconsumed until its queue expires.
                key = self._new_key(ref, KeyState.UNOWNED, routing_key, now)
                commands += self._place(key)
                continue
            if key.owner != worker_id:
                continue  # stale: the key moved or retired meanwhile
            if key.move_started is not None:
                commands.append(HandoffDone(now - key.move_started))
                key.move_started = None
            self._set_owner(key, None)
            if key.state is KeyState.MOVING:
                target = key.target
                if target is not None and target in self.workers:
                    commands += self._give(key, target)
                else:
                    commands += self._place(key)
            elif key.state is KeyState.OWNED:  # let go on its own (its queue was deleted...)
                commands += self._place(key)
            elif key.state is KeyState.RELEASING:
                self._enter(key, KeyState.DELETING)
                commands.append(CheckAndDelete(key.ref.id, key.queue, key.epoch))
            elif key.state is KeyState.DECLARING:
                key.resume = KeyState.UNOWNED  # placed once declared
            # UNBINDING, GRACE: the retirement goes on with no owner to wait for
        return commands

    # --- rebalancing ------------------------------------------------------------------------

    def rebalance(self, now: float) -> list[Command]:
        """Spread keys over the workers again. A key that moves is first released by its
        owner, which settles what it holds and reports it released; only then is it
        assigned to the new owner (see :meth:`released`). Never two consumers at once."""
        by_type: dict[str, list[Key]] = defaultdict(list)
        for key in self.keys.values():
            if key.state in _PLACEABLE:  # keys being declared or retired come afterwards
                by_type[key.ref.job_type].append(key)
        assigns: dict[str, list[KeyAssignment]] = defaultdict(list)
        releases: dict[str, list[str]] = defaultdict(list)
        for job_type, keys in by_type.items():
            eligible = [w for w, s in self.workers.items() if job_type in s.job_types]
            desired = _assignment.assign((k.ref.id for k in keys), eligible)
            for key in keys:
                new_owner = desired.get(key.ref.id)
                if key.state is KeyState.MOVING:
                    key.target = new_owner
                elif new_owner == key.owner:
                    continue
                elif key.owner is None:
                    if new_owner is not None:
                        self._give(key, new_owner)
                        assigns[new_owner].append(key.assignment())
                else:
                    releases[key.owner].append(key.ref.id)
                    self._enter(key, KeyState.MOVING)
                    key.target, key.move_started = new_owner, now
        commands: list[Command] = [ReleaseKeys(w, tuple(ids)) for w, ids in releases.items()]
        commands += [AssignKeys(w, tuple(a)) for w, a in assigns.items()]
        return commands

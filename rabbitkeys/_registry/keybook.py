"""The key book: the registry's knowledge of keys, workers and who consumes what, and the one
home of a key's lifecycle. Pure and synchronous: it imports no AMQP library and does no I/O.

Every event (an ensure, a worker's join, a queue declared, a delete's outcome...) is a method
call that changes the book and returns the :data:`Command` s that follow from it; the registry
(``_registry.registry``) carries them out and reports their outcomes back as further events. So a
reader finds here, in one place, why a key is declared, assigned, moved or deleted, and the
property tests (``tests/test_keybook.py``) check the rules with no broker.

A key's life (:class:`KeyState`; docs/internals/registry.md has the table)::

    ensure ──> DECLARING ──declared──> OWNED / UNOWNED (placed on a worker, if one serves it)
                   │ declare failed: forgotten, waiters refused
    OWNED ──rebalance──> MOVING ──released──> OWNED by the target (or placed)
    OWNED ──idle──> UNBINDING ──> GRACE ──> RELEASING ──released──> DELETING ──> gone
                                                │ still busy after RELEASE_WAIT: MOVING
                                                                 └─ not empty: OWNED (kept)
    held (paused, parked, type paused, redrive): OWNED ──> MOVING (to nobody) ──> UNOWNED
    UNOWNED + redrive ──> REDRIVING ──rearranged──> DECLARING (bound afresh) ──> placed
    UNOWNED + parked ──skip──> (SkipHead) ──skipped──> placed;  resume: placed

A key is *held* while it is paused, parked, wanted by a redrive, or its job type is paused
(:meth:`KeyBook.holds_of`): no worker is given it, a rebalance asks its owner to release it,
and it is never retired (a retirement that finds it held ends, keeping the key). Holds are
recorded durably by :class:`SetHold` (bindings on ``Names.holds_exchange``) and read back by
a new leader (:meth:`KeyBook.holds_listed`).

Transitions happen only in :meth:`_Ledger._enter`. The rules they keep:

* a key has at most one owner, and a new owner is assigned a key only once the old one has
  reported it released (or is gone): never two consumers;
* a key queue is deleted only after it was unbound, the grace for messages already routed
  is over, and its owner released it (or is gone); the broker then checks it is empty;
* a key being declared, retired or redriven is neither placed nor moved; ensures for it
  wait and are answered when that ends;
* a held key is never given to a worker nor deleted; a key's head is skipped or its queue
  rearranged only while no worker consumes it;
* the quota counts every key in the book, whatever its state, until it is forgotten.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidKeyError
from .._wire.protocol import (
    REFUSED_QUOTA_EXCEEDED,
    REFUSED_UNAVAILABLE,
    KeyAssignment,
    Status,
    WorkerStatus,
)
from .._wire.topology import (
    HOLD_PARKED,
    HOLD_PAUSED,
    HOLD_REDRIVE,
    KeyRef,
    check_key,
    key_matches_token,
)
from . import assignment

__all__ = [
    "HOLD_KEY_ARGUMENT",
    "RELEASE_WAIT",
    "AssignKeys",
    "CheckAndDelete",
    "Command",
    "DeclareAndBind",
    "HandoffDone",
    "HoldRefused",
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
    "named_by_hold",
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
#: keys whose ensures wait (answered when the declare, retirement or redrive ends)
_WAITING = frozenset({KeyState.DECLARING, KeyState.REDRIVING, *RETIRING})
#: the holds :meth:`KeyBook.holds_of` names, in its order
_HOLD_NAMES = ("paused", "parked", "type_paused", "redrive")
#: the longest error a parked hold keeps (a binding argument)
_MAX_ERROR = 1000
#: The binding argument in which a key's hold carries the key's text: its queue's name has
#: only the key's token (a hashed one for most keys), and a new leader knows a held key by
#: what its hold bindings tell (:meth:`KeyBook.holds_listed`).
HOLD_KEY_ARGUMENT = "x-rabbitkeys-key"


class HoldRefused(Exception):
    """An operator request the book refuses; str() is the detail shown to the operator."""


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
    ``arguments`` (a removal carries the arguments the binding was made with). A key's
    hold carries the key's text first (:data:`HOLD_KEY_ARGUMENT`, :func:`_hold_arguments`).
    No event follows; a failure is logged (a registry that takes over would not know this
    hold)."""

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
    #: its keys whose head was failing at its last heartbeat
    failing: set[str] = field(default_factory=set)


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


def _parked_arguments(parked: Parked) -> tuple[tuple[str, str | int], ...]:
    """A parked hold's binding arguments (str and int only: they read back the same)."""
    return (
        ("x-error", parked.error),
        ("x-attempts", parked.attempts),
        ("x-job-index", parked.job_index),
        ("x-worker", parked.worker_id),
        ("x-at", parked.at),
    )


def _parked_from(arguments: Mapping[str, str | int]) -> Parked:
    """A parked hold read back from its binding's arguments (:func:`_parked_arguments`)."""

    def number(name: str) -> int:
        try:
            return int(arguments.get(name, 0))
        except (TypeError, ValueError):
            return 0

    return Parked(
        error=str(arguments.get("x-error", ""))[:_MAX_ERROR],
        attempts=number("x-attempts"),
        job_index=number("x-job-index"),
        worker_id=str(arguments.get("x-worker", "")),
        at=number("x-at"),
    )


def _redrive_arguments(redrive_id: str) -> tuple[tuple[str, str | int], ...]:
    return (("x-redrive", redrive_id),)


_Arguments = tuple[tuple[str, str | int], ...]


def _bound_with(text: object, arguments: _Arguments) -> _Arguments:
    """A key hold's binding arguments: :data:`HOLD_KEY_ARGUMENT` first (``text``; none if
    None), then the hold's own."""
    if isinstance(text, str | int) and not isinstance(text, bool):
        return ((HOLD_KEY_ARGUMENT, text), *arguments)
    return arguments


def _hold_arguments(ref: KeyRef, arguments: _Arguments = ()) -> _Arguments:
    """What the book binds a hold of ``ref``'s queue with: the key's text, unless the key
    is its own token (a plain key: the queue's name tells it) or is known by its token
    only (adopted from the broker, or read back from a hold that did not tell its text)."""
    return _bound_with(None if ref.key == ref.token else ref.key, arguments)


def _hold(key: Key, hold: str, add: bool, arguments: _Arguments = ()) -> SetHold:
    """Bind (unbind) one hold of the key's queue, with the key's text."""
    return SetHold(hold, add, queue=key.queue, arguments=_hold_arguments(key.ref, arguments))


def _described(ref: KeyRef) -> str:
    """A key for the logs: its id, and its text if that is not its token."""
    return ref.id if ref.key == ref.token else f"{ref.id} ({ref.key!r})"


def named_by_hold(ref: KeyRef, arguments: Mapping[str, str | int]) -> KeyRef | None:
    """The key a hold binding of ``ref``'s queue names (its :data:`HOLD_KEY_ARGUMENT`), if
    that text stands for the queue's token; else None (no text, or one that is not the
    key's: the management API's word is checked, not taken). ``ref`` is the key as the
    queue's name tells it (``Names.key_of_queue``)."""
    text = arguments.get(HOLD_KEY_ARGUMENT)
    if not isinstance(text, str):
        return None
    try:
        check_key(text)
    except InvalidKeyError:
        return None
    if not key_matches_token(text, ref.token):
        return None
    return KeyRef(ref.job_type, text, ref.token)


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
    #: a skip of its head is under way (``SkipHead`` sent with this epoch): not placed,
    #: not rearranged, not resumed until :meth:`KeyBook.skipped`
    skipping: int | None = None
    #: its queue has existed (declared, listed, consumed): a failed declare does not
    #: forget it while it is held (its holds are bindings of that queue)
    queue_seen: bool = False

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
        #: job types paused as a whole (a hold on each of their keys)
        self.paused_types: set[str] = set()

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
        held = self.held_counts()
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
            parked_keys=held["parked"],
            paused_keys=held["paused"],
            paused_job_types=sorted(self.paused_types),
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

    def holds_of(self, key: Key) -> list[str]:
        """Why no worker may take the key now: ``paused``, ``parked``, ``type_paused``,
        ``redrive`` (in this order), or none."""
        present = (
            key.paused,
            key.parked is not None,
            key.ref.job_type in self.paused_types,
            key.redrive is not None,
        )
        return [name for name, on in zip(_HOLD_NAMES, present, strict=True) if on]

    def held(self, key: Key) -> bool:
        """No worker may be given the key, and it is never retired (see :meth:`holds_of`;
        a skip of its head under way holds it too)."""
        return (
            key.paused
            or key.parked is not None
            or key.redrive is not None
            or key.skipping is not None
            or key.ref.job_type in self.paused_types
        )

    def held_counts(self) -> dict[str, int]:
        """For the gauges: parked keys, keys paused (by themselves or by their job type),
        job types paused."""
        parked = paused = 0
        for key in self.keys.values():
            parked += key.parked is not None
            paused += key.paused or key.ref.job_type in self.paused_types
        return {"parked": parked, "paused": paused, "paused_job_types": len(self.paused_types)}

    # --- the one place a key changes state ---------------------------------------------

    def _enter(self, key: Key, state: KeyState) -> None:
        if state in (KeyState.DECLARING, KeyState.REDRIVING) or (
            state is KeyState.UNBINDING and key.state not in RETIRING
        ):
            key.epoch += 1  # a new declare, retirement or redrive: earlier outcomes are stale
        if state in (KeyState.OWNED, KeyState.UNOWNED):  # a move ends
            key.target, key.move_started = None, None
        key.state = state

    def _set_owner(self, key: Key, owner: str | None) -> None:
        if key.owner is not None and key.owner in self.workers:
            self.workers[key.owner].keys.discard(key.ref.id)
        if owner != key.owner:  # what failed on the old owner is its heartbeats' to tell
            key.failures, key.last_error = 0, None
        key.owner = owner
        if owner is not None:
            self.workers[owner].keys.add(key.ref.id)

    def _new_key(
        self,
        ref: KeyRef,
        state: KeyState,
        routing_key: str | None = None,
        now: float = 0.0,
        *,
        seen: bool = False,
    ) -> Key:
        """A key new to the book; ``now``: when its queue is known to exist (its lease);
        ``seen``: its queue exists (a worker, the broker or a hold told us)."""
        key = self.keys[ref.id] = Key(
            ref, self._queue_of(ref), state, last_lease_renewal=now, queue_seen=seen
        )
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
        """Give an unowned key to a worker, without moving any other key (none if held)."""
        if self.held(key):
            return self._give(key, None)
        eligible = [w for w, s in self.workers.items() if key.ref.job_type in s.job_types]
        loads = {w: len(self.workers[w].keys) for w in eligible}
        owner = assignment.pick(key.ref.id, eligible, loads, sum(loads.values()) + 1)
        return self._give(key, owner, fresh=fresh)

    def _give(self, key: Key, owner: str | None, *, fresh: bool = False) -> list[Command]:
        if owner is not None and self.held(key):
            owner = None
        self._set_owner(key, owner)
        if owner is None:
            return self._unowned(key)
        self._enter(key, KeyState.OWNED)
        return [AssignKeys(owner, (key.assignment(fresh=fresh),))]

    def _unowned(self, key: Key) -> list[Command]:
        """No worker consumes the key (its owner is None): it waits UNOWNED or, wanted by a
        redrive (and its head not being skipped), it is rearranged: REDRIVING.

        The redrive hold is bound only now, the key unconsumed: a leader that reads it back
        (:meth:`holds_listed`) finishes a redrive cut by a crash on a queue no worker
        consumes. A redrive cut before this point left its dead letters unacked in the
        dead-letter queue: nothing to finish."""
        if key.redrive is not None and key.skipping is None:
            self._enter(key, KeyState.REDRIVING)
            arguments = _redrive_arguments(key.redrive)
            return [
                _hold(key, HOLD_REDRIVE, True, arguments),
                Rearrange(
                    key.ref.id,
                    key.ref,
                    key.queue,
                    tuple(key.routing_keys),
                    key.epoch,
                    key.redrive,
                ),
            ]
        self._enter(key, KeyState.UNOWNED)
        return []

    def _let_go(self, key: Key) -> list[Command]:
        """A held key's owner is asked to release it; nobody gets it next."""
        if key.state is KeyState.MOVING:
            key.target = None
        elif key.state is KeyState.OWNED and key.owner is not None:
            self._enter(key, KeyState.MOVING)
            return [ReleaseKeys(key.owner, (key.ref.id,))]
        return []

    def _hold_commands(self, key: Key) -> list[Command]:
        """Bind the key's holds (again: binding is idempotent), once its queue exists (a
        redrive's hold is bound as it enters REDRIVING: :meth:`_unowned`)."""
        return [
            SetHold(hold, True, queue=key.queue, arguments=arguments)
            for hold, arguments in self._hold_bindings(key)
            if hold != HOLD_REDRIVE
        ]

    @staticmethod
    def _hold_bindings(key: Key) -> list[tuple[str, _Arguments]]:
        """The hold bindings the key's queue should have, each with its arguments."""
        bindings: list[tuple[str, _Arguments]] = []
        if key.paused:
            bindings.append((HOLD_PAUSED, _hold_arguments(key.ref)))
        if key.parked is not None:
            parked = _parked_arguments(key.parked)
            bindings.append((HOLD_PARKED, _hold_arguments(key.ref, parked)))
        if key.redrive is not None:
            redrive = _redrive_arguments(key.redrive)
            bindings.append((HOLD_REDRIVE, _hold_arguments(key.ref, redrive)))
        return bindings

    def _bind_hold(self, key: Key, command: SetHold) -> list[Command]:
        """A hold added now is bound at once if the key's queue surely exists; while it is
        declared or deleted, the outcome binds it (:meth:`_hold_commands`)."""
        if key.state in (KeyState.DECLARING, KeyState.DELETING):
            return []
        return [command]

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
        if key.state in _WAITING:
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
        key.queue_seen = True
        self.queue_reachable(key_id)
        recreated, key.recreated = key.recreated, False
        # its holds are bindings of the queue: bind them (again, if it was recreated)
        holds = self._hold_commands(key)
        # The queue exists as of this declare-ok: a worker given the key now need not check
        # it (``KeyAssignment.fresh``).
        commands = self._resume(key, fresh=True)
        if recreated and key.state is KeyState.OWNED and not commands:
            # the queue was recreated: its old consumer was cancelled by the broker
            assert key.owner is not None
            commands.append(AssignKeys(key.owner, (key.assignment(fresh=True),)))
        return holds + commands + self._answer(key, routing_key)

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
        if (
            key.routing_keys
            or (key.owner is not None and key.owner in self.workers)
            or (key.queue_seen and self.held(key))  # its holds live on its queue
        ):
            # kept: its queue exists (most likely); holds added meanwhile are bound now
            return self._hold_commands(key) + self._resume(key) + commands
        self._forget(key)
        return commands

    def _resume(self, key: Key, *, fresh: bool = False) -> list[Command]:
        """Out of DECLARING: held as before (its owner, a move under way), or placed. A
        held key's owner is asked to release it."""
        if key.owner is not None and key.owner in self.workers:
            moving = key.resume is KeyState.MOVING
            self._enter(key, KeyState.MOVING if moving else KeyState.OWNED)
            return self._let_go(key) if self.held(key) else []
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
        if self.held(key):  # a held key keeps its queue and messages
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
        if self.held(key):  # held meanwhile: kept
            return self._end_retirement(key, [])
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
        if not deleted:  # (holds added meanwhile are bound now: the queue is there)
            return self._end_retirement(key, self._hold_commands(key))
        waiters = key.waiters
        self._forget(key)
        commands: list[Command] = [Retired(key_id), Rebalance()]
        if waiters or key.paused or key.parked is not None or key.redrive is not None:
            # Ensures that waited for the retirement, or holds added while the queue was
            # deleted (an operator paused it, a redrive wants it): a new key, from the
            # start, with those holds (bound once it is declared). A paused job type
            # holds no key that is gone.
            fresh = self._new_key(key.ref, KeyState.UNOWNED)
            fresh.waiters = waiters
            fresh.paused, fresh.parked, fresh.redrive = key.paused, key.parked, key.redrive
            commands += self._declare(fresh)
        return commands

    def _end_retirement(self, key: Key, commands: list[Command]) -> list[Command]:
        if key.owner is not None and key.owner in self.workers:
            self._enter(key, KeyState.OWNED)
            if self.held(key):
                commands += self._let_go(key)
        else:
            commands += self._place(key)
        return self._after_retirement(key, commands)

    def _after_retirement(self, key: Key, commands: list[Command]) -> list[Command]:
        commands.append(Rebalance())  # whatever happened, the key gets a home
        if key.state is KeyState.REDRIVING:
            pass  # its waiters are answered once it is bound again
        elif key.waiters and key.routing_key is not None:  # an unbind failed: still bound
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
            key = self.keys.get(ref.id) or self._new_key(
                ref, KeyState.UNOWNED, routing_key, now, seen=True
            )
            if key.state is KeyState.REDRIVING:
                # its queue is being rearranged, unconsumed: the worker must let go
                commands.append(ReleaseKeys(worker_id, (ref.id,)))
            elif key.owner is None or key.owner not in self.workers:
                self._set_owner(key, worker_id)
                if key.state is KeyState.UNOWNED:
                    self._enter(key, KeyState.OWNED)
            elif key.owner != worker_id:
                commands.append(ReleaseKeys(worker_id, (ref.id,)))
        return commands

    def heartbeat(
        self,
        worker_id: str,
        waiting: int,
        idle: Iterable[str],
        now: float,
        failing: Iterable[tuple[str, int, str]] = (),
    ) -> list[Command]:
        """``failing``: (key id, attempts, last error) of the worker's keys whose head is
        between attempts now; its other keys are not failing (any more)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            # We do not know it (we started after it joined): ask it to join again.
            return [SyncWorker(worker_id)]
        worker.last_seen = now
        worker.waiting = waiting
        failing_now: set[str] = set()
        for key_id, attempts, error in failing:
            key = self.keys.get(key_id)
            if key is not None and key.owner == worker_id:
                key.failures, key.last_error = attempts, error[:_MAX_ERROR]
                failing_now.add(key_id)
        for key_id in worker.failing - failing_now:
            key = self.keys.get(key_id)
            if key is not None and key.owner == worker_id:
                key.failures, key.last_error = 0, None
        worker.failing = failing_now
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
            key.failures, key.last_error = 0, None
            if key.state in (KeyState.OWNED, KeyState.MOVING):
                commands += self._unowned(key)  # (a key a redrive waits for: REDRIVING)
            elif key.state is KeyState.DECLARING:
                key.resume = KeyState.UNOWNED
            elif key.state is KeyState.RELEASING:
                commands += self._let_go_of_retiring(key)
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
                key = self._new_key(ref, KeyState.UNOWNED, routing_key, now, seen=True)
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
                commands += self._let_go_of_retiring(key)
            elif key.state is KeyState.DECLARING:
                key.resume = KeyState.UNOWNED  # placed once declared
            # UNBINDING, GRACE: the retirement goes on with no owner to wait for
        return commands

    def _let_go_of_retiring(self, key: Key) -> list[Command]:
        """RELEASING, and its owner let go (or is gone): delete the queue if empty, unless
        the key was held meanwhile (then it is kept)."""
        if self.held(key):
            return self._end_retirement(key, [])
        self._enter(key, KeyState.DELETING)
        return [CheckAndDelete(key.ref.id, key.queue, key.epoch)]

    # --- rebalancing ------------------------------------------------------------------------

    def rebalance(self, now: float) -> list[Command]:
        """Spread keys over the workers again. A key that moves is first released by its
        owner, which settles what it holds and reports it released; only then is it
        assigned to the new owner (see :meth:`released`). Never two consumers at once.
        A held key goes to nobody: its owner is asked to release it."""
        by_type: dict[str, list[Key]] = defaultdict(list)
        for key in self.keys.values():
            if key.state in _PLACEABLE:  # keys being declared or retired come afterwards
                by_type[key.ref.job_type].append(key)
        assigns: dict[str, list[KeyAssignment]] = defaultdict(list)
        releases: dict[str, list[str]] = defaultdict(list)
        for job_type, keys in by_type.items():
            eligible = [w for w, s in self.workers.items() if job_type in s.job_types]
            free = (k.ref.id for k in keys if not self.held(k))
            desired = assignment.assign(free, eligible)
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

    # --- holds: park, pause, skip, redrive --------------------------------------------------

    def key_parked(
        self, worker_id: str, ref: KeyRef, routing_key: str | None, parked: Parked, now: float
    ) -> list[Command]:
        """The key's head failed its last attempt on ``worker_id`` (policy ``park``): the
        worker has put the head back and lets the key go (its ``Released`` follows, which
        leaves the key UNOWNED). A report from a worker that is not the key's owner, while
        another worker owns it, is stale and ignored."""
        parked = Parked(
            error=parked.error[:_MAX_ERROR],
            attempts=parked.attempts,
            job_index=parked.job_index,
            worker_id=parked.worker_id,
            at=int(parked.at),
        )
        key = self.keys.get(ref.id)
        if key is None:  # parked on a registry that led before us: its queue exists
            key = self._new_key(ref, KeyState.UNOWNED, routing_key, now, seen=True)
        elif key.owner is not None and key.owner != worker_id:
            log.info("key %s: parked by %s, but %s owns it; ignored", ref.id, worker_id, key.owner)
            return []
        if key.parked == parked:
            return []
        commands: list[Command] = []
        if key.parked is not None:  # parked again: one parked binding, the newest
            arguments = _parked_arguments(key.parked)
            commands.append(_hold(key, HOLD_PARKED, False, arguments))
        key.parked = parked
        log.warning(
            "key %s parked after %d attempts on %s: %s",
            ref.id,
            parked.attempts,
            worker_id,
            parked.error,
        )
        hold = _hold(key, HOLD_PARKED, True, _parked_arguments(parked))
        commands += self._bind_hold(key, hold)
        if key.state is KeyState.UNOWNED:
            commands += self._unowned(key)
        elif key.owner != worker_id:
            commands += self._let_go(key)
        # its owner's Released follows: then it stays UNOWNED
        return commands

    def _new_held_key(self, ref: KeyRef) -> Key:
        """A key an operator names before it exists (a pause, a redrive): new to the book,
        to be declared like an ensure's, within the quotas (else :class:`HoldRefused`)."""
        refused = self._beyond_quota(ref)
        if refused is not None:
            raise HoldRefused(refused)
        return self._new_key(ref, KeyState.UNOWNED)

    def pause(self, ref: KeyRef) -> list[Command]:
        """An operator pauses a key: no worker gets it until it is resumed. A key not in
        the book is declared (as an ensure with no waiter would) and paused."""
        key = self.keys.get(ref.id)
        if key is None:
            key = self._new_held_key(ref)
            key.paused = True
            return self._declare(key)  # its hold is bound once declared
        if key.paused:
            return []
        key.paused = True
        commands = self._bind_hold(key, _hold(key, HOLD_PAUSED, True))
        return commands + self._let_go(key)

    def resume(self, ref: KeyRef) -> list[Command]:
        """An operator resumes a paused or parked key (a parked one's head is tried again,
        with fresh attempts): both holds are cleared and the key is placed."""
        key = self.keys.get(ref.id)
        if key is None:
            raise HoldRefused(f"key {ref.key!r} of job type {ref.job_type!r} is not known")
        if not key.paused and key.parked is None:
            if ref.job_type in self.paused_types:
                raise HoldRefused(
                    f"key {ref.key!r} is not paused itself: its job type {ref.job_type!r} is "
                    "(resume the job type)"
                )
            raise HoldRefused(f"key {ref.key!r} of job type {ref.job_type!r} is not paused")
        if key.skipping is not None:
            raise HoldRefused(f"a skip of key {ref.key!r}'s head is under way")
        commands: list[Command] = []
        if key.paused:
            key.paused = False
            commands.append(_hold(key, HOLD_PAUSED, False))
        if key.parked is not None:
            arguments = _parked_arguments(key.parked)
            key.parked = None
            commands.append(_hold(key, HOLD_PARKED, False, arguments))
        return commands + self._place_unowned(key)

    def pause_type(self, job_type: str) -> list[Command]:
        """An operator pauses a whole job type: the next rebalance releases its keys."""
        if job_type in self.paused_types:
            return []
        self.paused_types.add(job_type)
        return [SetHold(HOLD_PAUSED, True, job_type=job_type), Rebalance()]

    def resume_type(self, job_type: str) -> list[Command]:
        if job_type not in self.paused_types:
            raise HoldRefused(f"job type {job_type!r} is not paused")
        self.paused_types.discard(job_type)
        return [SetHold(HOLD_PAUSED, False, job_type=job_type), Rebalance()]

    def skip(self, ref: KeyRef) -> list[Command]:
        """An operator skips a parked key's head: it is dead-lettered (:class:`SkipHead`),
        then the key is resumed (:meth:`skipped`). Only once its owner has let go of it."""
        key = self.keys.get(ref.id)
        name = f"key {ref.key!r} of job type {ref.job_type!r}"
        if key is None:
            raise HoldRefused(f"{name} is not known")
        if key.parked is None:
            raise HoldRefused(f"{name} is not parked: only a parked key's head is skipped")
        if key.skipping is not None:
            raise HoldRefused(f"a skip of {name}'s head is under way")
        if key.redrive is not None:
            raise HoldRefused(f"a redrive of {name} is under way; skip it afterwards")
        if key.owner is not None:
            raise HoldRefused(
                f"{name} is {key.state.value}: its worker has not let go of it yet; try again"
            )
        if key.state is not KeyState.UNOWNED:
            raise HoldRefused(f"{name} is {key.state.value} now; try again in a moment")
        key.skipping = key.epoch
        parked = key.parked
        return [
            SkipHead(
                key.ref.id,
                key.ref,
                key.queue,
                key.epoch,
                parked.error,
                parked.attempts,
                parked.job_index,
            )
        ]

    def skipped(self, key_id: str, epoch: int, ok: bool) -> list[Command]:
        """The outcome of a :class:`SkipHead`: done, the key is no longer parked and is
        placed; failed, it stays parked (the operator may try again)."""
        key = self.keys.get(key_id)
        if key is None or key.skipping is None or key.skipping != epoch:
            return []
        key.skipping = None
        commands: list[Command] = []
        if ok and key.parked is not None:
            arguments = _parked_arguments(key.parked)
            key.parked = None
            commands.append(_hold(key, HOLD_PARKED, False, arguments))
        elif not ok:
            log.warning("key %s: skipping its head failed; still parked", key_id)
        return commands + self._place_unowned(key)

    def redrive(self, ref: KeyRef, redrive_id: str) -> list[Command]:
        """A redrive wants to put dead letters at the key's head: the key is held, its
        owner released, and once nobody consumes it, it is REDRIVING (its hold bound, then
        :class:`Rearrange`). A key not in the book is declared first."""
        key = self.keys.get(ref.id)
        if key is not None and key.redrive is not None:
            raise HoldRefused(
                f"a redrive of key {ref.key!r} of job type {ref.job_type!r} is under way "
                f"({key.redrive})"
            )
        if key is None:
            key = self._new_held_key(ref)
            key.redrive = redrive_id
            return self._declare(key)  # REDRIVING once declared
        key.redrive = redrive_id
        if key.state is KeyState.UNOWNED:
            return self._unowned(key)
        # owned: released first; declared or retired: when that ends
        return self._let_go(key)

    def rearranged(
        self, key_id: str, epoch: int, ok: bool, removed: Iterable[str]
    ) -> list[Command]:
        """The outcome of a :class:`Rearrange` (``removed``: the routing keys it unbound).
        Either way the redrive is over (if it failed, its dead letters stay in the
        dead-letter queue: run it again); the key is bound afresh and placed."""
        key = self._current(key_id, epoch, KeyState.REDRIVING)
        if key is None:
            return []
        gone = set(removed)
        key.routing_keys = [rk for rk in key.routing_keys if rk not in gone]
        if not ok:
            log.warning("key %s: redrive %s failed; run it again", key_id, key.redrive)
        commands: list[Command] = []
        if key.redrive is not None:
            arguments = _redrive_arguments(key.redrive)
            key.redrive = None
            commands.append(_hold(key, HOLD_REDRIVE, False, arguments))
        return commands + self._declare(key)

    def holds_listed(
        self,
        keys: Iterable[tuple[KeyRef, str, Mapping[str, str | int]]],
        job_types: Iterable[str],
        now: float,
    ) -> list[Command]:
        """The holds read back from the broker as a registry starts to lead (the bindings
        of ``Names.holds_exchange``): (key as its queue's name tells it, hold, binding
        arguments), and the paused job types. A key not in the book is added UNOWNED (its
        queue exists); one with a redrive hold is REDRIVING (the redrive was cut: its
        :class:`Rearrange` finishes it).

        A key is known by the text its holds carry (:func:`named_by_hold`), else by its
        token (a hold recorded by an earlier version, or one whose text is not the key's).
        Each key's hold bindings are then made what the book would bind: one parked hold,
        the newest, and one redrive; the key's text as the book knows it (so a hold without
        it, or with a text that is not the key's, is bound again)."""
        commands: list[Command] = []
        for job_type in job_types:
            if job_type not in self.paused_types:
                self.paused_types.add(job_type)
                commands.append(Rebalance())
        touched: dict[str, Key] = {}
        listed: defaultdict[str, list[tuple[str, _Arguments]]] = defaultdict(list)
        for ref, hold, arguments in keys:
            if hold not in (HOLD_PAUSED, HOLD_PARKED, HOLD_REDRIVE):
                log.warning("key %s: unknown hold %r ignored", ref.id, hold)
                continue
            named = named_by_hold(ref, arguments)
            if named is None and HOLD_KEY_ARGUMENT in arguments:
                log.warning(
                    "key %s: its %s hold names it %.80r, which is not the key of its queue: "
                    "known by its token",
                    ref.id,
                    hold,
                    arguments[HOLD_KEY_ARGUMENT],
                )
            named = named or ref
            key = self.keys.get(ref.id)
            if key is None:
                key = self._new_key(named, KeyState.UNOWNED, now=now, seen=True)
            elif key.ref.key == key.ref.token and named.key != named.token:
                key.ref = named  # known by its token until now
            own: _Arguments = ()
            if hold == HOLD_PAUSED:
                key.paused = True
            elif hold == HOLD_PARKED:
                parked = _parked_from(arguments)
                own = _parked_arguments(parked)
                if key.parked is None or parked.at >= key.parked.at:
                    key.parked = parked  # two parked bindings (a removal failed): the newest
            else:
                redrive_id = str(arguments.get("x-redrive", ""))
                own = _redrive_arguments(redrive_id)
                if key.redrive is None:
                    key.redrive = redrive_id  # one redrive at a time
            listed[ref.id].append((hold, _bound_with(arguments.get(HOLD_KEY_ARGUMENT), own)))
            touched[ref.id] = key
        for key_id, key in touched.items():
            wanted = self._hold_bindings(key)
            for hold, bound in listed[key_id]:
                if (hold, bound) not in wanted:
                    commands.append(SetHold(hold, False, queue=key.queue, arguments=bound))
            for hold, bound in wanted:
                # a redrive's hold is bound as the key enters REDRIVING (_unowned)
                if hold != HOLD_REDRIVE and (hold, bound) not in listed[key_id]:
                    add = SetHold(hold, True, queue=key.queue, arguments=bound)
                    commands += self._bind_hold(key, add)
            log.info("key %s held: %s", _described(key.ref), ", ".join(self.holds_of(key)))
            if key.state is KeyState.UNOWNED:
                commands += self._unowned(key)
            else:
                commands += self._let_go(key)
        return commands

    def _place_unowned(self, key: Key) -> list[Command]:
        """A hold was lifted: an unowned key is placed now (others are by what they wait
        for: a release, a declare, a retirement, a redrive)."""
        if key.state is KeyState.UNOWNED:
            return self._place(key)
        return []

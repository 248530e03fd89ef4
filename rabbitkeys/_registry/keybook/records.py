"""The key book's records: a key's states (:class:`KeyState`), what the book keeps of a key
(:class:`Key`, in a :class:`KeyTable`) and of a worker (:class:`WorkerRecord`), and why a key
is parked (:class:`Parked`). Plain data: the ledger changes them, the event families read
them; no events are handled here."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..._wire.protocol import KeyAssignment
from ..._wire.topology import KeyRef

__all__ = [
    "PLACEABLE",
    "RETIRING",
    "WAITING",
    "Key",
    "KeyState",
    "KeyTable",
    "Parked",
    "WorkerRecord",
]


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
PLACEABLE = frozenset({KeyState.UNOWNED, KeyState.OWNED, KeyState.MOVING})
#: keys whose ensures wait (answered when the declare, retirement or redrive ends)
WAITING = frozenset({KeyState.DECLARING, KeyState.REDRIVING, *RETIRING})


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

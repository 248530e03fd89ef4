"""The key book's commands: what the registry carries out (``_registry.runner``) after an
event, each a frozen dataclass; the ones that need an answer name the event that reports
their outcome (:meth:`KeyBook.declared` for :class:`DeclareAndBind`, ...). No events are
handled here."""

from __future__ import annotations

from dataclasses import dataclass

from ..._wire.protocol import KeyAssignment
from ..._wire.topology import KeyRef

__all__ = [
    "AssignKeys",
    "CheckAndDelete",
    "Command",
    "DeclareAndBind",
    "HandoffDone",
    "RELEASE_WAIT",
    "Rearrange",
    "Rebalance",
    "ReleaseKeys",
    "Reply",
    "Retired",
    "SetHold",
    "SkipHead",
    "SyncWorker",
    "Unbind",
    "WaitGrace",
    "WaitRelease",
]


#: How long retirement waits for the owner to settle its in-flight message and let go.
RELEASE_WAIT = 60.0


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
    hold carries the key's text first (``hold_bindings``: :data:`HOLD_KEY_ARGUMENT`,
    :func:`hold_arguments`). No event follows; a failure is logged (a registry that takes
    over would not know this hold)."""

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

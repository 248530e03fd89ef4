"""The key book: the registry's knowledge of keys, workers and who consumes what, and the one
home of a key's lifecycle. Pure and synchronous: it imports no AMQP library and does no I/O.

Every event (an ensure, a worker's join, a queue declared, a delete's outcome...) is a method
call on :class:`KeyBook`, handed to its family's module, that changes the book and returns
the :data:`Command` s that follow from it; the registry (``_registry.registry``) carries them
out and reports their outcomes back as further events. So a reader finds here, in one
package, why a key is declared, assigned, moved or deleted, and the property tests
(``tests/registry/test_keybook.py``) check the rules with no broker.

Its modules: ``records`` (:class:`KeyState`, :class:`Key`, :class:`KeyTable`,
:class:`WorkerRecord`, :class:`Parked`), ``commands`` (what the registry carries out),
``hold_bindings`` (what a hold binding carries, written and read back), ``ledger`` (the
records, what is read from them, the one place a key changes state, and the steps the
event families share), one module per event family over it: ``declare`` (ensures and the
declares they start), ``members`` (workers joining, beating, leaving, releasing; the
rebalance), ``retire`` (an idle key's retirement), ``holds`` (park, pause, skip, redrive,
and the holds a new leader reads back), ``broker_view`` (queues the broker lists, leases,
lost queues); and ``book`` (:class:`KeyBook`, the ledger with the events, each handed to
its family).

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

Transitions happen only in :meth:`.ledger.Ledger._enter`. The rules they keep:

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

from .book import KeyBook
from .commands import (
    RELEASE_WAIT,
    AssignKeys,
    CheckAndDelete,
    Command,
    DeclareAndBind,
    HandoffDone,
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
)
from .hold_bindings import HOLD_KEY_ARGUMENT, named_by_hold
from .holds import HoldRefused
from .records import RETIRING, Key, KeyState, KeyTable, Parked, WorkerRecord

__all__ = [
    "AssignKeys",
    "CheckAndDelete",
    "Command",
    "DeclareAndBind",
    "HOLD_KEY_ARGUMENT",
    "HandoffDone",
    "HoldRefused",
    "Key",
    "KeyBook",
    "KeyState",
    "KeyTable",
    "Parked",
    "RELEASE_WAIT",
    "RETIRING",
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
    "WorkerRecord",
    "named_by_hold",
]

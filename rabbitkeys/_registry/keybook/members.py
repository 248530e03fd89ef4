"""The key book's members family: the workers, and how keys spread over them. Events:
``joined`` (a worker joins, or reports its keys again to a new leader), ``heartbeat`` (it is
alive; which of its keys' heads are failing), ``still_connected`` (late heartbeats, a live
connection), ``gone`` (it left or was lost: its keys are unowned), ``released`` (it let go
of keys: they are handed on, or a retirement goes on) and ``rebalance`` (keys spread over
the workers again: moves start with a release, never two consumers).

Each event is a function of the book (the :class:`~.ledger.Ledger`) returning the commands
that follow (``heartbeat``: whether the book knows the worker; the keys a heartbeat reports
idle are ``retire``'s); :class:`~rabbitkeys._registry.keybook.KeyBook` calls them."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

from ..._wire.protocol import KeyAssignment
from ..._wire.topology import KeyRef
from .. import assignment
from .commands import AssignKeys, Command, HandoffDone, Rebalance, ReleaseKeys
from .hold_bindings import MAX_ERROR
from .ledger import Ledger
from .records import PLACEABLE, Key, KeyState, WorkerRecord

__all__ = ["gone", "heartbeat", "joined", "rebalance", "released", "still_connected"]

log = logging.getLogger("rabbitkeys.registry")


def joined(
    book: Ledger,
    worker_id: str,
    job_types: Iterable[str],
    reported: Iterable[tuple[KeyRef, str | None]],
    now: float,
) -> list[Command]:
    """A worker joins, or says again which keys it consumes (after a registry restart)."""
    worker = book.workers.get(worker_id)
    if worker is None:
        worker = book.workers[worker_id] = WorkerRecord(worker_id, frozenset(job_types), now)
        log.info("worker %s joined (%s)", worker_id, ", ".join(sorted(worker.job_types)))
    worker.last_seen = now
    commands: list[Command] = [Rebalance()]
    for ref, routing_key in reported:
        key = book.keys.get(ref.id) or book._new_key(
            ref, KeyState.UNOWNED, routing_key, now, seen=True
        )
        if key.state is KeyState.REDRIVING:
            # its queue is being rearranged, unconsumed: the worker must let go
            commands.append(ReleaseKeys(worker_id, (ref.id,)))
        elif key.owner is None or key.owner not in book.workers:
            book._set_owner(key, worker_id)
            if key.state is KeyState.UNOWNED:
                book._enter(key, KeyState.OWNED)
        elif key.owner != worker_id:
            commands.append(ReleaseKeys(worker_id, (ref.id,)))
    return commands


def heartbeat(
    book: Ledger,
    worker_id: str,
    waiting: int,
    now: float,
    failing: Iterable[tuple[str, int, str]] = (),
) -> bool:
    """A worker's heartbeat, but for the keys it reports idle (``retire.idle``): it is alive,
    ``waiting`` deliveries it holds have not started, and ``failing``: (key id, attempts,
    last error) of its keys whose head is between attempts now; its other keys are not
    failing (any more). False if the book does not know the worker: it is asked to join
    again, and its heartbeat counts for nothing."""
    worker = book.workers.get(worker_id)
    if worker is None:
        return False
    worker.last_seen = now
    worker.waiting = waiting
    failing_now: set[str] = set()
    for key_id, attempts, error in failing:
        key = book.keys.get(key_id)
        if key is not None and key.owner == worker_id:
            key.failures, key.last_error = attempts, error[:MAX_ERROR]
            failing_now.add(key_id)
    for key_id in worker.failing - failing_now:
        key = book.keys.get(key_id)
        if key is not None and key.owner == worker_id:
            key.failures, key.last_error = 0, None
    worker.failing = failing_now
    return True


def still_connected(book: Ledger, worker_id: str, now: float) -> None:
    """Its heartbeats are late but its connection lives: look again later."""
    if worker_id in book.workers:
        book.workers[worker_id].last_seen = now


def gone(book: Ledger, worker_id: str) -> list[Command]:
    """A worker left or was lost. Its connection is gone (or it let go of every key
    before leaving), so nothing consumes its keys any more: they can go elsewhere."""
    worker = book.workers.pop(worker_id, None)
    if worker is None:
        return []
    commands: list[Command] = [Rebalance()]
    for key_id in worker.keys:
        key = book.keys.get(key_id)
        if key is None:
            continue
        key.owner = None
        key.failures, key.last_error = 0, None
        if key.state in (KeyState.OWNED, KeyState.MOVING):
            commands += book._unowned(key)  # (a key a redrive waits for: REDRIVING)
        elif key.state is KeyState.DECLARING:
            key.resume = KeyState.UNOWNED
        elif key.state is KeyState.RELEASING:
            commands += book._let_go_of_retiring(key)
        # UNBINDING, GRACE: the retirement goes on with no owner to wait for
    return commands


def released(
    book: Ledger, worker_id: str, keys: Iterable[tuple[KeyRef, str | None]], now: float
) -> list[Command]:
    """The worker has settled these keys and no longer consumes them: hand them on."""
    commands: list[Command] = []
    for ref, routing_key in keys:
        key = book.keys.get(ref.id)
        if key is None:
            # Released to a registry that led before us: adopt the key, or it would sit
            # unconsumed until its queue expires.
            key = book._new_key(ref, KeyState.UNOWNED, routing_key, now, seen=True)
            commands += book._place(key)
            continue
        if key.owner != worker_id:
            continue  # stale: the key moved or retired meanwhile
        if key.move_started is not None:
            commands.append(HandoffDone(now - key.move_started))
            key.move_started = None
        book._set_owner(key, None)
        if key.state is KeyState.MOVING:
            target = key.target
            if target is not None and target in book.workers:
                commands += book._give(key, target)
            else:
                commands += book._place(key)
        elif key.state is KeyState.OWNED:  # let go on its own (its queue was deleted...)
            commands += book._place(key)
        elif key.state is KeyState.RELEASING:
            commands += book._let_go_of_retiring(key)
        elif key.state is KeyState.DECLARING:
            key.resume = KeyState.UNOWNED  # placed once declared
        # UNBINDING, GRACE: the retirement goes on with no owner to wait for
    return commands


def rebalance(book: Ledger, now: float) -> list[Command]:
    """Spread keys over the workers again. A key that moves is first released by its
    owner, which settles what it holds and reports it released; only then is it
    assigned to the new owner (see :func:`released`). Never two consumers at once.
    A held key goes to nobody: its owner is asked to release it."""
    by_type: dict[str, list[Key]] = defaultdict(list)
    for key in book.keys.values():
        if key.state in PLACEABLE:  # keys being declared or retired come afterwards
            by_type[key.ref.job_type].append(key)
    assigns: dict[str, list[KeyAssignment]] = defaultdict(list)
    releases: dict[str, list[str]] = defaultdict(list)
    for job_type, keys in by_type.items():
        eligible = [w for w, s in book.workers.items() if job_type in s.job_types]
        free = (k.ref.id for k in keys if not book.held(k))
        desired = assignment.assign(free, eligible)
        for key in keys:
            new_owner = desired.get(key.ref.id)
            if key.state is KeyState.MOVING:
                key.target = new_owner
            elif new_owner == key.owner:
                continue
            elif key.owner is None:
                if new_owner is not None:
                    book._give(key, new_owner)
                    assigns[new_owner].append(key.assignment())
            else:
                releases[key.owner].append(key.ref.id)
                book._enter(key, KeyState.MOVING)
                key.target, key.move_started = new_owner, now
    commands: list[Command] = [ReleaseKeys(w, tuple(ids)) for w, ids in releases.items()]
    commands += [AssignKeys(w, tuple(a)) for w, a in assigns.items()]
    return commands

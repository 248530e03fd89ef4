"""The key book's declare family: a publisher's ensure, and the outcome of the declare it
may start. Events: ``ensure`` (a new key within the quotas, a key whose binding a message
came back on, or one waiting for a declare, retirement or redrive), ``declared`` and
``declare_failed`` (the outcome of a :class:`~.commands.DeclareAndBind`: the key resumes how
it was held, or is placed; after a failure, a key nothing routes to and no worker consumes is
forgotten; its waiters are answered).

Each event is a function of the book (the :class:`~.ledger.Ledger`) returning the commands
that follow; :class:`~rabbitkeys._registry.keybook.KeyBook` calls them."""

from __future__ import annotations

import logging

from ..._wire.protocol import REFUSED_QUOTA_EXCEEDED, REFUSED_UNAVAILABLE
from ..._wire.topology import KeyRef
from .commands import AssignKeys, Command, Reply
from .ledger import Ledger
from .records import WAITING, Key, KeyState

__all__ = ["declare_failed", "declared", "ensure"]

log = logging.getLogger("rabbitkeys.registry")


def ensure(book: Ledger, ref: KeyRef, stale_routing_key: str | None, waiter: int) -> list[Command]:
    """A publisher needs a routing key for ``ref``; ``waiter`` gets the :class:`Reply`."""
    key = book.keys.get(ref.id)
    if key is None:
        refused = book._beyond_quota(ref)
        if refused is not None:
            return [Reply(waiter, reason=refused, code=REFUSED_QUOTA_EXCEEDED)]
        key = book._new_key(ref, KeyState.UNOWNED)
        key.waiters.append(waiter)
        return book._declare(key)
    if key.state in WAITING:
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
    return book._declare(key)


def declared(book: Ledger, key_id: str, epoch: int, routing_key: str, now: float) -> list[Command]:
    key = book._current(key_id, epoch, KeyState.DECLARING)
    if key is None:
        return []
    key.routing_keys.append(routing_key)
    key.last_lease_renewal = now
    key.queue_seen = True
    book.queue_reachable(key_id)
    recreated, key.recreated = key.recreated, False
    # its holds are bindings of the queue: bind them (again, if it was recreated)
    holds = book._hold_commands(key)
    # The queue exists as of this declare-ok: a worker given the key now need not check
    # it (``KeyAssignment.fresh``).
    commands = _resume(book, key, fresh=True)
    if recreated and key.state is KeyState.OWNED and not commands:
        # the queue was recreated: its old consumer was cancelled by the broker
        assert key.owner is not None
        commands.append(AssignKeys(key.owner, (key.assignment(fresh=True),)))
    return holds + commands + book._answer(key, routing_key)


def declare_failed(
    book: Ledger, key_id: str, epoch: int, reason: str, code: str | None
) -> list[Command]:
    """A key nothing routes to and no worker consumes is forgotten, so that no worker is
    told to consume a queue that may not exist; one a worker consumes stays as it was
    (forgetting it would let a later ensure give it a second consumer). Every ensure
    waiting for it gets the reason."""
    key = book._current(key_id, epoch, KeyState.DECLARING)
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
        or (key.owner is not None and key.owner in book.workers)
        or (key.queue_seen and book.held(key))  # its holds live on its queue
    ):
        # kept: its queue exists (most likely); holds added meanwhile are bound now
        return book._hold_commands(key) + _resume(book, key) + commands
    book._forget(key)
    return commands


def _resume(book: Ledger, key: Key, *, fresh: bool = False) -> list[Command]:
    """Out of DECLARING: held as before (its owner, a move under way), or placed. A
    held key's owner is asked to release it."""
    if key.owner is not None and key.owner in book.workers:
        moving = key.resume is KeyState.MOVING
        book._enter(key, KeyState.MOVING if moving else KeyState.OWNED)
        return book._let_go(key) if book.held(key) else []
    return book._place(key, fresh=fresh)

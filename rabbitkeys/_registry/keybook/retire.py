"""The key book's retire family: an idle key's retirement, step by step (UNBINDING, GRACE,
RELEASING, DELETING). Events: ``idle`` (its owner reports it idle in a heartbeat: the
retirement starts), then the outcomes of the commands each step sends: ``unbound``
(:class:`~.commands.Unbind`), ``grace_over`` (:class:`~.commands.WaitGrace`),
``release_wait_over`` (:class:`~.commands.WaitRelease`) and ``delete_outcome``
(:class:`~.commands.CheckAndDelete`). A retirement that cannot go on ends in the ledger
(``Ledger._end_retirement``), which a worker's release or departure also reaches
(``members``).

Each event is a function of the book (the :class:`~.ledger.Ledger`) returning the commands
that follow; :class:`~rabbitkeys._registry.keybook.KeyBook` calls them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .commands import (
    RELEASE_WAIT,
    CheckAndDelete,
    Command,
    Rebalance,
    ReleaseKeys,
    Retired,
    Unbind,
    WaitGrace,
    WaitRelease,
)
from .ledger import Ledger
from .records import KeyState

__all__ = ["delete_outcome", "grace_over", "idle", "release_wait_over", "unbound"]

log = logging.getLogger("rabbitkeys.registry")


def idle(book: Ledger, key_id: str, reporter: str) -> list[Command]:
    """The owner reports the key idle: start retiring it (only a key it plainly owns)."""
    key = book.keys.get(key_id)
    if key is None or key.state is not KeyState.OWNED or key.owner != reporter:
        return []
    if book.held(key):  # a held key keeps its queue and messages
        return []
    book._enter(key, KeyState.UNBINDING)
    # from here on, publishes come back to their publisher
    return [Unbind(key_id, key.ref, key.queue, tuple(key.routing_keys), key.epoch)]


def unbound(
    book: Ledger, key_id: str, epoch: int, removed: Iterable[str], ok: bool
) -> list[Command]:
    key = book._current(key_id, epoch, KeyState.UNBINDING)
    if key is None:
        return []
    gone = set(removed)
    key.routing_keys = [rk for rk in key.routing_keys if rk not in gone]
    if not ok:  # the retirement ends; the key stays with what is still bound
        return book._end_retirement(key, [])
    book._enter(key, KeyState.GRACE)
    return [WaitGrace(key_id, key.epoch)]


def grace_over(book: Ledger, key_id: str, epoch: int) -> list[Command]:
    key = book._current(key_id, epoch, KeyState.GRACE)
    if key is None:
        return []
    if book.held(key):  # held meanwhile: kept
        return book._end_retirement(key, [])
    if key.owner is None:  # released meanwhile, or its worker is gone
        book._enter(key, KeyState.DELETING)
        return [CheckAndDelete(key_id, key.queue, key.epoch)]
    # The owner settles what it holds (acks what it handled, requeues the rest) and
    # reports the key released; only then do the queue's counts tell the truth.
    book._enter(key, KeyState.RELEASING)
    return [ReleaseKeys(key.owner, (key_id,)), WaitRelease(key_id, key.epoch)]


def release_wait_over(book: Ledger, key_id: str, epoch: int) -> list[Command]:
    key = book._current(key_id, epoch, KeyState.RELEASING)
    if key is None:
        return []
    # A long handler: leave the handoff open; its Released places the key.
    log.info("key %s: owner still busy after %gs; not retired", key_id, RELEASE_WAIT)
    book._enter(key, KeyState.MOVING)
    return book._after_retirement(key, [])


def delete_outcome(book: Ledger, key_id: str, epoch: int, deleted: bool) -> list[Command]:
    """``deleted``: the queue is gone (deleted now, or already). Otherwise something
    arrived meanwhile: the key is kept, consumed and unbound; the next publish comes
    back, and its ensure binds the key again behind these messages."""
    key = book._current(key_id, epoch, KeyState.DELETING)
    if key is None:
        return []
    if not deleted:  # (holds added meanwhile are bound now: the queue is there)
        return book._end_retirement(key, book._hold_commands(key))
    waiters = key.waiters
    book._forget(key)
    commands: list[Command] = [Retired(key_id), Rebalance()]
    if waiters or key.paused or key.parked is not None or key.redrive is not None:
        # Ensures that waited for the retirement, or holds added while the queue was
        # deleted (an operator paused it, a redrive wants it): a new key, from the
        # start, with those holds (bound once it is declared). A paused job type
        # holds no key that is gone.
        fresh = book._new_key(key.ref, KeyState.UNOWNED)
        fresh.waiters = waiters
        fresh.paused, fresh.parked, fresh.redrive = key.paused, key.parked, key.redrive
        commands += book._declare(fresh)
    return commands

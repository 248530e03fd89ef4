"""The key book's broker-view family: what the registry learns from the broker itself
(``_registry.reconcile``, and the leases it renews). Events: ``adopt_listed`` (a key queue
the broker lists: adopted if nobody consumes it, its bindings learnt), ``lease_renewed`` (a
passive declare of an unowned key's queue reached it) and ``queue_lost`` (a key's queue is
not there: the key is forgotten). A queue that answers again is the ledger's
(``Ledger.queue_reachable``): a declare tells it too.

Each event is a function of the book (the :class:`~.ledger.Ledger`); none sends a command:
what follows (a rebalance, a log line) is the registry's to decide from what they return.
:class:`~rabbitkeys._registry.keybook.KeyBook` calls them."""

from __future__ import annotations

from ..._wire.topology import KeyRef
from .ledger import Ledger
from .records import PLACEABLE, KeyState

__all__ = ["adopt_listed", "lease_renewed", "queue_lost"]


def adopt_listed(book: Ledger, ref: KeyRef, consumers: int, bound: list[str], now: float) -> bool:
    """A key queue the broker lists: adopt it if nobody consumes it (whether it was
    adopted) and learn its bindings. Merge, never replace: a binding made after the
    listing must not be forgotten, or a retirement would delete a queue that still
    routes."""
    key = book.keys.get(ref.id)
    adopted = False
    if key is None:
        if consumers:
            return False  # a worker consumes it; it reports it on its next join
        key = book._new_key(ref, KeyState.UNOWNED, now=now)
        adopted = True
    if key.state in PLACEABLE:
        key.routing_keys[:0] = [rk for rk in bound if rk not in key.routing_keys]
    return adopted


def lease_renewed(book: Ledger, key_id: str, now: float) -> None:
    if (key := book.keys.get(key_id)) is not None:
        key.last_lease_renewal = now
        book.queue_reachable(key_id)  # the passive declare reached it


def queue_lost(book: Ledger, key_id: str) -> bool:
    """A key's queue is not there (expired, or deleted by an operator). Only a key in
    no declare or retirement is ours to drop (a retirement may have just deleted it)."""
    key = book.keys.get(key_id)
    if key is None or key.state not in PLACEABLE:
        return False
    book._forget(key)
    return True

"""The key book's one face: :class:`KeyBook`, the ledger with every event the registry
reports to it. Each event is handed to its family's module (``declare``, ``retire``,
``members``, ``holds``, ``broker_view``), which changes the book and returns the commands
that follow; what is read from the book (the status, the holds, the leases due) is the
ledger's. One decision stays here, as it joins two families: a heartbeat of a worker the
book does not know asks it to join again (``SyncWorker``) instead of retiring its idle keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..._wire.topology import KeyRef
from . import broker_view, declare, holds, members, retire
from .commands import Command, SyncWorker
from .ledger import Ledger
from .records import Parked

__all__ = ["KeyBook"]


class KeyBook(Ledger):
    """What the leading registry knows; each event returns the commands that follow.

    ``queue_of`` names a key's queue (``Names.key_queue``); ``max_keys`` and
    ``max_job_types`` are the quotas an ensure of a new key is checked against.
    """

    # --- ensures and declares (declare) --------------------------------------------------

    def ensure(self, ref: KeyRef, stale_routing_key: str | None, waiter: int) -> list[Command]:
        """A publisher needs a routing key for ``ref``; ``waiter`` gets the ``Reply``."""
        return declare.ensure(self, ref, stale_routing_key, waiter)

    def declared(self, key_id: str, epoch: int, routing_key: str, now: float) -> list[Command]:
        """The key's queue is declared and bound with ``routing_key``."""
        return declare.declared(self, key_id, epoch, routing_key, now)

    def declare_failed(
        self, key_id: str, epoch: int, reason: str, code: str | None
    ) -> list[Command]:
        """The key's declare failed: its waiters are refused; it is kept or forgotten."""
        return declare.declare_failed(self, key_id, epoch, reason, code)

    # --- retiring an idle key (retire) ---------------------------------------------------

    def unbound(self, key_id: str, epoch: int, removed: Iterable[str], ok: bool) -> list[Command]:
        """The retiring key's bindings ``removed`` (all of them, if ``ok``)."""
        return retire.unbound(self, key_id, epoch, removed, ok)

    def grace_over(self, key_id: str, epoch: int) -> list[Command]:
        """The retiring key's grace for messages already routed is over."""
        return retire.grace_over(self, key_id, epoch)

    def release_wait_over(self, key_id: str, epoch: int) -> list[Command]:
        """The retiring key's owner did not let go within ``RELEASE_WAIT``."""
        return retire.release_wait_over(self, key_id, epoch)

    def delete_outcome(self, key_id: str, epoch: int, deleted: bool) -> list[Command]:
        """The retiring key's queue was deleted, or kept (not empty)."""
        return retire.delete_outcome(self, key_id, epoch, deleted)

    # --- workers (members; a heartbeat's idle keys: retire) -------------------------------

    def joined(
        self,
        worker_id: str,
        job_types: Iterable[str],
        reported: Iterable[tuple[KeyRef, str | None]],
        now: float,
    ) -> list[Command]:
        """A worker joins, or says again which keys it consumes (after a registry restart)."""
        return members.joined(self, worker_id, job_types, reported, now)

    def heartbeat(
        self,
        worker_id: str,
        waiting: int,
        idle: Iterable[str],
        now: float,
        failing: Iterable[tuple[str, int, str]] = (),
    ) -> list[Command]:
        """A worker's heartbeat: news of the worker (``members.heartbeat``: ``waiting``,
        ``failing``), and the keys it reports ``idle``, whose retirement starts
        (``retire.idle``)."""
        if not members.heartbeat(self, worker_id, waiting, now, failing):
            # We do not know it (we started after it joined): ask it to join again.
            return [SyncWorker(worker_id)]
        return [c for key_id in idle for c in retire.idle(self, key_id, worker_id)]

    def still_connected(self, worker_id: str, now: float) -> None:
        """Its heartbeats are late but its connection lives: look again later."""
        members.still_connected(self, worker_id, now)

    def gone(self, worker_id: str) -> list[Command]:
        """A worker left or was lost: nothing consumes its keys any more."""
        return members.gone(self, worker_id)

    def released(
        self, worker_id: str, keys: Iterable[tuple[KeyRef, str | None]], now: float
    ) -> list[Command]:
        """The worker has settled these keys and no longer consumes them: hand them on."""
        return members.released(self, worker_id, keys, now)

    def rebalance(self, now: float) -> list[Command]:
        """Spread keys over the workers again; a key moves only once released."""
        return members.rebalance(self, now)

    # --- holds: park, pause, skip, redrive (holds) ---------------------------------------

    def key_parked(
        self, worker_id: str, ref: KeyRef, routing_key: str | None, parked: Parked, now: float
    ) -> list[Command]:
        """The key's head failed its last attempt on ``worker_id`` (policy ``park``)."""
        return holds.key_parked(self, worker_id, ref, routing_key, parked, now)

    def pause(self, ref: KeyRef) -> list[Command]:
        """An operator pauses a key: no worker gets it until it is resumed."""
        return holds.pause(self, ref)

    def resume(self, ref: KeyRef) -> list[Command]:
        """An operator resumes a paused or parked key."""
        return holds.resume(self, ref)

    def pause_type(self, job_type: str) -> list[Command]:
        """An operator pauses a whole job type."""
        return holds.pause_type(self, job_type)

    def resume_type(self, job_type: str) -> list[Command]:
        """An operator resumes a paused job type."""
        return holds.resume_type(self, job_type)

    def skip(self, ref: KeyRef) -> list[Command]:
        """An operator skips a parked key's head."""
        return holds.skip(self, ref)

    def skipped(self, key_id: str, epoch: int, ok: bool) -> list[Command]:
        """The outcome of a ``SkipHead``."""
        return holds.skipped(self, key_id, epoch, ok)

    def redrive(self, ref: KeyRef, redrive_id: str) -> list[Command]:
        """A redrive wants to put dead letters at the key's head."""
        return holds.redrive(self, ref, redrive_id)

    def rearranged(
        self, key_id: str, epoch: int, ok: bool, removed: Iterable[str]
    ) -> list[Command]:
        """The outcome of a ``Rearrange``: the redrive is over."""
        return holds.rearranged(self, key_id, epoch, ok, removed)

    def holds_listed(
        self,
        keys: Iterable[tuple[KeyRef, str, Mapping[str, str | int]]],
        job_types: Iterable[str],
        now: float,
    ) -> list[Command]:
        """The holds read back from the broker as a registry starts to lead."""
        return holds.holds_listed(self, keys, job_types, now)

    # --- the broker's view (broker_view) -------------------------------------------------

    def adopt_listed(self, ref: KeyRef, consumers: int, bound: list[str], now: float) -> bool:
        """A key queue the broker lists (whether it was adopted)."""
        return broker_view.adopt_listed(self, ref, consumers, bound, now)

    def lease_renewed(self, key_id: str, now: float) -> None:
        """A passive declare of the key's queue reached it."""
        broker_view.lease_renewed(self, key_id, now)

    def queue_lost(self, key_id: str) -> bool:
        """A key's queue is not there (whether the key was forgotten)."""
        return broker_view.queue_lost(self, key_id)

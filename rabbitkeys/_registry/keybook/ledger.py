"""The key book's ledger: the records of keys and workers, what is read from them (the
status, the holds, the leases due), the one place a key changes state
(:meth:`Ledger._enter`), and the steps the event families share: placing a key, declaring
it, answering its waiters, ending a retirement. The events are the families' (``declare``,
``members``, ``retire``, ``holds``, ``broker_view``), which work on it, and
:class:`~rabbitkeys._registry.keybook.KeyBook` is a ledger with the events; but for one
the families share: ``queue_reachable`` (a key's queue answered a declare)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..._wire.protocol import Status, WorkerStatus
from ..._wire.topology import HOLD_REDRIVE, KeyRef
from .. import assignment
from .commands import (
    AssignKeys,
    CheckAndDelete,
    Command,
    DeclareAndBind,
    Rearrange,
    Rebalance,
    ReleaseKeys,
    Reply,
    SetHold,
)
from .hold_bindings import bindings_of, hold_command, redrive_arguments
from .records import RETIRING, Key, KeyState, KeyTable, WorkerRecord

__all__ = ["Ledger"]

log = logging.getLogger("rabbitkeys.registry")

#: the holds :meth:`Ledger.holds_of` names, in its order
_HOLD_NAMES = ("paused", "parked", "type_paused", "redrive")


class Ledger:
    """What the book knows, and the steps its event families share (see the module).

    Its underscored methods are the book's own: the event families (the modules beside this
    one) call them on the book they are given; the registry never does."""

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
        (:meth:`KeyBook.holds_listed`) finishes a redrive cut by a crash on a queue no worker
        consumes. A redrive cut before this point left its dead letters unacked in the
        dead-letter queue: nothing to finish."""
        if key.redrive is not None and key.skipping is None:
            self._enter(key, KeyState.REDRIVING)
            arguments = redrive_arguments(key.redrive)
            return [
                hold_command(key, HOLD_REDRIVE, True, arguments),
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
            for hold, arguments in bindings_of(key)
            if hold != HOLD_REDRIVE
        ]

    def _bind_hold(self, key: Key, command: SetHold) -> list[Command]:
        """A hold added now is bound at once if the key's queue surely exists; while it is
        declared or deleted, the outcome binds it (:meth:`_hold_commands`)."""
        if key.state in (KeyState.DECLARING, KeyState.DELETING):
            return []
        return [command]

    # --- declaring: an ensure's, a hold's, or once a retirement or a redrive ends ----------

    def _declare(self, key: Key) -> list[Command]:
        # how the key is held now, to go back to once declared (see declare._resume)
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

    def _answer(self, key: Key, routing_key: str) -> list[Command]:
        waiters, key.waiters = key.waiters, []
        return [Reply(w, routing_key=routing_key) for w in waiters]

    # --- ending a retirement: its own outcomes, or its owner let go or gone ---------------

    def _let_go_of_retiring(self, key: Key) -> list[Command]:
        """RELEASING, and its owner let go (or is gone): delete the queue if empty, unless
        the key was held meanwhile (then it is kept)."""
        if self.held(key):
            return self._end_retirement(key, [])
        self._enter(key, KeyState.DELETING)
        return [CheckAndDelete(key.ref.id, key.queue, key.epoch)]

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

    # --- a queue that answers (a declare's or a lease renewal's news) -------------------

    def queue_reachable(self, key_id: str) -> None:
        """A key's queue answered a (passive) declare: it is not unavailable (any more)."""
        key = self.keys.get(key_id)
        if key is not None and key.unavailable:
            key.unavailable = False
            log.warning("key %s: its queue is available again", key_id)

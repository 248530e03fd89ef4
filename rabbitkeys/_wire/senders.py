"""Who may send what: the one home of checking a control message's sender. Pure.

The broker enforces two facts (docs/internals/admin.md, "The trust model"): only a role's users may
write on that role's control exchange (:mod:`rabbitkeys._admin.permissions`), and a message's
``user_id`` is the user its connection logged in as (it closes the channel of any other). So the
exchange a message came through names the sender's role, and ``user_id`` names the sender:

* the registry obeys requests only from ``NS.requests``, worker reports only from
  ``NS.membership`` and operator requests only from ``NS.operations``;
* a worker obeys commands only from ``NS.commands``;
* a message without ``user_id`` is nobody's, and is refused.

What the broker cannot tell is which worker a worker's message speaks for, when several
workers share a user: :class:`WorkerSessions` pins each live worker id to the user and
secret session first heard for it, and settles a conflict by the worker's inbox.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Collection
from typing import Any, Protocol

from .._errors import InvalidKeyError, ProtocolError
from .protocol import (
    Assign,
    EnsureKey,
    EnsureKeys,
    HoldRequest,
    KeyParked,
    KeysRequest,
    RedriveRequest,
    Release,
    Released,
    StatusRequest,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
)
from .topology import Names

__all__ = [
    "REFUSAL_REASONS",
    "Refusal",
    "OperatorRequest",
    "WorkerReport",
    "WorkerSessions",
    "check_command",
    "check_request",
    "record_drop",
]

#: Every ``reason`` label of ``rabbitkeys_refused_control_messages_total`` (a closed set:
#: a label per sender or key would grow without bound).
REFUSAL_REASONS = (
    "malformed",  # unparseable, over a limit, or not a message of its kind
    "wrong_exchange",  # came through another role's exchange, or the default exchange
    "no_user_id",  # the broker vouches for no sender
    "impersonation",  # a worker message for a live worker, from another user or session
    "foreign_queue",  # an assignment of a queue that is not the key's in this namespace
    "job_type_not_served",  # an assignment of a job type the worker has no handler for
    "bad_reply_to",  # a reply asked for somewhere that is not a reply queue
)

WorkerReport = WorkerJoin | WorkerHeartbeat | Released | KeyParked | WorkerLeave
#: what an operator asks (``rabbitkeys keys``, ``pause``, ``resume``, ``skip``, ``redrive``)
OperatorRequest = KeysRequest | HoldRequest | RedriveRequest


class Refusal(Exception):
    """A control message refused for who sent it or what it asks; ``reason`` is one of
    :data:`REFUSAL_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REFUSAL_REASONS, reason
        super().__init__(detail)
        self.reason = reason


def _check_user(user_id: str | None) -> None:
    if not user_id:
        raise Refusal("no_user_id", "no user_id: the broker vouches for no sender")


def check_request(names: Names, exchange: str, user_id: str | None, request: object) -> None:
    """What the registry may act on: publishers' requests through ``NS.requests``, workers'
    reports through ``NS.membership``, operators' requests through ``NS.operations`` (the
    registry's role: a publisher's credential must not pause, skip, redrive or list keys).
    Raises :class:`Refusal`."""
    _check_user(user_id)
    if isinstance(request, EnsureKey | EnsureKeys | StatusRequest):
        expected = names.requests_exchange
    elif isinstance(request, WorkerReport):
        expected = names.membership_exchange
    elif isinstance(request, OperatorRequest):
        expected = names.operations_exchange
    else:
        raise Refusal("malformed", f"a {type(request).__name__} is not a request")
    if exchange != expected:
        raise Refusal(
            "wrong_exchange",
            f"a {type(request).__name__} through {exchange or 'the default exchange'!r}, "
            f"not {expected!r}",
        )


def check_command(names: Names, exchange: str, user_id: str | None, command: object) -> None:
    """What a worker may obey: the registry's commands through ``NS.commands``. Raises
    :class:`Refusal`."""
    _check_user(user_id)
    if not isinstance(command, Assign | Release | Sync):
        raise Refusal("malformed", f"a {type(command).__name__} is not a command")
    if exchange != names.commands_exchange:
        raise Refusal(
            "wrong_exchange",
            f"a command through {exchange or 'the default exchange'!r}, "
            f"not {names.commands_exchange!r}",
        )


class DropMetrics(Protocol):
    """The two counters a receiver keeps of what it dropped (``_observe.metrics``)."""

    malformed: Any
    refused: Any


def record_drop(
    log: logging.Logger,
    refused: collections.Counter[str],
    metrics: DropMetrics,
    what: str,
    error: BaseException,
) -> None:
    """Count and log what remote input broke or was refused; the receiver (registry or
    worker) drops it and carries on. ``refused`` counts by reason."""
    reason = error.reason if isinstance(error, Refusal) else "malformed"
    refused[reason] += 1
    metrics.malformed.inc()
    metrics.refused.labels(reason=reason).inc()
    if isinstance(error, ProtocolError | InvalidKeyError | Refusal):
        log.warning("dropped %s: %s", what, error)
    else:  # not a parse error: show where it failed
        log.warning("dropped %s: %r", what, error, exc_info=error)


class WorkerSessions:
    """Which user and session speak for each worker id, and where its commands go.

    The first report heard for a worker id pins it to its sender's user and session; from
    then on a report for that id from anyone else is a conflict, until :meth:`forget` (the
    worker left, died or fell silent). A conflict is not decided here: only the broker
    knows who owns the worker's exclusive inbox, and the session bound to it
    (:meth:`~.topology.Names.worker_route`) is the worker's own. The registry asks the
    broker and either refuses the report as impersonation or lets the inbox's owner
    :meth:`take_over` (an impostor that spoke first after a failover, or a restarted process
    with the same id). A worker keeps its session for its process's life.
    """

    def __init__(self, names: Names) -> None:
        self._names = names
        self._pins: dict[str, tuple[str, str]] = {}

    def check(self, report: WorkerReport, user_id: str) -> bool:
        """Whether ``report`` may speak for its worker (pinning an id heard first); False
        if another user or session holds the id."""
        speaker = (user_id, report.session)
        pinned = self._pins.setdefault(report.worker_id, speaker)
        return pinned == speaker

    def take_over(self, report: WorkerReport, user_id: str) -> None:
        self._pins[report.worker_id] = (user_id, report.session)

    def route(self, worker_id: str) -> str | None:
        """The routing key of the worker's commands, if we have heard from it."""
        pinned = self._pins.get(worker_id)
        return None if pinned is None else self._names.worker_route(worker_id, pinned[1])

    def forget(self, worker_id: str) -> None:
        self._pins.pop(worker_id, None)

    def retain(self, worker_ids: Collection[str]) -> None:
        """Forget every id but ``worker_ids`` (the workers the key book knows): reports for
        ids that never joined must not pile up pins."""
        for worker_id in [w for w in self._pins if w not in worker_ids]:
            del self._pins[worker_id]

    def clear(self) -> None:
        self._pins.clear()

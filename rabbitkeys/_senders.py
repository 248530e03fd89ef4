"""Who may send what: the one home of checking a control message's sender. Pure.

The broker enforces two facts (docs/design.md, "The trust model"): only a role's users may
write on that role's control exchange (:mod:`._permissions`), and a message's ``user_id``
is the user its connection logged in as (it closes the channel of any other). So the
exchange a message came through names the sender's role, and ``user_id`` names the sender:

* the registry obeys requests only from ``NS.requests`` and worker reports only from
  ``NS.membership``;
* a worker obeys commands only from ``NS.commands``;
* a message without ``user_id`` is nobody's, and is refused.

What the broker cannot tell is which worker a worker's message speaks for, when several
workers share a user: :class:`WorkerSessions` pins each live worker id to the user and
secret session that joined it.
"""

from __future__ import annotations

from ._protocol import (
    Assign,
    ControlMessage,
    EnsureKey,
    Release,
    Released,
    StatusRequest,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
)
from ._topology import Names

__all__ = [
    "REFUSAL_REASONS",
    "Refusal",
    "WorkerSessions",
    "check_command",
    "check_request",
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

WorkerReport = WorkerJoin | WorkerHeartbeat | Released | WorkerLeave


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
    reports through ``NS.membership``. Raises :class:`Refusal`."""
    _check_user(user_id)
    if isinstance(request, EnsureKey | StatusRequest):
        expected = names.requests_exchange
    elif isinstance(request, WorkerReport):
        expected = names.membership_exchange
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


class WorkerSessions:
    """Which user and session speak for each live worker id.

    A join pins a worker id that is not pinned; from then on, every report for that id must
    come from the same user with the same session, until :meth:`forget` (the worker left,
    died or fell silent). A worker keeps its session for its process's life, so a worker
    that reconnects is still itself; a restarted process with the same id is let in once its
    predecessor is gone. Reports for an id nobody pinned go through as before: the key book
    decides what a report of an unknown worker means (it asks it to join).
    """

    def __init__(self) -> None:
        self._pins: dict[str, tuple[str, str]] = {}

    def check(self, report: ControlMessage, user_id: str) -> None:
        """Raises :class:`Refusal` if ``report`` speaks for a worker pinned to another
        user or session; pins the worker of a join."""
        if not isinstance(report, WorkerReport):
            return
        speaker = (user_id, report.session)
        pinned = self._pins.get(report.worker_id)
        if pinned is None:
            if isinstance(report, WorkerJoin):
                self._pins[report.worker_id] = speaker
            return
        if pinned != speaker:
            who = "another user" if pinned[0] != user_id else "another session"
            raise Refusal(
                "impersonation",
                f"a {report.type} for worker {report.worker_id!r} from {who} "
                f"(user {user_id!r}) while that worker is live",
            )

    def forget(self, worker_id: str) -> None:
        self._pins.pop(worker_id, None)

    def clear(self) -> None:
        self._pins.clear()

"""The leading session: what a registry builds when it comes to lead its namespace.

A registry that wins the leader lock (``_registry.leadership``) builds one
:class:`LeadingSession` on its connection: the control channel it consumes and answers on,
the :class:`~.runner.CommandRunner` that carries out the key book's commands, the
:class:`~.reconcile.Reconciler` that checks the book against the broker, and the
:class:`~.operator_requests.OperatorRequests` that answers operators. They are built
together and are replaced together: the next leadership (after a lost connection) builds
new ones for its new book. The session of a leadership that ended (its connection lost)
stays in place, its channels closed, until the next one is built: a reply or a metrics
scrape that comes late meets closed channels and a book that says it does not lead, never a
missing attribute. Until a registry first leads, its session is :data:`NOT_LEADING`,
which has none of them (as faststream's ``EmptyConnectionState``): control messages are
consumed only while it leads, so reaching for one before is a bug, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractConnection

from .operator_requests import OperatorRequests
from .reconcile import Reconciler
from .runner import CommandRunner

__all__ = ["NOT_LEADING", "LeadingSession", "NotLeading"]


@dataclass(frozen=True, slots=True, eq=False)
class LeadingSession:
    """One leadership of a registry, on one connection, for one key book."""

    connection: AbstractConnection
    #: the channel the registry consumes its queue on, and replies and broadcasts on
    control: AbstractChannel
    runner: CommandRunner
    reconciler: Reconciler
    operator_requests: OperatorRequests


class NotLeading:
    """The session of a registry that has not led yet (standing by, or not connected)."""

    __slots__ = ()

    def _missing(self) -> RuntimeError:
        return RuntimeError("this registry has not led: it has no leading session")

    @property
    def connection(self) -> AbstractConnection:
        raise self._missing()

    @property
    def control(self) -> AbstractChannel:
        raise self._missing()

    @property
    def runner(self) -> CommandRunner:
        raise self._missing()

    @property
    def reconciler(self) -> Reconciler:
        raise self._missing()

    @property
    def operator_requests(self) -> OperatorRequests:
        raise self._missing()


NOT_LEADING = NotLeading()

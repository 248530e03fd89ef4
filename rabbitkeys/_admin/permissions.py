"""What each role may do on the broker: the one home of the permission table.

RabbitMQ grants a user three regular expressions per vhost, matched against the names of
the queues and exchanges an operation touches (docs: access-control):

* **configure**: declare (not passive) and delete a queue or exchange;
* **write**: publish to an exchange; bind a queue (write on the queue, read on the exchange);
* **read**: consume from or purge a queue, ``basic.get``; be the exchange a queue binds to.

Control traffic travels on named exchanges, one per direction, so that write permission on
an exchange *is* the role that may send on it (write access to the default exchange would
reach every queue: no role gets it). Each role configures only its own queues, so no
role can delete, squat or bind another's. The table, with the reasons per row, is in
docs/internals/admin.md ("The trust model"); tests/system/test_trust.py tries each line
against the broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .._wire.topology import Names

__all__ = ["Permissions", "Role", "permissions_for"]


class Role(Enum):
    PUBLISHER = "publisher"
    WORKER = "worker"
    REGISTRY = "registry"


@dataclass(frozen=True, slots=True)
class Permissions:
    """One role's three regular expressions, as ``rabbitmqctl set_permissions`` takes them."""

    configure: str
    write: str
    read: str


# The parts of names, as in _topology (namespaces have no dot, job types no dot, worker ids
# and client ids their own patterns, key tokens anything after the job type).
_JOB_TYPE = r"[A-Za-z0-9_:-]+"
_WORKER_ID = r"[A-Za-z0-9_.:@-]+"
_CLIENT_ID = r"[A-Za-z0-9_-]+"


def _only(namespace: str, *alternatives: str) -> str:
    """A regex matching exactly ``<namespace>.<one of alternatives>``."""
    return rf"^{re.escape(namespace)}\.({'|'.join(alternatives)})$"


def permissions_for(role: Role, names: Names) -> Permissions:
    """The least a ``role`` needs in ``names``' namespace (nothing outside it)."""
    ns = names.namespace
    key_queue = rf"key\.{_JOB_TYPE}\..+"
    if role is Role.PUBLISHER:
        return Permissions(
            # its own exclusive reply queue
            configure=_only(ns, rf"reply\.{_CLIENT_ID}"),
            # jobs and requests to the registry; binding its reply queue (write on the queue)
            write=_only(ns, rf"jobs\.{_JOB_TYPE}", "requests", rf"reply\.{_CLIENT_ID}"),
            # its reply queue, and the replies exchange it binds that queue to
            read=_only(ns, "replies", rf"reply\.{_CLIENT_ID}"),
        )
    if role is Role.WORKER:
        return Permissions(
            # its own exclusive inbox; key queues only passively (no right needed up to
            # RabbitMQ 4.2.5, its read from 4.2.7 and 4.3.1; 4.2.6 and 4.3.0 ask configure:
            # docs/internals/admin.md, "Passive declares")
            configure=_only(ns, rf"worker\.{_WORKER_ID}"),
            # membership reports, dead letters; binding its inbox to the commands exchange
            write=_only(ns, "membership", "dead-letters", rf"worker\.{_WORKER_ID}"),
            # key queues (consuming is reading), its inbox, the commands exchange to bind to
            read=_only(ns, key_queue, rf"worker\.{_WORKER_ID}", "commands"),
        )
    # The registry: every shared name of the namespace, and no worker's inbox. Reply queues
    # match its rights (the operator commands run with its credential and need a reply
    # queue of their own), but each is exclusive to the connection that declared it: the
    # broker refuses any other connection (RESOURCE_LOCKED), whatever its rights.
    return Permissions(
        configure=_only(
            ns,
            rf"jobs\.{_JOB_TYPE}",
            key_queue,
            "registry",
            "registry\\.leader",
            "registry\\.events",
            "requests",
            "membership",
            "commands",
            "replies",
            "dead-letters",
            "dead-letter",
            # operators' requests (fanout to NS.registry) and the holds (bindings on an
            # internal exchange): both declared by the registry
            "operations",
            "holds",
            # the operator commands' own reply queue (exclusive)
            rf"reply\.{_CLIENT_ID}",
        ),
        write=_only(
            ns,
            # binding key queues (to their jobs exchange and to NS.holds), its own queues
            # and the dead-letter queue
            key_queue,
            "registry",
            "registry\\.events",
            "dead-letter",
            # commands and replies
            "commands",
            "replies",
            # redrive: the dead letters and the rotated messages go back into a key queue
            # through its jobs exchange; and a paused job type is its jobs exchange bound to
            # NS.holds (an exchange-to-exchange binding needs write on its destination)
            rf"jobs\.{_JOB_TYPE}",
            # skip: the parked head's dead-letter copies
            "dead-letters",
            # the operator commands (`rabbitkeys keys|pause|resume|skip|redrive`) run with
            # the registry's credential: only this role may send operations; their reply
            # queue is bound to NS.replies
            "operations",
            rf"reply\.{_CLIENT_ID}",
        ),
        # the exchanges its queues bind to, its request queue, and the broker's events
        # (amq.rabbitmq.event: a worker's inbox deleted means the worker died); for issue
        # 16: key queues (redrive and skip take messages with basic.get; the registry still
        # never consumes one), the dead-letter queue (redrive reads it), NS.holds (the
        # source of every hold binding) and NS.operations (NS.registry binds to it); the
        # operator commands' reply queue and NS.replies, the exchange it binds to; workers'
        # inboxes, only so that its passive declare of a silent worker's inbox (is its
        # connection gone?) has a right to lean on from RabbitMQ 4.2.7 / 4.3.1 on (earlier
        # it needed none; an inbox is exclusive: the broker refuses anything else, locked)
        read=(
            rf"^({re.escape(ns)}\.(jobs\.{_JOB_TYPE}|registry|registry\.events|requests"
            rf"|membership|dead-letters|{key_queue}|dead-letter|holds|operations"
            rf"|replies|reply\.{_CLIENT_ID}|worker\.{_WORKER_ID})"
            r"|amq\.rabbitmq\.event)$"
        ),
    )

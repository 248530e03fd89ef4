"""Names and arguments of every exchange and queue rabbitkeys uses, shared by all parties.

Who may do what to a key queue (the lifecycle protocol, see docs/internals/wire.md):

* the **registry** declares it, binds and unbinds it, and is the only party that deletes it;
* a **worker** checks it with a passive declare before it consumes, so that a consume never
  hits a missing queue, and never declares, binds, unbinds or deletes it (its user may not:
  :mod:`rabbitkeys._admin.permissions`);
* a **publisher** never declares anything: it publishes with ``mandatory`` and asks the
  registry when a message comes back.

Every name starts with the namespace, so two namespaces on one broker never meet.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError, InvalidKeyError

__all__ = [
    "DEFAULT_JOB_TYPE",
    "HOLD_PARKED",
    "HOLD_PAUSED",
    "HOLD_REDRIVE",
    "MAX_KEY_BYTES",
    "MAX_TOKEN_BYTES",
    "KeyRef",
    "Names",
    "UNLIMITED_DELIVERIES_POLICY",
    "WORKER_ID_PATTERN",
    "check_job_type",
    "check_key",
    "check_worker_id",
    "control_queue_arguments",
    "delivery_limit_arguments",
    "is_token",
    "key_matches_token",
    "key_queue_arguments",
    "key_queue_durable",
    "new_routing_key",
    "placement_arguments",
    "unlimited_deliveries_command",
]

DEFAULT_JOB_TYPE = "default"

#: Longest key accepted, in UTF-8 bytes. Longer keys are refused before anything is sent:
#: the key travels in every message's headers, so it must stay small.
MAX_KEY_BYTES = 1024

# Job types name exchanges and queues; dots separate name parts, so they are not allowed.
_JOB_TYPE = re.compile(r"[A-Za-z0-9_:-]{1,64}")

# Key tokens go into queue names, which pamqp checks on the client side against a charset
# that depends on its version: 3.3.0 (aio-pika 9.4-9.x) allows [a-zA-Z0-9-_.:@#,/ ], 4.x
# adds '+'; none allows '~' or '='. Tokens use the part every version accepts.
#
# A key made of these characters, up to this length, is its own token (readable in the
# management UI). Any other key gets a hashed token: a readable hint (the key without
# accents, runs of other characters replaced by '_', cut to 32 characters), '#', and a
# 160-bit BLAKE2b of the key. Plain tokens never contain '#', so the two kinds cannot collide.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:@-]{1,120}")
_HASHED_TOKEN = re.compile(r"[A-Za-z0-9_.:@-]{0,32}#[0-9a-f]{40}")
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_.:@-]+")
_HINT_CHARS = 32

#: Longest token, in bytes (all ASCII): a key queue name stays within the broker's 255 bytes
#: with the longest namespace (64) and job type (64).
MAX_TOKEN_BYTES = 120

#: What a worker id may be: it names the worker's inbox queue (``NS.worker.<id>``).
WORKER_ID_PATTERN = r"[A-Za-z0-9_.:@-]{1,128}"
_WORKER_ID = re.compile(WORKER_ID_PATTERN)
# What rabbitkeys' own clients name their reply queues with (a uuid4 hex).
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# AMQP limits exchange names to 127 characters (pamqp checks it before sending).
_MAX_EXCHANGE_NAME = 127


def check_job_type(job_type: object) -> str:
    if not isinstance(job_type, str) or not _JOB_TYPE.fullmatch(job_type):
        raise InvalidKeyError(
            f"job type must be 1-64 characters of letters, digits, '_', ':' or '-', "
            f"got {job_type!r}"
        )
    return job_type


def check_worker_id(worker_id: object) -> str:
    """Raises :class:`ConfigError` unless ``worker_id`` can name a worker's inbox."""
    if not isinstance(worker_id, str) or not _WORKER_ID.fullmatch(worker_id):
        raise ConfigError(
            f"worker id must be 1-128 characters of letters, digits, '_', '.', ':', '@' or "
            f"'-', got {worker_id!r}"
        )
    return worker_id


def check_key(key: object) -> str:
    """Validate a key (a non-empty str of at most 1,024 UTF-8 bytes, valid Unicode);
    raises :class:`InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is {size} bytes in UTF-8, the maximum is {MAX_KEY_BYTES}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError("key must be valid Unicode (no lone surrogates)") from None
    return key


def _token_for(key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return key
    # accents dropped ("été" -> "ete"), other runs of characters a name cannot have -> "_"
    folded = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode("ascii")
    hint = _NOT_PLAIN.sub("_", folded)[:_HINT_CHARS]
    return f"{hint}#{hashlib.blake2b(key.encode('utf-8'), digest_size=20).hexdigest()}"


def is_token(token: str) -> bool:
    """Whether ``token`` is a token this version makes (plain or hashed)."""
    return bool(_PLAIN_KEY.fullmatch(token) or _HASHED_TOKEN.fullmatch(token))


def key_matches_token(key: str, token: str) -> bool:
    """Whether ``key`` may stand for ``token``: its own token, or the token itself (what a
    key adopted from the broker is known by until a publisher names it)."""
    return key == token or _token_for(key) == token


@dataclass(frozen=True, slots=True)
class KeyRef:
    """One key of one job type. ``token`` is the key's stable, name-safe form."""

    job_type: str
    key: str
    token: str

    @classmethod
    def of(cls, key: object, job_type: object = DEFAULT_JOB_TYPE) -> KeyRef:
        """Validate ``key`` and ``job_type``; raises :class:`InvalidKeyError`."""
        checked_type = check_job_type(job_type)
        checked_key = check_key(key)
        return cls(checked_type, checked_key, _token_for(checked_key))

    @property
    def id(self) -> str:
        """Unique across job types; what the registry and workers index keys by."""
        return f"{self.job_type}/{self.token}"


def new_routing_key(ref: KeyRef) -> str:
    """A routing key for a fresh binding of ``ref``'s queue.

    Each binding gets a new random suffix. A publisher that cached the routing key of a
    binding the registry has since removed gets every later message on it returned, even
    after the key is bound again: that fence is what keeps a returned message in its place
    (an old routing key can never start routing again between two of its messages).
    """
    return f"{ref.token}|{secrets.token_hex(8)}"


def key_queue_arguments(
    expires_seconds: float, queue_type: str = "classic", broker: tuple[int, int] = (3, 10)
) -> dict[str, Any]:
    """A key queue's arguments: it expires unconsumed (the backstop), one consumer at a
    time receives (single active consumer), of ``queue_type``, and placed on the cluster's
    least loaded node (:func:`placement_arguments`)."""
    return {
        "x-expires": int(expires_seconds * 1000),
        "x-single-active-consumer": True,
        # Classic queues: on cancel with unacked deliveries the standby waits for them to be
        # settled (measured on 3.10); quorum queues activate it at once and reorder, which
        # is why a worker settles every delivery before it cancels (_handoff).
        "x-queue-type": queue_type,
        **placement_arguments(queue_type, broker),
        **delivery_limit_arguments(queue_type, broker),
    }


def control_queue_arguments(queue_type: str, broker: tuple[int, int] = (3, 10)) -> dict[str, Any]:
    """The durable control queues' (registry, dead letters) arguments. Classic ones keep
    none, as every earlier version declared them (a redeclare must be equivalent)."""
    if queue_type == "classic":
        return {}
    return {
        "x-queue-type": queue_type,
        **placement_arguments(queue_type, broker),
        **delivery_limit_arguments(queue_type, broker),
    }


def key_queue_durable(durable: bool, broker: tuple[int, int]) -> bool:
    """Whether key queues are declared durable. ``RABBITKEYS_DURABLE=false`` means transient
    messages (not written to disk, lost with the broker) in transient queues on RabbitMQ 3.x,
    and in durable queues from 4.0 on: RabbitMQ 4 deprecates transient non-exclusive queues
    and 4.3 refuses them by default (the connection is closed with ``INTERNAL_ERROR``), so a
    key queue there is durable whatever the setting and only its messages are transient."""
    return durable or broker >= (4, 0)


#: The operator policy that lifts RabbitMQ 4's delivery limit from quorum queues declared
#: without ``x-delivery-limit`` (by an earlier rabbitkeys, or on RabbitMQ 3.x before an
#: upgrade): ``rabbitmqctl set_operator_policy`` with this name and definition, applied to
#: quorum queues whose name starts with the namespace (docs/operate/versions.md, "Upgrading
#: to RabbitMQ 4").
UNLIMITED_DELIVERIES_POLICY = ("rabbitkeys-unlimited-deliveries", {"delivery-limit": -1})


def unlimited_deliveries_command(namespace: str) -> str:
    """The ``rabbitmqctl`` command that applies :data:`UNLIMITED_DELIVERIES_POLICY` to the
    quorum queues of ``namespace`` (an operator policy: it applies beside the users' own
    policies instead of competing with them)."""
    name, definition = UNLIMITED_DELIVERIES_POLICY
    pattern = f"^{namespace}\\."  # a namespace is letters, digits, '_' and '-' only
    return (
        f"rabbitmqctl set_operator_policy [-p VHOST] {name} '{pattern}' "
        f"'{json.dumps(definition)}' --apply-to quorum_queues"
    )


def delivery_limit_arguments(queue_type: str, broker: tuple[int, int]) -> dict[str, Any]:
    """No delivery limit on a quorum queue. RabbitMQ 4.0 and later give quorum queues a
    default limit of 20 and *drop* a message returned more often when no dead-letter
    exchange is set; every move, drain, park and crash of a key returns its head, so a key
    that moves 21 times would lose a job silently. -1 means unlimited from 4.0 on; on 3.x
    -1 means "drop at the first return" and no limit is the default, so 3.x gets none
    (both measured: docs/probes/delivery_limit.py). A redeclare must be equivalent, so a
    quorum queue declared without it keeps its limit: the operator policy
    :data:`UNLIMITED_DELIVERIES_POLICY` lifts that one."""
    if queue_type == "quorum" and broker >= (4, 0):
        return {"x-delivery-limit": -1}
    return {}


def placement_arguments(queue_type: str, broker: tuple[int, int]) -> dict[str, Any]:
    """Which node leads a new queue. The broker's default is the declaring connection's
    node: every key of a namespace on the registry's node, so that losing that node stalls
    them all. Classic queues before RabbitMQ 3.12 take ``random``: the registry declares
    new keys many at a time, and the count-based ``min-masters`` put a burst of them all on
    the node that led fewest when it started (8 of 10 keys on one node, measured; random:
    32/31/27 of 90). Later versions deprecate that argument for ``x-queue-leader-locator``,
    whose ``balanced`` is the count-based rule (what quorum queues have on every version):
    a burst may land on one node; ``rabbitmq-queues rebalance`` moves quorum leaders."""
    if queue_type == "classic" and broker < (3, 12):
        return {"x-queue-master-locator": "random"}
    return {"x-queue-leader-locator": "balanced"}


#: The holds' routing keys on ``Names.holds_exchange`` (see there).
HOLD_PAUSED = "paused"
HOLD_PARKED = "parked"
HOLD_REDRIVE = "redrive"


@dataclass(frozen=True, slots=True)
class Names:
    """Every exchange and queue name under one namespace."""

    namespace: str

    def jobs_exchange(self, job_type: str) -> str:
        """Raises :class:`InvalidKeyError` if namespace and job type together are too long
        for an exchange name (127 characters: namespace + job type <= 121)."""
        name = f"{self.namespace}.jobs.{job_type}"
        if len(name) > _MAX_EXCHANGE_NAME:
            raise InvalidKeyError(
                f"job type {job_type!r} is too long for namespace {self.namespace!r}: "
                f"exchange names are limited to {_MAX_EXCHANGE_NAME} characters "
                f"(namespace + job type <= {_MAX_EXCHANGE_NAME - len('.jobs.')})"
            )
        return name

    def key_queue(self, ref: KeyRef) -> str:
        return f"{self.namespace}.key.{ref.job_type}.{ref.token}"

    @property
    def key_queue_prefix(self) -> str:
        return f"{self.namespace}.key."

    def key_of_queue(self, queue: str) -> KeyRef | None:
        """The key a queue name belongs to, as far as the name tells: a hashed key's
        original text is not in the name, so ``key`` is then the token (messages carry the
        original in their ``x-rabbitkeys-key`` header). None for a name this version does
        not make (another namespace, or a token of an older scheme)."""
        if not queue.startswith(self.key_queue_prefix):
            return None
        job_type, dot, token = queue[len(self.key_queue_prefix) :].partition(".")
        if not dot or not _JOB_TYPE.fullmatch(job_type) or not is_token(token):
            return None
        return KeyRef(job_type, token, token)

    def key_of_report(self, queue: str, key_id: str, key: str) -> KeyRef | None:
        """The key a queue, key id and key text sent by another party (an assignment, a
        release report) stand for, if all three agree and the queue is of this namespace;
        else None: a report must not make anyone consume or adopt a foreign queue."""
        ref = self.key_of_queue(queue)
        if ref is None or ref.id != key_id or not key_matches_token(key, ref.token):
            return None
        return KeyRef(ref.job_type, key, ref.token)

    # Control traffic: one named exchange per direction, so that the right to write on it
    # (see _permissions) is the role that may send on it. Nothing uses the default exchange.

    @property
    def registry_queue(self) -> str:
        """What the leading registry consumes: bound to the requests and membership
        exchanges (a delivery's exchange tells which one, so which role, sent it)."""
        return f"{self.namespace}.registry"

    @property
    def leader_lock(self) -> str:
        """The exclusive queue whose holder leads the namespace
        (:mod:`rabbitkeys._registry.leadership`)."""
        return f"{self.namespace}.registry.leader"

    @property
    def events_queue(self) -> str:
        """The leader's exclusive queue on the broker's event exchange."""
        return f"{self.namespace}.registry.events"

    @property
    def requests_exchange(self) -> str:
        """Publishers (and the CLI) to the registry: ensure a key, status (fanout)."""
        return f"{self.namespace}.requests"

    @property
    def membership_exchange(self) -> str:
        """Workers to the registry: join, heartbeat, released, leave (fanout)."""
        return f"{self.namespace}.membership"

    @property
    def commands_exchange(self) -> str:
        """The registry to workers (direct): routing key :meth:`worker_route` for one
        worker, :attr:`all_workers_route` for every worker."""
        return f"{self.namespace}.commands"

    @staticmethod
    def worker_route(worker_id: str, session: str) -> str:
        """One worker's commands. The session is a secret only the worker and the registry
        know, so no one else can bind a queue that receives them; and the binding of this
        route to the worker's exclusive inbox, which only the inbox's connection can make,
        proves which session owns the worker id (``_wire.senders.WorkerSessions``)."""
        return f"worker.{worker_id}.{session}"

    #: the commands routing key every worker's inbox is bound with (a broadcast)
    all_workers_route = "all"

    @property
    def replies_exchange(self) -> str:
        """The registry's answers (direct): the routing key is the reply queue's name."""
        return f"{self.namespace}.replies"

    @property
    def dead_letter_exchange(self) -> str:
        """Workers' dead letters, to :attr:`dead_letter_queue` (fanout)."""
        return f"{self.namespace}.dead-letters"

    @property
    def operations_exchange(self) -> str:
        """Operators to the registry (fanout, bound to :attr:`registry_queue`): list keys,
        pause, resume, skip, redrive. Only the registry's role may write on it (an
        administrator may anyway), so a publisher's credential cannot operate keys."""
        return f"{self.namespace}.operations"

    @property
    def holds_exchange(self) -> str:
        """Where the registry keeps its holds, durably, as bindings (direct, internal: no
        one can publish to it, so a binding here never routes a message). A key queue bound
        with routing key ``HOLD_PAUSED``/``HOLD_PARKED``/``HOLD_REDRIVE`` is held so; a
        jobs exchange bound with ``HOLD_PAUSED`` is a paused job type. A new leader reads
        them back from the management API before it places any key."""
        return f"{self.namespace}.holds"

    @property
    def control_exchanges(self) -> tuple[str, ...]:
        """Every exchange of the namespace but the jobs exchanges."""
        return (
            self.requests_exchange,
            self.membership_exchange,
            self.commands_exchange,
            self.replies_exchange,
            self.dead_letter_exchange,
            self.operations_exchange,
            self.holds_exchange,
        )

    def worker_inbox(self, worker_id: str) -> str:
        return f"{self.namespace}.worker.{worker_id}"

    def reply_queue(self, client_id: str) -> str:
        return f"{self.namespace}.reply.{client_id}"

    def is_reply_queue(self, name: str) -> bool:
        """Whether ``name`` is a reply queue of this namespace: the only queues the registry
        answers to (``reply_to`` comes from whoever sent the request)."""
        prefix = self.reply_queue("")
        return name.startswith(prefix) and bool(_CLIENT_ID.fullmatch(name[len(prefix) :]))

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead-letter"

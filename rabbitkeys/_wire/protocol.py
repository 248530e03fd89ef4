"""The control messages exchanged by publishers, workers and the registry, as typed models.

They travel as JSON over AMQP: requests to the registry's queue, commands to each worker's
inbox, replies to the asking client's reply queue (``reply_to`` + ``correlation_id``).

    publisher ── EnsureKey ──────────▶ registry ── Ensured | Refused ──▶ publisher
    publisher ── EnsureKeys ─────────▶ registry ── KeysEnsured ───────▶ publisher
    worker    ── WorkerJoin ─────────▶ registry ── Assign / Release ──▶ worker
    worker    ── WorkerHeartbeat ────▶ registry ── Sync (fanout) ─────▶ every worker
    worker    ── Released ───────────▶ registry (after a Release: the key is free)
    worker    ── KeyParked ──────────▶ registry (its head failed every attempt; parked)
    worker    ── WorkerLeave ────────▶ registry
    cli       ── StatusRequest ──────▶ registry ── Status ────────────▶ cli
    operator  ── KeysRequest ────────▶ registry ── KeysPage ──────────▶ operator
    operator  ── HoldRequest ────────▶ registry ── HoldReply ─────────▶ operator
    operator  ── RedriveRequest ─────▶ registry ── RedriveReply ──────▶ operator

Operator requests travel through ``NS.operations`` (only the registry's role, or an
administrator, may write there), never through ``NS.requests``: a publisher's credential
must not pause, skip or redrive keys, nor list them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from .._errors import ProtocolError
from .topology import WORKER_ID_PATTERN, check_key, is_token

__all__ = [
    "MAX_CONTROL_MESSAGE_BYTES",
    "MAX_JOB_TYPES",
    "MAX_KEYS_PER_MESSAGE",
    "MAX_REPLY_BYTES",
    "REFUSED_ERROR",
    "REFUSED_QUOTA_EXCEEDED",
    "REFUSED_UNAVAILABLE",
    "Assign",
    "ControlMessage",
    "MAX_FAILING_PER_HEARTBEAT",
    "MAX_KEYS_PER_PAGE",
    "EnsureKey",
    "EnsureKeys",
    "Ensured",
    "HoldReply",
    "HoldRequest",
    "KeyFailure",
    "KeyInfo",
    "KeyAnswer",
    "KeyParked",
    "KeyToEnsure",
    "KeysEnsured",
    "KeysPage",
    "KeysRequest",
    "RedriveKeySummary",
    "RedriveReply",
    "RedriveRequest",
    "KeyAssignment",
    "Refused",
    "Release",
    "Released",
    "Status",
    "StatusRequest",
    "Sync",
    "WorkerHeartbeat",
    "WorkerJoin",
    "WorkerLeave",
    "WorkerStatus",
    "decode_control",
    "encode_control",
    "split",
]

#: Longest control message a registry or worker parses; a longer one is dropped unread
#: (a 25 MB join stalled the registry's event loop for 1.4 s). Lists longer than fit are
#: sent in several messages (:func:`split`).
MAX_CONTROL_MESSAGE_BYTES = 1024 * 1024
#: Longest reply a client parses (a status of many workers); it asked for it.
MAX_REPLY_BYTES = 16 * 1024 * 1024
#: Most keys (assignments or key ids) in one message.
MAX_KEYS_PER_MESSAGE = 4096
#: Most job types one worker serves.
MAX_JOB_TYPES = 1000
#: Most failing keys one heartbeat reports (the rest: by the next heartbeats).
MAX_FAILING_PER_HEARTBEAT = 1000
#: Most keys in one page of ``rabbitkeys keys``.
MAX_KEYS_PER_PAGE = 1000
#: Most keys one redrive reply lists.
_MAX_REDRIVE_KEYS = 10_000
#: Most workers in one status reply.
_MAX_WORKERS = 100_000
_MAX_REASON = 4096


def _check_key_id(key_id: str) -> str:
    _, slash, token = key_id.partition("/")
    if not slash or not is_token(token):
        raise ValueError("not a key id (job type '/' token)")
    return key_id


def _check_short_string(value: str) -> str:
    if len(value.encode("utf-8")) > 255:
        raise ValueError("longer than 255 bytes in UTF-8")
    return value


# Every field is bounded: control messages come from the network.
_JobType = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:-]{1,64}$")]
_Key = Annotated[str, AfterValidator(check_key)]
_KeyId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_:-]{1,64}/[A-Za-z0-9_.:@#-]{1,120}$"),
    AfterValidator(_check_key_id),
]
_WorkerId = Annotated[str, StringConstraints(pattern=f"^{WORKER_ID_PATTERN}$")]
_Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# a worker's secret for one connection (see WorkerJoin.session)
_Session = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# the names rabbitkeys builds: namespace, kind, job type and token, joined by dots
_QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:@#-]{1,255}$")]
# any routing key a binding can have (the registry learns some from the broker's listing)
_RoutingKey = Annotated[str, StringConstraints(max_length=255), AfterValidator(_check_short_string)]
_Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
_Reason = Annotated[str, StringConstraints(max_length=_MAX_REASON)]


class _Model(BaseModel):
    # strict: a string is not a number, "true" is not a bool; unknown fields are ignored
    # (a newer party may send more)
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)


class KeyAssignment(_Model):
    """A key a worker must consume: everything it needs to check and consume its queue."""

    key_id: _KeyId
    job_type: _JobType
    key: _Key
    queue: _QueueName
    routing_key: _RoutingKey | None = None
    #: the registry declared the queue just before this assignment (it had the declare-ok):
    #: the worker may consume without checking it first (a passive declare: a round trip
    #: per new key). Absent (False) for keys adopted, moved or reassigned, whose queue may
    #: be gone; a party that does not know the field checks, as before.
    fresh: bool = False

    @model_validator(mode="after")
    def _same_job_type(self) -> Self:
        if self.key_id.partition("/")[0] != self.job_type:
            raise ValueError("key_id and job_type disagree")
        return self


class EnsureKey(_Model):
    """Publisher → registry: route this key (declare, bind, assign) and tell me its routing key.

    ``stale_routing_key`` is the routing key a message just came back on, if any: the
    registry then knows that binding is gone even if its own state says otherwise.
    """

    type: Literal["ensure_key"] = "ensure_key"
    job_type: _JobType
    key: _Key
    stale_routing_key: _RoutingKey | None = None


class Ensured(_Model):
    type: Literal["ensured"] = "ensured"
    routing_key: _RoutingKey


#: ``Refused.code``: anything else (the reason says what); also what an older registry meant
REFUSED_ERROR = "error"
#: ``Refused.code``: a new key beyond the namespace's limits (the publisher raises
#: :class:`~rabbitkeys.QuotaExceededError`)
REFUSED_QUOTA_EXCEEDED = "quota_exceeded"
#: ``Refused.code``: the key's queue exists but cannot be reached now (on a cluster, its
#: node is down); the publisher asks again until the message's publish timeout
REFUSED_UNAVAILABLE = "unavailable"


class Refused(_Model):
    type: Literal["refused"] = "refused"
    reason: _Reason
    #: machine-readable kind of refusal; a plain ``str`` so that a code added later still
    #: parses (a client treats a code it does not know as ``REFUSED_ERROR``)
    code: Annotated[str, Field(max_length=64)] = REFUSED_ERROR


class KeyToEnsure(_Model):
    """One key of an :class:`EnsureKeys`: what an :class:`EnsureKey` asks for it."""

    job_type: _JobType
    key: _Key
    stale_routing_key: _RoutingKey | None = None


class EnsureKeys(_Model):
    """Publisher → registry: :class:`EnsureKey` for several keys at once (the new keys of a
    burst), answered by one :class:`KeysEnsured`.

    A registry that does not know this message (older than it) refuses it as malformed with
    a plain :class:`Refused`; the publisher then asks each key with an :class:`EnsureKey`
    until it reconnects."""

    type: Literal["ensure_keys"] = "ensure_keys"
    keys: Annotated[list[KeyToEnsure], Field(min_length=1, max_length=MAX_KEYS_PER_MESSAGE)]


class KeyAnswer(_Model):
    """The registry's answer for one key of an :class:`EnsureKeys`, as it would have
    answered its :class:`EnsureKey`."""

    job_type: _JobType
    key: _Key
    answer: Annotated[Ensured | Refused, Field(discriminator="type")]


class KeysEnsured(_Model):
    """Registry → publisher: the answers to an :class:`EnsureKeys`, each key as soon as the
    book has it. The registry waits a moment at most for the slowest keys (a declare, a
    retirement to finish): a key it leaves out has no answer yet, and the publisher asks
    for it again (its book holds the key's state, so asking again costs one more waiter)."""

    type: Literal["keys_ensured"] = "keys_ensured"
    answers: Annotated[list[KeyAnswer], Field(max_length=MAX_KEYS_PER_MESSAGE)]


class WorkerJoin(_Model):
    """Worker → registry, at start and whenever asked to (:class:`Sync`): who I am, which
    job types I serve and which keys I consume now (so a restarted registry can rebuild)."""

    type: Literal["worker_join"] = "worker_join"
    worker_id: _WorkerId
    #: a random secret of this worker's connection, sent in each of its messages: only the
    #: registry reads them (permissions), so a message for this worker id carrying another
    #: session is someone else speaking for it (the registry refuses it while it lives)
    session: _Session
    inbox: _QueueName
    job_types: Annotated[list[_JobType], Field(max_length=MAX_JOB_TYPES)]
    #: a worker with more keys than fit in one message sends several joins (:func:`split`)
    keys: Annotated[list[KeyAssignment], Field(max_length=MAX_KEYS_PER_MESSAGE)] = Field(
        default_factory=list
    )


class KeyFailure(_Model):
    """A key whose head job failed and waits for its next attempt (for ``rabbitkeys keys``)."""

    key_id: _KeyId
    #: failed attempts of the head job so far
    attempts: _Count
    #: the last error, ``"ExceptionType: text"`` (at most 1,000 characters)
    error: _Reason


class WorkerHeartbeat(_Model):
    type: Literal["worker_heartbeat"] = "worker_heartbeat"
    worker_id: _WorkerId
    session: _Session
    owned: _Count = 0
    #: deliveries held in the worker's buffers that no handler has started yet
    waiting: _Count = 0
    #: ids of owned keys that had no delivery for the idle period and hold none now (at
    #: most MAX_KEYS_PER_MESSAGE: the rest are reported by the next heartbeats)
    idle_keys: Annotated[list[_KeyId], Field(max_length=MAX_KEYS_PER_MESSAGE)] = Field(
        default_factory=list
    )
    #: owned keys whose head is failing now (between attempts); a key not listed is not
    #: failing on this worker (an older worker sends none)
    failing: Annotated[list[KeyFailure], Field(max_length=MAX_FAILING_PER_HEARTBEAT)] = Field(
        default_factory=list
    )


class KeyParked(_Model):
    """Worker → registry: this key's head failed its last attempt and its job type's policy
    is ``park``. The worker has put the head back (unacked, requeued at its place) and lets
    the key go; its :class:`Released` follows. The key stays parked until an operator
    resumes or skips it."""

    type: Literal["key_parked"] = "key_parked"
    worker_id: _WorkerId
    session: _Session
    key: KeyAssignment
    #: the last error, ``"ExceptionType: text"`` (at most 1,000 characters)
    error: _Reason
    attempts: _Count
    #: which job of the head delivery failed (0 for a plain message; in a batch, the jobs
    #: before it were handled, and a skip dead-letters this one and those after it)
    job_index: _Count = 0


class Released(_Model):
    """Worker → registry: these keys are settled and no longer consumed here (after a
    :class:`Release`, or because the broker cancelled the consumer)."""

    type: Literal["released"] = "released"
    worker_id: _WorkerId
    session: _Session
    #: full assignments, so a registry that took over meanwhile can adopt keys it never knew
    keys: Annotated[list[KeyAssignment], Field(max_length=MAX_KEYS_PER_MESSAGE)]


class WorkerLeave(_Model):
    type: Literal["worker_leave"] = "worker_leave"
    worker_id: _WorkerId
    session: _Session


class StatusRequest(_Model):
    type: Literal["status_request"] = "status_request"
    backlog: bool = True


class WorkerStatus(_Model):
    worker_id: _WorkerId
    job_types: Annotated[list[_JobType], Field(max_length=MAX_JOB_TYPES)]
    keys: _Count
    backlog: _Count | None = None
    last_seen_seconds: Annotated[float, Field(allow_inf_nan=False)]


class Status(_Model):
    type: Literal["status"] = "status"
    namespace: _Id
    registry_id: _Id
    workers: Annotated[list[WorkerStatus], Field(max_length=_MAX_WORKERS)]
    keys: _Count
    unassigned_keys: _Count
    retiring_keys: _Count
    backlog: _Count | None = None
    #: held keys (no worker takes them until an operator acts): parked, paused (by a pause
    #: of their own or of their job type), and the job types paused as a whole
    parked_keys: _Count = 0
    paused_keys: _Count = 0
    paused_job_types: Annotated[list[_JobType], Field(max_length=MAX_JOB_TYPES)] = Field(
        default_factory=list
    )


# --- operator requests (through NS.operations) -------------------------------------------

#: what ``rabbitkeys keys --state`` filters on: a key's book state, or a hold, or failing
KeyStateFilter = Literal[
    "declaring",
    "unowned",
    "owned",
    "moving",
    "retiring",
    "redriving",
    "parked",
    "paused",
    "failing",
]


class KeysRequest(_Model):
    """Operator → registry: one page of the keys, filtered and sorted."""

    type: Literal["keys_request"] = "keys_request"
    job_type: _JobType | None = None
    worker_id: _WorkerId | None = None
    state: KeyStateFilter | None = None
    #: ``key``: by job type and key; ``backlog``: most messages first; ``age``: oldest
    #: waiting message first
    sort: Literal["key", "backlog", "age"] = "key"
    limit: Annotated[int, Field(ge=1, le=MAX_KEYS_PER_PAGE)] = 100
    #: how many matching keys to skip (the previous page's ``next_offset``)
    offset: _Count = 0


class KeyInfo(_Model):
    key_id: _KeyId
    job_type: _JobType
    key: _Key
    #: the book's state (``keybook.KeyState`` value; ``retiring`` for its four steps)
    state: Annotated[str, Field(max_length=32)]
    owner: _WorkerId | None = None
    #: ``paused``, ``parked``, ``type_paused``, ``redrive``: why no worker takes it now
    holds: Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=8)] = Field(
        default_factory=list
    )
    #: messages in its queue (ready + unacked), as of the registry's last listing; None
    #: when unknown
    backlog: _Count | None = None
    #: age of its oldest waiting message in seconds, when the broker tells it
    oldest_age_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    #: failed attempts of its head (while failing, or when parked)
    failures: _Count = 0
    last_error: _Reason | None = None
    #: when it was parked (Unix time, seconds)
    parked_at: Annotated[float, Field(allow_inf_nan=False)] | None = None


class KeysPage(_Model):
    type: Literal["keys_page"] = "keys_page"
    keys: Annotated[list[KeyInfo], Field(max_length=MAX_KEYS_PER_PAGE)]
    #: keys matching the filter, over all pages
    total: _Count
    #: the offset of the next page; None on the last one
    next_offset: _Count | None = None
    #: how old the backlog and age figures are (seconds since the registry's listing);
    #: None if it has none yet (management API unreachable)
    listed_seconds_ago: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    #: job types paused as a whole
    paused_job_types: Annotated[list[_JobType], Field(max_length=MAX_JOB_TYPES)] = Field(
        default_factory=list
    )


class HoldRequest(_Model):
    """Operator → registry: pause or resume a key or a whole job type; skip a parked key's
    head (dead-letter it, then resume)."""

    type: Literal["hold_request"] = "hold_request"
    action: Literal["pause", "resume", "skip"]
    job_type: _JobType
    #: None: the whole job type (pause and resume only)
    key: _Key | None = None


class HoldReply(_Model):
    type: Literal["hold_reply"] = "hold_reply"
    ok: bool
    #: what happened, or why not, in words for the operator
    detail: _Reason


class RedriveRequest(_Model):
    """Operator → registry: put dead letters back at the head of their keys, in their
    original order, before the messages waiting there. ``apply`` False: a dry run (counts
    only, nothing moves)."""

    type: Literal["redrive_request"] = "redrive_request"
    #: None with ``key`` None: every dead letter
    job_type: _JobType | None = None
    #: needs ``job_type``
    key: _Key | None = None
    apply: bool = False

    @model_validator(mode="after")
    def _key_needs_job_type(self) -> Self:
        if self.key is not None and self.job_type is None:
            raise ValueError("a key needs its job type")
        return self


class RedriveKeySummary(_Model):
    job_type: _JobType
    key: _Key
    messages: _Count
    #: apply only: None if done, else why this key's dead letters stayed where they were
    error: _Reason | None = None


class RedriveReply(_Model):
    type: Literal["redrive_reply"] = "redrive_reply"
    applied: bool
    #: the selected keys (at most 10,000 listed; ``messages`` counts them all)
    keys: Annotated[list[RedriveKeySummary], Field(max_length=_MAX_REDRIVE_KEYS)]
    #: selected dead letters (redriven, if applied and no key has an error)
    messages: _Count
    #: dead letters not selected (left in the dead-letter queue), and unreadable ones
    #: (no key or job type header: left there too)
    not_selected: _Count = 0
    unreadable: _Count = 0


class Assign(_Model):
    """Registry → worker: consume these keys (idempotent)."""

    type: Literal["assign"] = "assign"
    keys: Annotated[list[KeyAssignment], Field(max_length=MAX_KEYS_PER_MESSAGE)]


class Release(_Model):
    """Registry → worker: stop consuming these keys (by key id) after settling in-flight."""

    type: Literal["release"] = "release"
    key_ids: Annotated[list[_KeyId], Field(max_length=MAX_KEYS_PER_MESSAGE)]


class Sync(_Model):
    """Registry → workers: send a :class:`WorkerJoin` with your keys (after a registry start)."""

    type: Literal["sync"] = "sync"


ControlMessage = Annotated[
    EnsureKey
    | EnsureKeys
    | KeysEnsured
    | Ensured
    | Refused
    | WorkerJoin
    | WorkerHeartbeat
    | WorkerLeave
    | Released
    | KeyParked
    | StatusRequest
    | Status
    | KeysRequest
    | KeysPage
    | HoldRequest
    | HoldReply
    | RedriveRequest
    | RedriveReply
    | Assign
    | Release
    | Sync,
    Field(discriminator="type"),
]

_adapter: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)


def encode_control(message: _Model) -> bytes:
    return message.model_dump_json().encode()


def decode_control(body: bytes, *, max_bytes: int = MAX_CONTROL_MESSAGE_BYTES) -> ControlMessage:
    """Parse a control message; raises :class:`ProtocolError` on anything malformed or
    longer than ``max_bytes`` (checked before parsing)."""
    if len(body) > max_bytes:
        raise ProtocolError(
            f"control message of {len(body)} bytes refused unread (maximum {max_bytes})"
        )
    try:
        return _adapter.validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise ProtocolError(f"malformed control message at {where}: {first['msg']}") from None


_Item = TypeVar("_Item", KeyAssignment, str)
_Message = TypeVar("_Message", bound=_Model)
_str_json: TypeAdapter[str] = TypeAdapter(str)


def split(items: Sequence[_Item], make: Callable[[list[_Item]], _Message]) -> list[_Message]:
    """``make`` applied to consecutive slices of ``items``, each small enough for one
    control message (at most MAX_KEYS_PER_MESSAGE items and MAX_CONTROL_MESSAGE_BYTES).
    At least one message, even for no items."""
    base = len(encode_control(make([])))
    messages: list[_Message] = []
    batch: list[_Item] = []
    size = base
    for item in items:
        if isinstance(item, KeyAssignment):
            item_size = len(item.model_dump_json().encode())
        else:
            item_size = len(_str_json.dump_json(item))
        item_size += 1  # the comma
        if batch and (
            len(batch) >= MAX_KEYS_PER_MESSAGE or size + item_size > MAX_CONTROL_MESSAGE_BYTES
        ):
            messages.append(make(batch))
            batch, size = [], base
        batch.append(item)
        size += item_size
    if batch or not messages:
        messages.append(make(batch))
    return messages

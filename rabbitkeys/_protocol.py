"""The control messages exchanged by publishers, workers and the registry, as typed models.

They travel as JSON over AMQP: requests to the registry's queue, commands to each worker's
inbox, replies to the asking client's reply queue (``reply_to`` + ``correlation_id``).

    publisher ── EnsureKey ──────────▶ registry ── Ensured | Refused ──▶ publisher
    worker    ── WorkerJoin ─────────▶ registry ── Assign / Release ──▶ worker
    worker    ── WorkerHeartbeat ────▶ registry ── Sync (fanout) ─────▶ every worker
    worker    ── Released ───────────▶ registry (after a Release: the key is free)
    worker    ── WorkerLeave ────────▶ registry
    cli       ── StatusRequest ──────▶ registry ── Status ────────────▶ cli
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

from ._errors import ProtocolError
from ._topology import WORKER_ID_PATTERN, check_key, is_token

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
    "EnsureKey",
    "Ensured",
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
    "decode",
    "encode",
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
    | Ensured
    | Refused
    | WorkerJoin
    | WorkerHeartbeat
    | WorkerLeave
    | Released
    | StatusRequest
    | Status
    | Assign
    | Release
    | Sync,
    Field(discriminator="type"),
]

_adapter: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)


def encode(message: _Model) -> bytes:
    return message.model_dump_json().encode()


def decode(body: bytes, *, max_bytes: int = MAX_CONTROL_MESSAGE_BYTES) -> ControlMessage:
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
    base = len(encode(make([])))
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

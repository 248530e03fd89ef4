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

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._errors import ProtocolError

__all__ = [
    "REFUSED_ERROR",
    "REFUSED_QUOTA_EXCEEDED",
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
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class KeyAssignment(_Model):
    """A key a worker must consume: everything it needs to declare and consume its queue."""

    key_id: str
    job_type: str
    key: str
    queue: str
    routing_key: str | None = None


class EnsureKey(_Model):
    """Publisher → registry: route this key (declare, bind, assign) and tell me its routing key.

    ``stale_routing_key`` is the routing key a message just came back on, if any: the
    registry then knows that binding is gone even if its own state says otherwise.
    """

    type: Literal["ensure_key"] = "ensure_key"
    job_type: str
    key: str
    stale_routing_key: str | None = None


class Ensured(_Model):
    type: Literal["ensured"] = "ensured"
    routing_key: str


#: ``Refused.code``: anything else (the reason says what); also what an older registry meant
REFUSED_ERROR = "error"
#: ``Refused.code``: a new key beyond the namespace's limits (the publisher raises
#: :class:`~rabbitkeys.QuotaExceededError`)
REFUSED_QUOTA_EXCEEDED = "quota_exceeded"


class Refused(_Model):
    type: Literal["refused"] = "refused"
    reason: str
    #: machine-readable kind of refusal; a plain ``str`` so that a code added later still
    #: parses (a client treats a code it does not know as ``REFUSED_ERROR``)
    code: str = REFUSED_ERROR


class WorkerJoin(_Model):
    """Worker → registry, at start and whenever asked to (:class:`Sync`): who I am, which
    job types I serve and which keys I consume now (so a restarted registry can rebuild)."""

    type: Literal["worker_join"] = "worker_join"
    worker_id: str
    inbox: str
    job_types: list[str]
    keys: list[KeyAssignment] = Field(default_factory=list)


class WorkerHeartbeat(_Model):
    type: Literal["worker_heartbeat"] = "worker_heartbeat"
    worker_id: str
    owned: int = 0
    #: deliveries held in the worker's buffers that no handler has started yet
    waiting: int = 0
    #: ids of owned keys that had no delivery for the idle period and hold none now
    idle_keys: list[str] = Field(default_factory=list)


class Released(_Model):
    """Worker → registry: these keys are settled and no longer consumed here (after a
    :class:`Release`, or because the broker cancelled the consumer)."""

    type: Literal["released"] = "released"
    worker_id: str
    #: full assignments, so a registry that took over meanwhile can adopt keys it never knew
    keys: list[KeyAssignment]


class WorkerLeave(_Model):
    type: Literal["worker_leave"] = "worker_leave"
    worker_id: str


class StatusRequest(_Model):
    type: Literal["status_request"] = "status_request"
    backlog: bool = True


class WorkerStatus(_Model):
    worker_id: str
    job_types: list[str]
    keys: int
    backlog: int | None = None
    last_seen_seconds: float


class Status(_Model):
    type: Literal["status"] = "status"
    namespace: str
    registry_id: str
    workers: list[WorkerStatus]
    keys: int
    unassigned_keys: int
    retiring_keys: int
    backlog: int | None = None


class Assign(_Model):
    """Registry → worker: consume these keys (idempotent)."""

    type: Literal["assign"] = "assign"
    keys: list[KeyAssignment]


class Release(_Model):
    """Registry → worker: stop consuming these keys (by key id) after settling in-flight."""

    type: Literal["release"] = "release"
    key_ids: list[str]


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


def decode(body: bytes) -> ControlMessage:
    """Parse a control message; raises :class:`ProtocolError` on anything malformed."""
    try:
        return _adapter.validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise ProtocolError(f"malformed control message at {where}: {first['msg']}") from None

"""Celery's task message (protocol 2) as a rabbitkeys job carries it: the body Celery would
send (``(args, kwargs, embed)`` in the task's serializer, JSON by default) and Celery's
headers (``task``, ``id``, ``retries``, ``timelimit``, ``expires``...) as the job's headers.
Both sides of the bridge meet here: :func:`task_message` makes a job of a task call, and
:func:`read_job` reads one back in the worker.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.backends.rpc import RPCBackend
from kombu.serialization import dumps, loads, prepare_accept_content

from .._errors import FailJob
from .._wire.payload import Encoded
from .._worker.app import Message

__all__ = [
    "CONTENT_ENCODING_HEADER",
    "CeleryJob",
    "TaskMessage",
    "read_job",
    "replies_to_caller",
    "task_message",
]

#: the body's content encoding ("utf-8" for JSON, "binary" for pickle), which a Celery
#: message carries in its properties and a rabbitkeys job in this header
CONTENT_ENCODING_HEADER = "x-celery-content-encoding"

#: ``apply_async`` options that make no sense for a job of a key, and why
REFUSED_OPTIONS = {
    "countdown": "a job that waits holds every later job of its key: delay inside the task, "
    "or send it with plain Celery",
    "eta": "a job that waits holds every later job of its key: delay inside the task, "
    "or send it with plain Celery",
    "queue": "a job's queue is its key's",
    "exchange": "a job's queue is its key's",
    "routing_key": "a job's queue is its key's",
    "priority": "a key's jobs run in publish order",
    "link": "callbacks are not supported: call the next task from the task",
    "link_error": "errbacks are not supported: catch the error in the task",
    "chain": "chains are not supported: call the next task from the task",
    "chord": "chords are not supported",
    "group_id": "groups are not supported",
    "compression": "a job's body travels as the serializer made it",
}

#: ``apply_async`` options Celery users pass out of habit, with nothing to do here: the
#: publish is retried until ``RABBITKEYS_PUBLISH_TIMEOUT`` (``timeout=``) whatever they say
IGNORED_OPTIONS = ("retry", "retry_policy", "producer", "connection", "add_to_parent")


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """What :func:`task_message` made of a task call."""

    task_id: str
    payload: Encoded
    headers: dict[str, Any]


def task_message(
    task: Task,
    args: Any = None,
    kwargs: Any = None,
    *,
    task_id: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> TaskMessage:
    """The job a call of ``task`` travels as: Celery's own message for it, headers and
    body (``app.amqp.as_task_v2``), the arguments serialised with the task's serializer.
    Raises ``TypeError`` for an option a job of a key cannot honour (:data:`REFUSED_OPTIONS`)
    and kombu's ``EncodeError`` for arguments the serializer cannot carry."""
    options = dict(options or {})
    for name in IGNORED_OPTIONS:
        options.pop(name, None)
    for name in options:
        if name in REFUSED_OPTIONS:
            raise TypeError(f"{name}= is not supported by rabbitkeys: {REFUSED_OPTIONS[name]}")
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    app = task._get_app()
    task_id = task_id or str(uuid.uuid4())
    serializer = options.pop("serializer", None) or task.serializer
    extra_headers = options.pop("headers", None) or {}
    root_id = options.pop("root_id", None)
    parent_id = options.pop("parent_id", None)
    parent = app.current_worker_task  # a task sent from a task: its parent, as Celery does
    if parent is not None:
        root_id = root_id or parent.request.root_id or parent.request.id
        parent_id = parent_id or parent.request.id
    time_limit = options.pop("time_limit", None)
    soft_time_limit = options.pop("soft_time_limit", None)
    ignore_result = options.pop("ignore_result", task.ignore_result)
    message = app.amqp.as_task_v2(
        task_id,
        task.name,
        args,
        kwargs,
        expires=_expires(options.pop("expires", task.expires)),
        time_limit=time_limit if time_limit is not None else task.time_limit,
        soft_time_limit=soft_time_limit if soft_time_limit is not None else task.soft_time_limit,
        root_id=root_id,
        parent_id=parent_id,
        shadow=options.pop("shadow", None),
        ignore_result=ignore_result,
        # rpc://: the caller's reply queue (this thread's, as Celery's own send)
        reply_to=app.thread_oid if replies_to_caller(app) and not ignore_result else None,
    )
    if options:
        raise TypeError(f"unknown apply_async options: {', '.join(sorted(options))}")
    content_type, content_encoding, data = dumps(message.body, serializer=serializer)
    if isinstance(data, str):
        data = data.encode(content_encoding)
    headers = {**extra_headers, **_table(message.headers)}
    headers[CONTENT_ENCODING_HEADER] = content_encoding
    if message.properties.get("reply_to"):  # the worker's request.reply_to
        headers["reply_to"] = message.properties["reply_to"]
    return TaskMessage(task_id, Encoded(bytes(data), content_type), headers)


def replies_to_caller(app: Any) -> bool:
    """The app's result backend is ``rpc://``: a worker sends a result as a message to the
    caller's reply queue (``reply_to``), over the Celery app's own broker connection, and
    stores nothing."""
    return isinstance(app.backend, RPCBackend)


def _expires(expires: Any) -> Any:
    """``expires=`` as Celery takes it: seconds from now, or a datetime."""
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires)
    return expires


def _table(value: Any) -> Any:
    """Celery's headers as an AMQP field table holds them: tuples as lists."""
    if isinstance(value, Mapping):
        return {str(name): _table(item) for name, item in value.items()}
    if isinstance(value, tuple | list):
        return [_table(item) for item in value]
    return value


@dataclass(slots=True)
class CeleryJob:
    """A Celery task message as the worker runs it."""

    name: str
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: the retries Celery counted before the message was sent (0 for a new call)
    retries: int
    #: (hard, soft) seconds, either None
    time_limits: tuple[float | None, float | None]
    expires: datetime.datetime | None
    #: the fields of Celery's request context (``self.request`` in a bound task)
    request: dict[str, Any] = field(default_factory=dict)

    def expired(self) -> bool:
        return self.expires is not None and self.expires <= datetime.datetime.now(datetime.UTC)


def read_job(message: Message[Any], accept: Any = None) -> CeleryJob:
    """The Celery task a job carries; ``accept``: the content types the worker takes
    (the Celery app's ``accept_content``). Raises :class:`~rabbitkeys.FailJob` for a job
    that is not a Celery task message, or not one this worker accepts (no retry changes
    that)."""
    headers = dict(message.headers)
    name = headers.get("task")
    task_id = headers.get("id")
    if not isinstance(name, str) or not isinstance(task_id, str):
        raise FailJob(
            "not a Celery task message (no 'task' and 'id' headers): publish it with "
            "rabbitkeys.celery.ordered(task)"
        )
    try:
        body = loads(
            message.body,
            message.content_type or "application/json",
            headers.get(CONTENT_ENCODING_HEADER, "utf-8"),
            accept=prepare_accept_content(accept) if accept is not None else None,
        )
        args, kwargs, embed = body
    except Exception as exc:
        raise FailJob(f"task {name} [{task_id}]: unreadable body") from exc
    timelimit = headers.get("timelimit") or [None, None]
    request = {
        **headers,
        **(embed or {}),
        "id": task_id,
        "task": name,
        "args": list(args),
        "kwargs": dict(kwargs),
        "correlation_id": task_id,
        "delivery_info": {
            "exchange": "",
            "routing_key": message.key,
            "priority": None,
            "redelivered": message.redelivered,
        },
        "is_eager": False,
    }
    return CeleryJob(
        name=name,
        task_id=task_id,
        args=tuple(args),
        kwargs=dict(kwargs),
        retries=int(headers.get("retries") or 0),
        time_limits=(timelimit[0], timelimit[1]),
        expires=_parse_time(headers.get("expires")),
        request=request,
    )


def _parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        moment = datetime.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment

"""Sending a Celery task through rabbitkeys: :func:`ordered` wraps a task so that its calls
go to their key's queue, and :class:`OrderedTask` is a task base class whose
``apply_async`` takes ``key=``. Both return Celery's ``AsyncResult``, and publish as
``Publisher.publish`` does: returned once the broker confirmed the job into its key's
queue, ``PublishError`` / ``PublishOutcomeUnknownError`` when not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Signature, Task
from celery.result import AsyncResult

from .._publisher.publisher import Publisher
from .._publisher.sync import SyncPublisher, default_publisher
from .._wire.topology import KeyRef
from ._protocol import TaskMessage, task_message

__all__ = ["JOB_TYPE", "Ordered", "OrderedTask", "ordered"]

#: the job type every Celery task travels as, so that one key's calls of different tasks
#: share its queue and keep their order ("post A"'s create_comment, then its delete_comment)
JOB_TYPE = "celery"


class Ordered:
    """A Celery task whose calls run one at a time per key, in the order they were made.

    ``apply_async`` and ``delay`` block until the broker confirmed the job (a
    :class:`~rabbitkeys.SyncPublisher`: the process's default one unless one is given);
    ``aapply_async`` and ``adelay`` are their ``async`` twins (an async
    :class:`~rabbitkeys.Publisher` if one is given, else the sync one's ``submit``). Under
    Celery's ``task_always_eager`` (tests) a call runs at once in the caller, as Celery's
    own ``delay`` does then."""

    __slots__ = ("_job_type", "_key", "_publisher", "task")

    def __init__(
        self,
        task: Task,
        key: str | None = None,
        *,
        publisher: Publisher | SyncPublisher | None = None,
        job_type: str = JOB_TYPE,
    ) -> None:
        if isinstance(task, Signature):
            raise TypeError(
                f"ordered() takes a Celery task, not a signature ({task!r}): "
                "ordered(sig.type, key).apply_async(sig.args, sig.kwargs, **sig.options)"
            )
        if not isinstance(task, Task):
            raise TypeError(f"ordered() takes a Celery task (an @app.task function), not {task!r}")
        self.task = task
        self._key = key
        self._publisher = publisher
        self._job_type = job_type

    def __repr__(self) -> str:
        return f"<ordered {self.task.name} key={self._key!r}>"

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task for ``key`` (or the key given to :func:`ordered`); return once the
        broker confirmed it. ``timeout``: the publish's, instead of
        ``RABBITKEYS_PUBLISH_TIMEOUT``. ``options``: Celery's ``expires``,
        ``time_limit``, ``soft_time_limit``, ``ignore_result``, ``serializer``,
        ``headers``, ``shadow``; ``countdown``, ``eta``, ``queue``, links and the like
        raise ``TypeError`` (a job of a key cannot honour them)."""
        key, message = self._message(args, kwargs, key, task_id, options)
        if self._eager:
            return self.task.apply(args, kwargs, task_id=message.task_id)
        publisher = self._publisher
        if isinstance(publisher, Publisher):
            raise TypeError(
                "this task was given an async Publisher: use `await ...aapply_async(...)`"
            )
        self._expect_reply(message)
        (publisher or default_publisher()).publish(
            key, message.payload, job_type=self._job_type, headers=message.headers, timeout=timeout
        )
        return self.task.AsyncResult(message.task_id)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``apply_async(args, kwargs)`` for the key given to :func:`ordered`."""
        return self.apply_async(args, kwargs)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncResult:
        """:meth:`apply_async` for ``async`` code: awaits the broker's confirm."""
        key, message = self._message(args, kwargs, key, task_id, options)
        if self._eager:
            return self.task.apply(args, kwargs, task_id=message.task_id)
        self._expect_reply(message)  # blocks, as Celery's own apply_async, with rpc:// only
        publisher = self._publisher
        if isinstance(publisher, Publisher):
            await publisher.publish(
                key,
                message.payload,
                job_type=self._job_type,
                headers=message.headers,
                timeout=timeout,
            )
        else:
            future = (publisher or default_publisher()).submit(
                key,
                message.payload,
                job_type=self._job_type,
                headers=message.headers,
                timeout=timeout,
            )
            await asyncio.wrap_future(future)
        return self.task.AsyncResult(message.task_id)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``aapply_async(args, kwargs)`` for the key given to :func:`ordered`."""
        return await self.aapply_async(args, kwargs)

    @property
    def _eager(self) -> bool:
        """Celery's ``task_always_eager`` (tests): the call runs here, at once, as Celery
        runs it (``task.apply``), after the same checks of its key and options."""
        return bool(self.task._get_app().conf.task_always_eager)

    def _expect_reply(self, message: TaskMessage) -> None:
        """With the ``rpc://`` result backend: declare this thread's reply queue before the
        job is sent, as Celery's ``apply_async`` does (``backend.on_task_call``), so that a
        result that comes before ``get()`` waits there. Over the Celery app's broker
        connection: the result travels there, not through rabbitkeys."""
        if "reply_to" not in message.headers:
            return
        app = self.task._get_app()
        with app.producer_or_acquire() as producer:
            app.backend.on_task_call(producer, message.task_id)

    def _message(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        key: str | None,
        task_id: str | None,
        options: dict[str, Any],
    ) -> tuple[str, TaskMessage]:
        key = key if key is not None else self._key
        if key is None:
            raise TypeError(
                f"no key for {self.task.name}: ordered(task, key=...) or apply_async(..., key=...)"
            )
        KeyRef.of(key, self._job_type)  # an unusable key fails here, eager or not
        return key, task_message(self.task, args, kwargs, task_id=task_id, options=options)


def ordered(
    task: Task,
    key: str | None = None,
    *,
    publisher: Publisher | SyncPublisher | None = None,
    job_type: str = JOB_TYPE,
) -> Ordered:
    """``task`` sent through rabbitkeys: ``ordered(task).apply_async(args, kwargs,
    key="post A")``, or ``ordered(task, "post A").delay(*args, **kwargs)``. A key's calls
    run one at a time, in the order they were made, on a ``rabbitkeys worker --celery``;
    different keys run concurrently."""
    return Ordered(task, key, publisher=publisher, job_type=job_type)


class OrderedTask(Task):
    """A Celery task base class whose ``apply_async`` takes ``key=``: with a key, the call
    goes through rabbitkeys (:func:`ordered`); without one, to Celery as before. For one
    task: ``@app.task(base=OrderedTask)``; for all: ``Celery(..., task_cls=OrderedTask)``."""

    abstract = True

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        *,
        key: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Celery's ``apply_async``; with ``key=``, the call goes through rabbitkeys
        (:meth:`Ordered.apply_async`, the same options)."""
        if key is None:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        if link is not None or link_error is not None:
            raise TypeError("link= and link_error= are not supported with key=")
        if shadow is not None:
            options["shadow"] = shadow
        return ordered(self).apply_async(args, kwargs, key=key, task_id=task_id, **options)

"""Publishing from sync code (Django and Flask views, scripts): :class:`SyncPublisher`, a
thin shell over :class:`~rabbitkeys.Publisher` that runs one on an event loop of its own, on
a daemon thread; and the process's default one behind :func:`publish`.

A call is checked and its payload encoded in the caller's thread (an invalid key or payload
raises there, before anything is sent, and the loop does not spend its time serialising),
then handed to the loop through one FIFO inbox. The loop takes calls out in the order they
went in and enters each into the :class:`~rabbitkeys.Publisher` before it takes the next, so
per key the Publisher sees them in the order the calls were made: program order within a
thread; across threads, the order in which they entered the inbox. From there the
Publisher's guarantees hold as they are (order per key, confirms, bounded room, the errors
of a failed publish), and each answer goes back to the caller's
:class:`concurrent.futures.Future`.

Lifecycle (:class:`_State`): NEW -> STARTING -> RUNNING (``start``: the thread and loop
exist and the Publisher is connected) -> CLOSING (``close``: no new calls; what was
submitted settles) -> CLOSED (the loop stopped, the thread ended). A failed ``start`` goes
to CLOSED. In a
child process made by ``fork`` a publisher of the parent is unusable (its thread did not
survive the fork): calls raise; make a new one. The default publisher does that by itself.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import enum
import os
import threading
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry

from .._errors import PublishError
from .._observe.tracing import end_publish, start_publish
from .._settings import Settings, load_settings
from .._wire.topology import DEFAULT_JOB_TYPE, KeyRef
from .publisher import Publisher, encode_body

__all__ = ["SyncPublisher", "close_default_publisher", "default_publisher", "publish"]


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True, eq=False)
class _Call:
    """One ``submit`` on its way from the caller's thread to the loop."""

    ref: KeyRef
    body: bytes
    content_type: str | None
    headers: Mapping[str, Any] | None
    timeout: float | None
    future: concurrent.futures.Future[None]


class SyncPublisher:
    """A :class:`~rabbitkeys.Publisher` for sync code: its own event loop on a daemon thread.

    Thread-safe; use one per process (or :func:`rabbitkeys.publish`, which does). ::

        with SyncPublisher() as pub:
            pub.publish("post A", Comment(post="post A", text="hi"))  # blocks until confirmed

    ``settings`` and ``metrics_registry`` are those of :class:`~rabbitkeys.Publisher`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        self._metrics_registry = metrics_registry
        self._lock = threading.Lock()
        self._state = _State.NEW
        self._closed = threading.Event()
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._publisher: Publisher | None = None
        #: calls submitted and not yet taken by the loop, oldest first (under _lock)
        self._inbox: deque[_Call] = deque()
        #: the loop's publish tasks not yet settled (loop thread only)
        self._running: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<SyncPublisher {self._state.value} namespace={self.settings.namespace!r} "
            f"url={self.settings.amqp_url_masked!r}>"
        )

    @property
    def running(self) -> bool:
        """Started, not closing, and in the process that started it."""
        return self._state is _State.RUNNING and self._pid == os.getpid()

    @property
    def publisher_id(self) -> str | None:
        """The id of the Publisher it runs (in every message it sends); None before start."""
        return None if self._publisher is None else self._publisher.publisher_id

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the loop thread and connect; raise :class:`BrokerUnavailableError` if the
        broker does not answer within ``publish_timeout`` (then nothing is left running)."""
        _refuse_in_event_loop("start")
        with self._lock:
            if self._state is not _State.NEW:
                raise PublishError(f"SyncPublisher cannot start: it is {self._state.value}")
            self._state = _State.STARTING
        loop = _new_event_loop()
        thread = threading.Thread(
            target=_run_forever, args=(loop,), name="rabbitkeys-sync-publisher", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._run(self._connect())
        except BaseException:
            self._stop_loop()
            raise
        with self._lock:
            self._state = _State.RUNNING

    async def _connect(self) -> None:
        publisher = Publisher(self.settings, metrics_registry=self._metrics_registry)
        await publisher.start()
        self._publisher = publisher

    def publish(
        self,
        key: str,
        payload: object,
        *,
        job_type: str = DEFAULT_JOB_TYPE,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish ``payload`` for ``key`` and block until the broker confirmed it; what
        :meth:`Publisher.publish <rabbitkeys.Publisher.publish>` does and raises, raised here
        in the calling thread. ``timeout``: seconds this message may take (default
        ``publish_timeout``); past it, :class:`PublishError` (withdrawn, never sent) or
        :class:`PublishOutcomeUnknownError` (written, may still arrive).

        Raises :class:`RuntimeError` in a thread that runs an event loop (blocking it would
        stall that loop): there, ``await`` an async :class:`Publisher` instead."""
        _refuse_in_event_loop("publish")
        future = self.submit(key, payload, job_type=job_type, headers=headers, timeout=timeout)
        try:
            future.result()
        except BaseException:
            # an interrupt (Ctrl-C): the message is withdrawn if it was not written yet
            future.cancel()
            raise

    def submit(
        self,
        key: str,
        payload: object,
        *,
        job_type: str = DEFAULT_JOB_TYPE,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> concurrent.futures.Future[None]:
        """Publish without waiting: the future's result is None once the broker confirmed
        the message, or the error :meth:`publish` would raise. Submits keep their order per
        key like publishes. An invalid key or payload raises here, before anything is sent.
        Cancelling the future withdraws the message unless it was already written.

        Usable from async code too: ``await asyncio.wrap_future(pub.submit(...))``."""
        ref = KeyRef.of(key, job_type)
        body, content_type = encode_body(payload, self.settings.max_message_bytes)
        # the caller's trace context, here in its thread (a no-op without tracing)
        span, headers = start_publish(self.settings.namespace, ref, headers)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        if span is not None:
            future.add_done_callback(partial(_end_publish_span, span))
        call = _Call(ref, body, content_type, dict(headers) if headers else None, timeout, future)
        with self._lock:
            try:
                self._check_usable()
            except PublishError as exc:
                future.set_exception(exc)  # (the span's end)
                raise
            wake = not self._inbox
            self._inbox.append(call)
            if wake:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._take)
        return future

    def _check_usable(self) -> None:
        if self._pid != os.getpid():
            raise PublishError(
                f"this SyncPublisher belongs to process {self._pid}, and its thread did not "
                f"survive the fork: make a new one in the child (rabbitkeys.publish does)"
            )
        if self._state is _State.NEW:
            raise PublishError(
                "SyncPublisher is not started: use `with SyncPublisher() as pub` or call start()"
            )
        if self._state is not _State.RUNNING:
            raise PublishError(f"SyncPublisher is {self._state.value}")

    def _take(self) -> None:
        """(loop) Enter every call of the inbox into the Publisher, oldest first."""
        with self._lock:
            calls = list(self._inbox)
            self._inbox.clear()
        assert self._publisher is not None and self._loop is not None
        for call in calls:
            if call.future.cancelled():
                continue
            # A task's first step runs publish up to its first await, which is after the
            # message entered its lane: tasks start in creation order, so calls keep theirs.
            task = self._loop.create_task(
                self._publisher._publish(
                    call.ref, call.body, call.content_type, call.headers, call.timeout
                )
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(partial(_settle, call.future))
            call.future.add_done_callback(partial(_cancel_if_cancelled, task))

    def close(self, timeout: float | None = None) -> None:
        """Wait for everything submitted to settle (at most ``timeout`` seconds; by default
        as long as their ``publish_timeout``), then disconnect and stop the thread. Calls
        not settled by ``timeout`` are cancelled: a message not yet written is never sent.
        Closing again, or a publisher never started, is a no-op."""
        _refuse_in_event_loop("close")
        with self._lock:
            state = self._state
            if state is _State.RUNNING and self._pid == os.getpid():
                self._state = _State.CLOSING
            elif state is _State.NEW or self._pid != os.getpid():
                self._state = _State.CLOSED
                return
        if state is _State.STARTING:
            raise PublishError("SyncPublisher is starting: close it once start() returned")
        if state is not _State.RUNNING:
            self._closed.wait()  # another thread is closing it (or start failed: set)
            return
        try:
            self._run(self._flush_and_disconnect(timeout))
        finally:
            self._stop_loop()

    async def _flush_and_disconnect(self, timeout: float | None) -> None:
        self._take()  # what was submitted before close and not taken yet
        late: set[asyncio.Task[None]] = set()
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        assert self._publisher is not None
        if late:
            # out of time: do not wait for the registry requests of the withdrawn messages
            # either (Publisher.close would, up to publish_timeout); the loop's end stops them
            await self._publisher._stop_connection()
        else:
            await self._publisher.close()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` on the loop; block until it is done; raise what it raised."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        with self._lock:
            self._state = _State.CLOSED
        self._closed.set()


def _end_publish_span(span: Any, future: concurrent.futures.Future[None]) -> None:
    cancelled = future.cancelled()
    end_publish(span, concurrent.futures.CancelledError() if cancelled else future.exception())


def _settle(future: concurrent.futures.Future[None], task: asyncio.Task[None]) -> None:
    """(loop) Hand a publish task's outcome to the caller's future."""
    try:
        if task.cancelled():
            future.cancel()
        elif (error := task.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
    except concurrent.futures.InvalidStateError:
        pass  # the caller cancelled it meanwhile


def _cancel_if_cancelled(task: asyncio.Task[None], future: concurrent.futures.Future[None]) -> None:
    """(any thread) The caller cancelled its future: cancel the publish (withdraw it)."""
    if future.cancelled() and not task.done():
        task.get_loop().call_soon_threadsafe(task.cancel)


def _refuse_in_event_loop(what: str) -> None:
    # A RuntimeError, as asyncio.run() raises in the same situation: a misuse of the thread,
    # not something about publishing that a caller would catch.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"SyncPublisher.{what}() blocks, and this thread runs an event loop: it would stall "
        f"that loop (or deadlock, on the publisher's own). In async code use "
        f"`await Publisher.publish(...)`, or `await asyncio.wrap_future(sync.submit(...))`"
    )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop when installed, as the CLI does
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


# --------------------------------------------------------------- the process's default one

_default: SyncPublisher | None = None
_default_lock = threading.Lock()
_hooks_installed = False
_exiting = False
#: publishers of a parent process, kept so that the child never finalises their sockets
_inherited: list[SyncPublisher] = []


def default_publisher() -> SyncPublisher:
    """The process's :class:`SyncPublisher`, with settings from the ``RABBITKEYS_*``
    environment: started on first use (by one thread; the others wait for it), closed at
    interpreter exit after what was submitted settled, made anew in a child after ``fork``
    (gunicorn's ``--preload``)."""
    publisher = _default
    if publisher is not None and publisher.running:
        return publisher
    with _default_lock:
        if _exiting:
            raise PublishError("the interpreter is exiting: the default publisher is closed")
        _install_hooks()
        if _default is None or not _default.running:
            fresh = SyncPublisher()
            fresh.start()
            _set_default(fresh)
        assert _default is not None
        return _default


def publish(
    key: str,
    payload: object,
    *,
    job_type: str = DEFAULT_JOB_TYPE,
    headers: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> None:
    """:meth:`SyncPublisher.publish` on the :func:`default_publisher`: blocks until the
    broker confirmed the message; raises what :meth:`Publisher.publish` raises."""
    default_publisher().publish(key, payload, job_type=job_type, headers=headers, timeout=timeout)


def close_default_publisher(timeout: float | None = None) -> None:
    """Close the process's default publisher, if one was made (waiting for what was
    submitted, at most ``timeout`` seconds): the next :func:`publish` makes a new one with
    the ``RABBITKEYS_*`` environment of then (tests, an application that changes settings)."""
    with _default_lock:
        publisher = _default
        _set_default(None)
    if publisher is not None:
        publisher.close(timeout=timeout)


def _set_default(publisher: SyncPublisher | None) -> None:
    global _default
    _default = publisher


def _install_hooks() -> None:
    """(under _default_lock) Close at exit, forget in a forked child: once per process."""
    global _hooks_installed
    if _hooks_installed:
        return
    atexit.register(_close_default_at_exit)
    os.register_at_fork(after_in_child=_forget_default_after_fork)
    _hooks_installed = True


def _close_default_at_exit() -> None:
    global _exiting
    with _default_lock:
        _exiting = True
        publisher = _default
    if publisher is not None:
        publisher.close()


def _forget_default_after_fork() -> None:
    # The parent's loop thread does not exist here and its lock may have been held by a
    # thread that is gone too: start over. The parent's publisher stays referenced so that
    # its objects are never finalised here (their sockets are the parent's).
    global _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _inherited.append(_default)
    _set_default(None)

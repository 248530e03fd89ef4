"""Celery's time limits for a task run on a pool thread: at ``soft_time_limit``
``SoftTimeLimitExceeded`` is raised inside the task, at ``time_limit`` (or when the worker's
own deadline for the job passes) ``TimeLimitExceeded``, as Celery raises them.

A thread cannot be killed: the exception is set for the thread
(``PyThreadState_SetAsyncExc``) and Python raises it when the thread next runs Python code.
It is set only while the thread runs the task's own body (``task.run``, marked by
:func:`in_body`), never in the tracer's bookkeeping or the bridge's, and a pending one is
withdrawn as the body ends. A body blocked in C (a socket read without a timeout, a
``time.sleep``) gets it when that call returns.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

__all__ = ["TaskRun", "current_run", "in_body"]

_local = threading.local()


def current_run() -> TaskRun | None:
    """The run this thread is in, if any."""
    return getattr(_local, "run", None)


class TaskRun:
    """One attempt of a task on this thread: its task id (what the retry interception
    checks), its time limits, and whether a time limit ended it."""

    def __init__(self, task_id: str, soft: float | None, hard: float | None) -> None:
        self.task_id = task_id
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._in_body = False
        self._ended = False
        #: the hard limit (or the worker's deadline) passed: the task failed, whatever it
        #: did with the exception
        self.timed_out = False
        self._timers = [
            threading.Timer(seconds, self.exceed, (error,))
            for seconds, error in ((soft, SoftTimeLimitExceeded), (hard, TimeLimitExceeded))
            if seconds
        ]

    def __enter__(self) -> TaskRun:
        _local.run = self
        for timer in self._timers:
            timer.daemon = True
            timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._ended = True
            for timer in self._timers:
                timer.cancel()
        _local.run = None

    def exceed(self, error: type[BaseException] = TimeLimitExceeded) -> None:
        """A limit passed: raise ``error`` in the task's body (from a timer, or from the
        worker when its deadline for the job passed)."""
        with self._lock:
            if self._ended:
                return
            if error is TimeLimitExceeded:
                self.timed_out = True
            if self._in_body:
                _set_async_exception(self._thread_id, error)

    def _enter_body(self) -> None:
        with self._lock:
            self._in_body = True

    def _leave_body(self) -> None:
        with self._lock:
            self._in_body = False
            _set_async_exception(self._thread_id, None)  # one set but not raised: withdrawn


def in_body(run: Callable[..., Any]) -> Callable[..., Any]:
    """``task.run`` marked as the task's body for the time limits of the thread's run."""

    @functools.wraps(run)  # its signature too: self.retry(args=...) reads it
    def body(*args: Any, **kwargs: Any) -> Any:
        current = current_run()
        if current is None:  # called outside a bridge run (the task called directly)
            return run(*args, **kwargs)
        current._enter_body()
        try:
            return run(*args, **kwargs)
        finally:
            current._leave_body()

    return body


def _set_async_exception(thread_id: int, error: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(error) if error is not None else None
    )

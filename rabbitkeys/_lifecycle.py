"""The one home of the long-running roles' lifecycle shape (:class:`Worker`, :class:`Registry`).

Two ways to run a role, with one vocabulary shared by all three roles:

- **Foreground** (the CLI): ``await role.run()`` works until ``role.stop()`` is called.
  ``stop()`` is synchronous and only *asks* (safe from a signal handler); ``run()`` returns
  once the graceful shutdown is done.
- **Background** (an application): ``await role.start()`` runs ``run()`` in a task and returns
  at once; ``await role.close()`` asks it to stop and *waits* until it has stopped, raising
  what ``run()`` raised. ``async with role:`` is ``start()`` then ``close()``.
  :class:`Publisher` has the same ``start()`` / ``close()`` / ``async with`` (it has no
  ``run()``: it works when called).

So ``stop()`` asks, ``close()`` asks and waits. A role runs once: after ``close()`` (or after
``run()`` returned) it cannot be started again; make a new one.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from types import TracebackType
from typing import Self

__all__ = ["Background"]


class _State(enum.Enum):
    NEW = "new"  # built, not started
    RUNNING = "running"  # run() is under way in the background task
    CLOSED = "closed"  # close() was called: stopping or stopped, never again running


class Background(abc.ABC):
    """``start()`` / ``close()`` / ``async with`` over a role's ``run()`` and ``stop()``."""

    _background_state: _State = _State.NEW
    _background_task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def run(self) -> None:
        """Work until :meth:`stop`; the role's own loop."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask :meth:`run` to finish gracefully; returns at once."""

    async def start(self) -> None:
        """Run in the background until :meth:`close`; returns at once (``ready`` says when
        the role has connected). Raises :class:`RuntimeError` if already started or closed."""
        if self._background_state is not _State.NEW:
            raise RuntimeError(
                f"{type(self).__name__} already {self._background_state.value}: "
                "a role runs once, make a new one"
            )
        self._background_state = _State.RUNNING
        self._background_task = asyncio.create_task(
            self.run(), name=f"rabbitkeys {type(self).__name__}.run"
        )

    async def close(self) -> None:
        """Stop gracefully and wait until stopped; raise what ``run()`` raised, if it failed.
        Calling it again, or without :meth:`start`, does no harm."""
        self._background_state = _State.CLOSED
        self.stop()
        task, self._background_task = self._background_task, None
        if task is not None:
            await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

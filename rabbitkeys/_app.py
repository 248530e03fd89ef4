"""What users write: handlers for job types, registered on an :class:`App`.

    app = rabbitkeys.App()

    @app.handler("comments")
    async def create_comment(message: rabbitkeys.Message) -> None:
        ...

``rabbitkeys worker mymodule:app`` runs it. A bare ``async def handler(message)`` given to
the worker serves the job type ``"default"``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError, HandlerNotFoundError
from ._topology import DEFAULT_JOB_TYPE, check_job_type

__all__ = ["App", "Handler", "Message", "load_app"]


@dataclass(frozen=True, slots=True)
class Message:
    """One job as a handler sees it."""

    key: str
    job_type: str
    body: bytes
    headers: Mapping[str, Any]
    #: the Publisher that sent it (as its header says: unique within its user, not proof of
    #: anything), and its place in that publisher's order for this key
    publisher_id: str | None
    sequence: int | None
    #: 1 on the first run; higher when the handler failed before and this is a retry
    attempt: int
    #: the broker delivered it before (a worker crashed or let go while holding it)
    redelivered: bool
    #: the RabbitMQ user that published it, as the broker checked it (the ``user_id``
    #: property: a Publisher always sets it); None if the message carried none
    user_id: str | None = None


Handler = Callable[[Message], Awaitable[Any]]


class App:
    """A set of handlers, one per job type."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def handler(self, job_type: str = DEFAULT_JOB_TYPE) -> Callable[[Handler], Handler]:
        """Decorator: register an ``async def`` as the handler of ``job_type``."""
        check_job_type(job_type)

        def register(function: Handler) -> Handler:
            self.add_handler(job_type, function)
            return function

        return register

    def add_handler(self, job_type: str, function: Handler) -> None:
        check_job_type(job_type)
        if not inspect.iscoroutinefunction(function):
            raise ConfigError(f"the handler of {job_type!r} must be an `async def` function")
        if job_type in self._handlers:
            raise ConfigError(f"job type {job_type!r} already has a handler")
        self._handlers[job_type] = function

    @property
    def job_types(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def handler_for(self, job_type: str) -> Handler:
        try:
            return self._handlers[job_type]
        except KeyError:
            raise HandlerNotFoundError(f"no handler for job type {job_type!r}") from None


def load_app(target: str) -> App:
    """Import ``"module:attr"``: an :class:`App`, or an ``async def`` serving "default"."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected MODULE:ATTR, got {target!r}")
    if "" not in sys.path:  # like `python -m`, find modules in the current directory
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attribute!r}") from None
    if isinstance(obj, App):
        app = obj
    elif inspect.iscoroutinefunction(obj):
        app = App()
        app.add_handler(DEFAULT_JOB_TYPE, obj)
    else:
        raise ConfigError(f"{target!r} is neither a rabbitkeys.App nor an `async def` handler")
    if not app.job_types:
        raise ConfigError(f"{target!r} has no handlers")
    return app

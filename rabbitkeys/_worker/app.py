"""What users write, registered on an :class:`App`: handlers for job types, the worker's
startup and shutdown hooks, and middleware around each handled message.

    app = rabbitkeys.App()

    @app.on_startup
    async def open_pool(context: rabbitkeys.Context) -> None:
        context.db = await asyncpg.create_pool(...)

    @app.handler("comments")
    async def create_comment(message: rabbitkeys.Message[Comment]) -> None:
        await message.context.db.execute(..., message.payload.text)

``rabbitkeys worker mymodule:app`` runs it. A bare handler given to the worker serves the
job type ``"default"``.

A handler is inspected once, when it is registered: its one parameter says what the body
becomes (``Message[Comment]``: a :class:`~rabbitkeys._wire.payload.Decoder` for ``Comment`` is
built then; ``Message``, ``Message[bytes]`` or no annotation: the body as it came, at no cost), and
``async def`` or plain ``def`` says where it runs (the event loop, or the worker's thread
pool). Whatever cannot work is a :class:`ConfigError` naming the handler at that moment,
not at the first message.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Generic, Literal

from typing_extensions import TypeVar

from .._errors import ConfigError, HandlerNotFoundError
from .._wire.payload import Decoder
from .._wire.topology import DEFAULT_JOB_TYPE, check_job_type

__all__ = [
    "App",
    "CallNext",
    "Context",
    "Handler",
    "Hook",
    "Message",
    "Middleware",
    "ON_FAILURE_POLICIES",
    "OnFailure",
    "Route",
    "is_async",
    "load_app",
]

#: what a handler declares its payload to be; a bare ``Message`` is ``Message[bytes]``
T = TypeVar("T", default=bytes)


class Context(SimpleNamespace):
    """What a worker's hooks and handlers share: an attribute bag, one per :class:`Worker`
    (``worker.context``), handed to each startup and shutdown hook and set on every
    :class:`Message` (``message.context``). Put pools and clients on it in a startup hook."""


class _Unset:
    """The payload of a Message made without one: the body (see ``__post_init__``)."""

    def __repr__(self) -> str:
        return "<the body>"


_BODY: Any = _Unset()


@dataclass(frozen=True, slots=True)
class Message(Generic[T]):
    """One job as a handler sees it. ``Message[Comment]`` in a handler's signature asks for
    the body validated as a ``Comment`` (``payload``); a plain ``Message`` gets the bytes."""

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
    #: the body as the handler declared it (``Message[Comment]``: a validated ``Comment``);
    #: the body itself for a plain ``Message`` or ``Message[bytes]`` (and when not given)
    payload: T = _BODY
    #: the message's content type as published (``application/json``...), None for bytes
    content_type: str | None = None
    #: the worker's :class:`Context`, shared with its hooks and other handlers
    context: Context = field(default_factory=Context)

    def __post_init__(self) -> None:
        if self.payload is _BODY:
            object.__setattr__(self, "payload", self.body)


#: a handler: ``async def`` (run on the worker's event loop) or ``def`` (run in its thread
#: pool), taking the :class:`Message`
Handler = Callable[[Message[Any]], Any]
#: what a middleware calls to go on: the next middleware, or the handler
CallNext = Callable[[Message[Any]], Awaitable[Any]]
#: ``async def mw(message, call_next)``: around each attempt of each handler
Middleware = Callable[[Message[Any], CallNext], Awaitable[Any]]
#: a startup or shutdown hook, ``async def`` or ``def``, taking the worker's :class:`Context`
Hook = Callable[[Context], Any]

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


def is_async(function: Callable[..., Any]) -> bool:
    """Whether calling ``function`` gives a coroutine: an ``async def``, a partial of one,
    or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        type(function).__call__
    )


def _name(function: Callable[..., Any]) -> str:
    if isinstance(function, functools.partial):
        return f"partial({_name(function.func)})"
    return str(getattr(function, "__qualname__", None) or type(function).__qualname__)


def _takes_one_argument(function: Callable[..., Any]) -> inspect.Parameter | None:
    """The parameter a call with one positional argument binds, or None if such a call
    cannot work (no parameter, or another one without a default)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return inspect.Parameter("message", inspect.Parameter.POSITIONAL_ONLY)
    try:
        bound = signature.bind(None)
    except TypeError:
        return None
    name = next(iter(bound.arguments))
    return signature.parameters[name]


def _annotation_of(who: str, function: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    """The parameter's annotation, strings (``from __future__ import annotations``)
    resolved in the handler's module."""
    if parameter.annotation is inspect.Parameter.empty:
        return inspect.Parameter.empty
    target: Any = function
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:  # NameError for a type defined inside a function...
        raise ConfigError(
            f"{who}: cannot resolve the annotation of its parameter "
            f"{parameter.name!r} ({type(exc).__name__}: {exc}); define the type at module "
            "level, where the handler's module can see it"
        ) from None
    return hints.get(parameter.name, inspect.Parameter.empty)


def _decoder_for(who: str, annotation: Any) -> Decoder | None:
    """What turns a body into this handler's payload; None: the body as it came."""
    if annotation is inspect.Parameter.empty or annotation is Message or annotation is Any:
        return None
    if typing.get_origin(annotation) is not Message:
        raise ConfigError(
            f"{who}: its parameter is annotated {annotation!r}; a handler "
            "takes the message: annotate it rabbitkeys.Message[YourType] (the payload as "
            "YourType) or rabbitkeys.Message (the body as bytes)"
        )
    (target,) = typing.get_args(annotation)
    try:
        decoder = Decoder(target)
    except Exception as exc:  # pydantic's PydanticSchemaGenerationError, a TypeError...
        first_line = str(exc).partition("\n")[0]
        raise ConfigError(
            f"{who}: cannot validate a body as {target!r}: {type(exc).__name__}: {first_line}"
        ) from None
    return None if decoder.raw else decoder


@dataclass(frozen=True, slots=True)
class Route:
    """A registered handler as the worker runs it: made once, at registration."""

    function: Handler
    name: str
    #: ``async def``: awaited on the event loop; otherwise called in the thread pool
    is_async: bool
    #: None: the payload is the body, untouched (``Message``, ``Message[bytes]``)
    decoder: Decoder | None
    #: after a job's last attempt: ``"dead_letter"`` (copy it to the dead-letter queue and
    #: go on with the key's next job) or ``"park"`` (stop the key with the job at its head
    #: until an operator resumes or skips it)
    on_failure: OnFailure = "dead_letter"
    #: seconds one attempt may run; None: the worker's ``job_timeout`` setting; 0: no limit;
    #: or a function of the job's message giving one of those, per job
    #: (:func:`~.execution.time_limit` decides)
    timeout: Timeout = None

    def payload(self, body: bytes, content_type: str | None) -> Any:
        """Raises :class:`~rabbitkeys.PayloadError` if the body is not what was declared."""
        return body if self.decoder is None else self.decoder.decode(body, content_type)


#: what a job type does after a job's last attempt failed (see ``Route.on_failure``)
OnFailure = Literal["dead_letter", "park"]
ON_FAILURE_POLICIES: tuple[OnFailure, ...] = ("dead_letter", "park")


#: a handler's ``timeout=``: seconds, 0 (no limit), None (the setting), or a function of a
#: job's message that gives one of those for that job (the Celery bridge's per-task limits)
Timeout = float | Callable[["Message[Any]"], float | None] | None


def _checked_timeout(job_type: str, timeout: object) -> Timeout:
    """A handler's ``timeout=``: None (the setting), 0 (no limit), seconds, or a function
    of the message."""
    if timeout is None:
        return None
    if callable(timeout):
        return timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise ConfigError(
            f"timeout of job type {job_type!r} must be a number of seconds >= 0 (0: no "
            f"limit; None: RABBITKEYS_JOB_TIMEOUT), not {timeout!r}"
        )
    return float(timeout)


def _route(
    job_type: str,
    function: Handler,
    on_failure: OnFailure = "dead_letter",
    timeout: Timeout = None,
) -> Route:
    timeout = _checked_timeout(job_type, timeout)
    if on_failure not in ON_FAILURE_POLICIES:
        raise ConfigError(
            f"on_failure of job type {job_type!r} must be one of "
            f"{', '.join(map(repr, ON_FAILURE_POLICIES))}, not {on_failure!r}"
        )
    if not callable(function):
        raise ConfigError(f"the handler of {job_type!r} is not callable: {function!r}")
    name = _name(function)
    who = f"handler {name} of job type {job_type!r}"
    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        raise ConfigError(f"{who} is a generator; it must return")
    parameter = _takes_one_argument(function)
    if parameter is None:
        raise ConfigError(
            f"{who} must take one parameter, the message "
            "(`def handler(message: rabbitkeys.Message[YourType])`); reach shared clients "
            "through message.context"
        )
    decoder = _decoder_for(who, _annotation_of(who, function, parameter))
    return Route(
        function=function,
        name=name,
        is_async=is_async(function),
        decoder=decoder,
        on_failure=on_failure,
        timeout=timeout,
    )


def _check_takes_one(what: str, function: Callable[..., Any], takes: str) -> None:
    if not callable(function):
        raise ConfigError(f"the {what} is not callable: {function!r}")
    if _takes_one_argument(function) is None:
        raise ConfigError(f"{what} {_name(function)} must take one parameter, {takes}")


class App:
    """A set of handlers, one per job type, with the worker's hooks and middleware."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._middleware: list[Middleware] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []

    # --- handlers -------------------------------------------------------------------------

    def handler(
        self,
        job_type: str = DEFAULT_JOB_TYPE,
        *,
        on_failure: OnFailure = "dead_letter",
        timeout: Timeout = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator: register an ``async def`` or ``def`` as the handler of ``job_type``.

        ``on_failure``: what happens after a job's last attempt. ``"dead_letter"`` (the
        default) copies it to the dead-letter queue and the key goes on with its next job;
        ``"park"`` stops the key where it is: the job stays at the key's head, later jobs
        wait behind it in order, until ``rabbitkeys resume`` retries it or ``rabbitkeys
        skip`` dead-letters it.

        ``timeout``: seconds one attempt may run, instead of the worker's
        ``RABBITKEYS_JOB_TIMEOUT`` (None, the default); 0 for no limit; or a function of
        the job's ``Message`` giving one of those, for limits per job. An attempt that runs
        past it fails with :class:`~rabbitkeys.JobTimeoutError` (retried, then
        ``on_failure``); an ``async def`` is cancelled, a ``def``'s thread runs on and the
        key's next attempt waits for it."""
        check_job_type(job_type)
        _checked_timeout(job_type, timeout)

        def register(function: HandlerT) -> HandlerT:
            self.add_handler(job_type, function, on_failure=on_failure, timeout=timeout)
            return function

        return register

    def add_handler(
        self,
        job_type: str,
        function: Handler,
        *,
        on_failure: OnFailure = "dead_letter",
        timeout: Timeout = None,
    ) -> None:
        check_job_type(job_type)
        if job_type in self._routes:
            raise ConfigError(f"job type {job_type!r} already has a handler")
        self._routes[job_type] = _route(job_type, function, on_failure, timeout)

    @property
    def job_types(self) -> frozenset[str]:
        return frozenset(self._routes)

    def route(self, job_type: str) -> Route:
        try:
            return self._routes[job_type]
        except KeyError:
            raise HandlerNotFoundError(f"no handler for job type {job_type!r}") from None

    def handler_for(self, job_type: str) -> Handler:
        return self.route(job_type).function

    # --- middleware -----------------------------------------------------------------------

    def middleware(self, function: Middleware) -> Middleware:
        """Decorator: run ``async def mw(message, call_next)`` around each attempt of every
        handler. The first registered is the outermost. It goes on with
        ``await call_next(message)`` (which returns what the handler returned and raises
        what it raised); an exception out of it fails the attempt as the handler's would."""
        self.add_middleware(function)
        return function

    def add_middleware(self, function: Middleware) -> None:
        if not is_async(function):
            raise ConfigError(
                f"middleware {_name(function)} must be an `async def mw(message, call_next)`"
            )
        try:
            inspect.signature(function).bind(None, None)
        except TypeError:
            raise ConfigError(
                f"middleware {_name(function)} must take two parameters: (message, call_next)"
            ) from None
        except ValueError:  # no signature to check
            pass
        self._middleware.append(function)

    @property
    def middlewares(self) -> tuple[Middleware, ...]:
        return tuple(self._middleware)

    # --- hooks ----------------------------------------------------------------------------

    def on_startup(self, function: HandlerT) -> HandlerT:
        """Decorator: run ``function(context)`` (``async def`` or ``def``) once when a worker
        starts, before it connects; if it raises, the worker stops with
        :class:`~rabbitkeys.StartupError` and never joins. In registration order."""
        self.add_startup(function)
        return function

    def add_startup(self, function: Hook) -> None:
        _check_takes_one("startup hook", function, "the worker's rabbitkeys.Context")
        self._startup.append(function)

    def on_shutdown(self, function: HandlerT) -> HandlerT:
        """Decorator: run ``function(context)`` (``async def`` or ``def``) once when a worker
        stops, after it drained (also after it failed); what it raises is logged. In
        registration order."""
        self.add_shutdown(function)
        return function

    def add_shutdown(self, function: Hook) -> None:
        _check_takes_one("shutdown hook", function, "the worker's rabbitkeys.Context")
        self._shutdown.append(function)

    @property
    def startup_hooks(self) -> tuple[Hook, ...]:
        return tuple(self._startup)

    @property
    def shutdown_hooks(self) -> tuple[Hook, ...]:
        return tuple(self._shutdown)


def hook_name(function: Callable[..., Any]) -> str:
    """How errors and logs name a hook or handler."""
    return _name(function)


def load_object(target: str, what: str) -> Any:
    """Import ``"module:attr"`` (``attr`` may be dotted), from the current directory too,
    as ``python -m`` does; ``what`` names it in the error."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected MODULE:ATTR naming {what}, got {target!r}")
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
    return obj


def load_app(target: str) -> App:
    """Import ``"module:attr"``: an :class:`App`, or a handler serving "default"."""
    obj = load_object(target, "an app or a handler")
    if type(obj).__module__.startswith("celery") and hasattr(obj, "tasks"):
        raise ConfigError(f"{target!r} is a Celery app: run it with `rabbitkeys worker --celery`")
    if isinstance(obj, App):
        app = obj
    elif callable(obj) and not isinstance(obj, type):
        app = App()
        app.add_handler(DEFAULT_JOB_TYPE, obj)
    else:
        raise ConfigError(f"{target!r} is neither a rabbitkeys.App nor a handler function")
    if not app.job_types:
        raise ConfigError(f"{target!r} has no handlers")
    return app

"""Message bodies: what ``publish(key, obj)`` sends for each kind of object, and how a
handler that declares a type gets it back. Pure.

| published | body | content type |
| --- | --- | --- |
| ``bytes`` / ``bytearray`` / ``memoryview`` | as is (zero cost: no copy, no parse) | none |
| ``str`` | UTF-8 | ``text/plain; charset=utf-8`` |
| a pydantic model | ``model_dump_json()`` | ``application/json`` |
| other JSON-able objects (dict, list, dataclass...) | JSON (pydantic) | ``application/json`` |

On the worker, a handler declares what it wants (``Message[Comment]``, see ``_worker.app``): a
:class:`Decoder` for that type validates the body with pydantic (JSON, or text for ``str``)
and raises :class:`~rabbitkeys.PayloadError` with pydantic's reason when it does not fit.
A handler that declares nothing, or ``bytes``, gets the body untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, TypeAdapter, ValidationError

from .._errors import InvalidMessageError, PayloadError

__all__ = ["JSON", "TEXT", "Decoder", "Encoded", "encode_payload"]

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

_any_json: TypeAdapter[Any] = TypeAdapter(Any)


class Encoded(NamedTuple):
    """A body encoded already, sent as it is with its own content type: what the Celery
    bridge publishes (the task's serializer made it). Not public: the API's bytes carry no
    content type."""

    body: bytes
    content_type: str | None


def encode_payload(payload: object) -> tuple[bytes | bytearray | memoryview, str | None]:
    """The body and content type ``payload`` travels as. Raises
    :class:`InvalidMessageError` for an object JSON cannot carry."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return payload, None
    if isinstance(payload, Encoded):
        return payload.body, payload.content_type
    if isinstance(payload, str):
        return payload.encode("utf-8"), TEXT
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode(), JSON
    try:
        return _any_json.dump_json(payload), JSON
    except Exception as exc:  # pydantic's PydanticSerializationError, a TypeError...
        raise InvalidMessageError(
            f"cannot send a {type(payload).__name__} as JSON: {exc} (publish bytes, str, a "
            f"pydantic model or a JSON-able object)"
        ) from None


class Decoder:
    """Turns a body into the type a handler declared (one per handler, made once)."""

    __slots__ = ("_adapter", "_type", "raw")

    def __init__(self, target: Any) -> None:
        self._type = target
        #: the handler wants the body as it came: nothing to do per message
        self.raw = target is bytes or target is Any
        self._adapter: TypeAdapter[Any] | None = None if self.raw else TypeAdapter(target)

    def decode(self, body: bytes, content_type: str | None) -> Any:
        """Raises :class:`PayloadError` if ``body`` is not a valid ``target``."""
        if self._adapter is None:
            return body
        try:
            if self._type is str:
                return body.decode("utf-8")
            return self._adapter.validate_json(body)
        except (ValidationError, UnicodeDecodeError) as exc:
            raise PayloadError(_reason(exc, self._type, content_type)) from None


def _reason(error: Exception, target: Any, content_type: str | None) -> str:
    name = getattr(target, "__name__", repr(target))
    sent = f" (sent as {content_type})" if content_type else ""
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)[:5]
        )
        return f"body is not a valid {name}{sent}: {problems}"[:2000]
    return f"body is not a valid {name}{sent}: {error}"[:2000]

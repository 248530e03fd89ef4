"""What a hold binding carries, written and read back side by side: a key's holds are
bindings of its queue to ``Names.holds_exchange`` (routing key ``HOLD_PAUSED``,
``HOLD_PARKED`` or ``HOLD_REDRIVE``), their arguments the key's text
(:data:`HOLD_KEY_ARGUMENT`) and the hold's own (why it is parked, which redrive wants it).
The book binds them (:func:`hold_command`, :func:`bindings_of`) and a new leader reads them
back (:func:`parked_from`, :func:`named_by_hold`; ``KeyBook.holds_listed``). No events are
handled here."""

from __future__ import annotations

from collections.abc import Mapping

from ..._errors import InvalidKeyError
from ..._wire.topology import (
    HOLD_PARKED,
    HOLD_PAUSED,
    HOLD_REDRIVE,
    KeyRef,
    check_key,
    key_matches_token,
)
from .commands import SetHold
from .records import Key, Parked

__all__ = [
    "Arguments",
    "HOLD_KEY_ARGUMENT",
    "MAX_ERROR",
    "bindings_of",
    "bound_with",
    "hold_arguments",
    "hold_command",
    "named_by_hold",
    "parked_arguments",
    "parked_from",
    "redrive_arguments",
]

#: a hold binding's arguments, in the order they are bound (str and int only: they read
#: back the same)
Arguments = tuple[tuple[str, str | int], ...]
#: the longest error a parked hold keeps (a binding argument)
MAX_ERROR = 1000
#: The binding argument in which a key's hold carries the key's text: its queue's name has
#: only the key's token (a hashed one for most keys), and a new leader knows a held key by
#: what its hold bindings tell (:meth:`KeyBook.holds_listed`).
HOLD_KEY_ARGUMENT = "x-rabbitkeys-key"


def parked_arguments(parked: Parked) -> Arguments:
    """A parked hold's binding arguments (str and int only: they read back the same)."""
    return (
        ("x-error", parked.error),
        ("x-attempts", parked.attempts),
        ("x-job-index", parked.job_index),
        ("x-worker", parked.worker_id),
        ("x-at", parked.at),
    )


def parked_from(arguments: Mapping[str, str | int]) -> Parked:
    """A parked hold read back from its binding's arguments (:func:`parked_arguments`)."""

    def number(name: str) -> int:
        try:
            return int(arguments.get(name, 0))
        except (TypeError, ValueError):
            return 0

    return Parked(
        error=str(arguments.get("x-error", ""))[:MAX_ERROR],
        attempts=number("x-attempts"),
        job_index=number("x-job-index"),
        worker_id=str(arguments.get("x-worker", "")),
        at=number("x-at"),
    )


def redrive_arguments(redrive_id: str) -> Arguments:
    """A redrive hold's binding arguments: which redrive wants the key."""
    return (("x-redrive", redrive_id),)


def bound_with(text: object, arguments: Arguments) -> Arguments:
    """A key hold's binding arguments: :data:`HOLD_KEY_ARGUMENT` first (``text``; none if
    None), then the hold's own."""
    if isinstance(text, str | int) and not isinstance(text, bool):
        return ((HOLD_KEY_ARGUMENT, text), *arguments)
    return arguments


def hold_arguments(ref: KeyRef, arguments: Arguments = ()) -> Arguments:
    """What the book binds a hold of ``ref``'s queue with: the key's text, unless the key
    is its own token (a plain key: the queue's name tells it) or is known by its token
    only (adopted from the broker, or read back from a hold that did not tell its text)."""
    return bound_with(None if ref.key == ref.token else ref.key, arguments)


def hold_command(key: Key, hold: str, add: bool, arguments: Arguments = ()) -> SetHold:
    """Bind (unbind) one hold of the key's queue, with the key's text."""
    return SetHold(hold, add, queue=key.queue, arguments=hold_arguments(key.ref, arguments))


def named_by_hold(ref: KeyRef, arguments: Mapping[str, str | int]) -> KeyRef | None:
    """The key a hold binding of ``ref``'s queue names (its :data:`HOLD_KEY_ARGUMENT`), if
    that text stands for the queue's token; else None (no text, or one that is not the
    key's: the management API's word is checked, not taken). ``ref`` is the key as the
    queue's name tells it (``Names.key_of_queue``)."""
    text = arguments.get(HOLD_KEY_ARGUMENT)
    if not isinstance(text, str):
        return None
    try:
        check_key(text)
    except InvalidKeyError:
        return None
    if not key_matches_token(text, ref.token):
        return None
    return KeyRef(ref.job_type, text, ref.token)


def bindings_of(key: Key) -> list[tuple[str, Arguments]]:
    """The hold bindings the key's queue should have, each with its arguments."""
    bindings: list[tuple[str, Arguments]] = []
    if key.paused:
        bindings.append((HOLD_PAUSED, hold_arguments(key.ref)))
    if key.parked is not None:
        parked = parked_arguments(key.parked)
        bindings.append((HOLD_PARKED, hold_arguments(key.ref, parked)))
    if key.redrive is not None:
        redrive = redrive_arguments(key.redrive)
        bindings.append((HOLD_REDRIVE, hold_arguments(key.ref, redrive)))
    return bindings

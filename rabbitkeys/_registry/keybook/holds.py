"""The key book's holds family: what keeps a key from every worker, and what an operator
or a redrive does with a held key. Events: ``key_parked`` (its head failed every attempt),
``pause`` and ``resume`` (a key), ``pause_type`` and ``resume_type`` (a whole job type),
``skip`` and ``skipped`` (a parked head dead-lettered: :class:`~.commands.SkipHead` and its
outcome), ``redrive`` and ``rearranged`` (dead letters put back at a key's head:
:class:`~.commands.Rearrange` and its outcome), and ``holds_listed`` (the holds a new leader
reads back from the broker). A request the book refuses raises :class:`HoldRefused`.

Each event is a function of the book (the :class:`~.ledger.Ledger`) returning the commands
that follow; :class:`~rabbitkeys._registry.keybook.KeyBook` calls them. The bindings that
record the holds are written and read in ``hold_bindings``."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

from ..._wire.topology import HOLD_PARKED, HOLD_PAUSED, HOLD_REDRIVE, KeyRef
from .commands import Command, Rebalance, SetHold, SkipHead
from .hold_bindings import (
    HOLD_KEY_ARGUMENT,
    MAX_ERROR,
    Arguments,
    bindings_of,
    bound_with,
    hold_command,
    named_by_hold,
    parked_arguments,
    parked_from,
    redrive_arguments,
)
from .ledger import Ledger
from .records import Key, KeyState, Parked

__all__ = [
    "HoldRefused",
    "holds_listed",
    "key_parked",
    "pause",
    "pause_type",
    "rearranged",
    "redrive",
    "resume",
    "resume_type",
    "skip",
    "skipped",
]

log = logging.getLogger("rabbitkeys.registry")


class HoldRefused(Exception):
    """An operator request the book refuses; str() is the detail shown to the operator."""


def key_parked(
    book: Ledger, worker_id: str, ref: KeyRef, routing_key: str | None, parked: Parked, now: float
) -> list[Command]:
    """The key's head failed its last attempt on ``worker_id`` (policy ``park``): the
    worker has put the head back and lets the key go (its ``Released`` follows, which
    leaves the key UNOWNED). A report from a worker that is not the key's owner, while
    another worker owns it, is stale and ignored."""
    parked = Parked(
        error=parked.error[:MAX_ERROR],
        attempts=parked.attempts,
        job_index=parked.job_index,
        worker_id=parked.worker_id,
        at=int(parked.at),
    )
    key = book.keys.get(ref.id)
    if key is None:  # parked on a registry that led before us: its queue exists
        key = book._new_key(ref, KeyState.UNOWNED, routing_key, now, seen=True)
    elif key.owner is not None and key.owner != worker_id:
        log.info("key %s: parked by %s, but %s owns it; ignored", ref.id, worker_id, key.owner)
        return []
    if key.parked == parked:
        return []
    commands: list[Command] = []
    if key.parked is not None:  # parked again: one parked binding, the newest
        arguments = parked_arguments(key.parked)
        commands.append(hold_command(key, HOLD_PARKED, False, arguments))
    key.parked = parked
    log.warning(
        "key %s parked after %d attempts on %s: %s",
        ref.id,
        parked.attempts,
        worker_id,
        parked.error,
    )
    hold = hold_command(key, HOLD_PARKED, True, parked_arguments(parked))
    commands += book._bind_hold(key, hold)
    if key.state is KeyState.UNOWNED:
        commands += book._unowned(key)
    elif key.owner != worker_id:
        commands += book._let_go(key)
    # its owner's Released follows: then it stays UNOWNED
    return commands


def _new_held_key(book: Ledger, ref: KeyRef) -> Key:
    """A key an operator names before it exists (a pause, a redrive): new to the book,
    to be declared like an ensure's, within the quotas (else :class:`HoldRefused`)."""
    refused = book._beyond_quota(ref)
    if refused is not None:
        raise HoldRefused(refused)
    return book._new_key(ref, KeyState.UNOWNED)


def pause(book: Ledger, ref: KeyRef) -> list[Command]:
    """An operator pauses a key: no worker gets it until it is resumed. A key not in
    the book is declared (as an ensure with no waiter would) and paused."""
    key = book.keys.get(ref.id)
    if key is None:
        key = _new_held_key(book, ref)
        key.paused = True
        return book._declare(key)  # its hold is bound once declared
    if key.paused:
        return []
    key.paused = True
    commands = book._bind_hold(key, hold_command(key, HOLD_PAUSED, True))
    return commands + book._let_go(key)


def resume(book: Ledger, ref: KeyRef) -> list[Command]:
    """An operator resumes a paused or parked key (a parked one's head is tried again,
    with fresh attempts): both holds are cleared and the key is placed."""
    key = book.keys.get(ref.id)
    if key is None:
        raise HoldRefused(f"key {ref.key!r} of job type {ref.job_type!r} is not known")
    if not key.paused and key.parked is None:
        if ref.job_type in book.paused_types:
            raise HoldRefused(
                f"key {ref.key!r} is not paused itself: its job type {ref.job_type!r} is "
                "(resume the job type)"
            )
        raise HoldRefused(f"key {ref.key!r} of job type {ref.job_type!r} is not paused")
    if key.skipping is not None:
        raise HoldRefused(f"a skip of key {ref.key!r}'s head is under way")
    commands: list[Command] = []
    if key.paused:
        key.paused = False
        commands.append(hold_command(key, HOLD_PAUSED, False))
    if key.parked is not None:
        arguments = parked_arguments(key.parked)
        key.parked = None
        commands.append(hold_command(key, HOLD_PARKED, False, arguments))
    return commands + _place_unowned(book, key)


def pause_type(book: Ledger, job_type: str) -> list[Command]:
    """An operator pauses a whole job type: the next rebalance releases its keys."""
    if job_type in book.paused_types:
        return []
    book.paused_types.add(job_type)
    return [SetHold(HOLD_PAUSED, True, job_type=job_type), Rebalance()]


def resume_type(book: Ledger, job_type: str) -> list[Command]:
    if job_type not in book.paused_types:
        raise HoldRefused(f"job type {job_type!r} is not paused")
    book.paused_types.discard(job_type)
    return [SetHold(HOLD_PAUSED, False, job_type=job_type), Rebalance()]


def skip(book: Ledger, ref: KeyRef) -> list[Command]:
    """An operator skips a parked key's head: it is dead-lettered (:class:`SkipHead`),
    then the key is resumed (:func:`skipped`). Only once its owner has let go of it."""
    key = book.keys.get(ref.id)
    name = f"key {ref.key!r} of job type {ref.job_type!r}"
    if key is None:
        raise HoldRefused(f"{name} is not known")
    if key.parked is None:
        raise HoldRefused(f"{name} is not parked: only a parked key's head is skipped")
    if key.skipping is not None:
        raise HoldRefused(f"a skip of {name}'s head is under way")
    if key.redrive is not None:
        raise HoldRefused(f"a redrive of {name} is under way; skip it afterwards")
    if key.owner is not None:
        raise HoldRefused(
            f"{name} is {key.state.value}: its worker has not let go of it yet; try again"
        )
    if key.state is not KeyState.UNOWNED:
        raise HoldRefused(f"{name} is {key.state.value} now; try again in a moment")
    key.skipping = key.epoch
    parked = key.parked
    return [
        SkipHead(
            key.ref.id,
            key.ref,
            key.queue,
            key.epoch,
            parked.error,
            parked.attempts,
            parked.job_index,
        )
    ]


def skipped(book: Ledger, key_id: str, epoch: int, ok: bool) -> list[Command]:
    """The outcome of a :class:`SkipHead`: done, the key is no longer parked and is
    placed; failed, it stays parked (the operator may try again)."""
    key = book.keys.get(key_id)
    if key is None or key.skipping is None or key.skipping != epoch:
        return []
    key.skipping = None
    commands: list[Command] = []
    if ok and key.parked is not None:
        arguments = parked_arguments(key.parked)
        key.parked = None
        commands.append(hold_command(key, HOLD_PARKED, False, arguments))
    elif not ok:
        log.warning("key %s: skipping its head failed; still parked", key_id)
    return commands + _place_unowned(book, key)


def redrive(book: Ledger, ref: KeyRef, redrive_id: str) -> list[Command]:
    """A redrive wants to put dead letters at the key's head: the key is held, its
    owner released, and once nobody consumes it, it is REDRIVING (its hold bound, then
    :class:`Rearrange`). A key not in the book is declared first."""
    key = book.keys.get(ref.id)
    if key is not None and key.redrive is not None:
        raise HoldRefused(
            f"a redrive of key {ref.key!r} of job type {ref.job_type!r} is under way "
            f"({key.redrive})"
        )
    if key is None:
        key = _new_held_key(book, ref)
        key.redrive = redrive_id
        return book._declare(key)  # REDRIVING once declared
    key.redrive = redrive_id
    if key.state is KeyState.UNOWNED:
        return book._unowned(key)
    # owned: released first; declared or retired: when that ends
    return book._let_go(key)


def rearranged(
    book: Ledger, key_id: str, epoch: int, ok: bool, removed: Iterable[str]
) -> list[Command]:
    """The outcome of a :class:`Rearrange` (``removed``: the routing keys it unbound).
    Either way the redrive is over (if it failed, its dead letters stay in the
    dead-letter queue: run it again); the key is bound afresh and placed."""
    key = book._current(key_id, epoch, KeyState.REDRIVING)
    if key is None:
        return []
    gone = set(removed)
    key.routing_keys = [rk for rk in key.routing_keys if rk not in gone]
    if not ok:
        log.warning("key %s: redrive %s failed; run it again", key_id, key.redrive)
    commands: list[Command] = []
    if key.redrive is not None:
        arguments = redrive_arguments(key.redrive)
        key.redrive = None
        commands.append(hold_command(key, HOLD_REDRIVE, False, arguments))
    return commands + book._declare(key)


def holds_listed(
    book: Ledger,
    keys: Iterable[tuple[KeyRef, str, Mapping[str, str | int]]],
    job_types: Iterable[str],
    now: float,
) -> list[Command]:
    """The holds read back from the broker as a registry starts to lead (the bindings
    of ``Names.holds_exchange``): (key as its queue's name tells it, hold, binding
    arguments), and the paused job types. A key not in the book is added UNOWNED (its
    queue exists); one with a redrive hold is REDRIVING (the redrive was cut: its
    :class:`Rearrange` finishes it).

    A key is known by the text its holds carry (:func:`named_by_hold`), else by its
    token (a hold recorded by an earlier version, or one whose text is not the key's).
    Each key's hold bindings are then made what the book would bind: one parked hold,
    the newest, and one redrive; the key's text as the book knows it (so a hold without
    it, or with a text that is not the key's, is bound again)."""
    commands: list[Command] = []
    for job_type in job_types:
        if job_type not in book.paused_types:
            book.paused_types.add(job_type)
            commands.append(Rebalance())
    touched: dict[str, Key] = {}
    listed: defaultdict[str, list[tuple[str, Arguments]]] = defaultdict(list)
    for ref, hold, arguments in keys:
        if hold not in (HOLD_PAUSED, HOLD_PARKED, HOLD_REDRIVE):
            log.warning("key %s: unknown hold %r ignored", ref.id, hold)
            continue
        named = named_by_hold(ref, arguments)
        if named is None and HOLD_KEY_ARGUMENT in arguments:
            log.warning(
                "key %s: its %s hold names it %.80r, which is not the key of its queue: "
                "known by its token",
                ref.id,
                hold,
                arguments[HOLD_KEY_ARGUMENT],
            )
        named = named or ref
        key = book.keys.get(ref.id)
        if key is None:
            key = book._new_key(named, KeyState.UNOWNED, now=now, seen=True)
        elif key.ref.key == key.ref.token and named.key != named.token:
            key.ref = named  # known by its token until now
        own: Arguments = ()
        if hold == HOLD_PAUSED:
            key.paused = True
        elif hold == HOLD_PARKED:
            parked = parked_from(arguments)
            own = parked_arguments(parked)
            if key.parked is None or parked.at >= key.parked.at:
                key.parked = parked  # two parked bindings (a removal failed): the newest
        else:
            redrive_id = str(arguments.get("x-redrive", ""))
            own = redrive_arguments(redrive_id)
            if key.redrive is None:
                key.redrive = redrive_id  # one redrive at a time
        listed[ref.id].append((hold, bound_with(arguments.get(HOLD_KEY_ARGUMENT), own)))
        touched[ref.id] = key
    for key_id, key in touched.items():
        wanted = bindings_of(key)
        for hold, bound in listed[key_id]:
            if (hold, bound) not in wanted:
                commands.append(SetHold(hold, False, queue=key.queue, arguments=bound))
        for hold, bound in wanted:
            # a redrive's hold is bound as the key enters REDRIVING (_unowned)
            if hold != HOLD_REDRIVE and (hold, bound) not in listed[key_id]:
                add = SetHold(hold, True, queue=key.queue, arguments=bound)
                commands += book._bind_hold(key, add)
        log.info("key %s held: %s", _described(key.ref), ", ".join(book.holds_of(key)))
        if key.state is KeyState.UNOWNED:
            commands += book._unowned(key)
        else:
            commands += book._let_go(key)
    return commands


def _place_unowned(book: Ledger, key: Key) -> list[Command]:
    """A hold was lifted: an unowned key is placed now (others are by what they wait
    for: a release, a declare, a retirement, a redrive)."""
    if key.state is KeyState.UNOWNED:
        return book._place(key)
    return []


def _described(ref: KeyRef) -> str:
    """A key for the logs: its id, and its text if that is not its token."""
    return ref.id if ref.key == ref.token else f"{ref.id} ({ref.key!r})"

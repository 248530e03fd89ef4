"""The registry's broker procedures for operating a key's messages: the one home of reading
the dead-letter queue for a redrive (:func:`read_dead_letters`), of putting dead letters
back at the head of a key's queue (:func:`rearrange`, the key book's ``Rearrange``), and of
dead-lettering a parked key's head (:func:`skip_head`, the book's ``SkipHead``).

Only the registry rearranges a key queue: it alone can stop all routing to it (unbind) and
knows that nobody consumes it (the key is held, UNOWNED). AMQP cannot insert a message at
a queue's head, so a rearrangement publishes the dead letters to the tail and then moves
the ``n`` messages that were waiting before them to the tail too, one by one, in order
(``basic.get`` the head, publish a copy to the tail, confirmed, then ack): the dead letters
end up first, the waiting messages after them, each once, in their order.

What the broker does that this relies on (RabbitMQ 3.10, classic queues; docs/probes):

* a message got with ``basic.get`` and not acked goes back to *its original place* when it
  is nacked with requeue or its channel closes (``requeue_keeps_position.py``), so a
  dead letter or a head left unsettled keeps its place, and a cut rotation leaves every
  message it had not acked where it was;
* publishes on one channel are routed in the order they are sent, and a publisher confirm
  means the message is in the queue.

Copies lose one thing: the ``user_id`` property, which the broker lets a connection set to
its own user only. A rotated or redriven message keeps it when it is the registry's user,
else it goes out without: ``Message.user_id`` is then None for it, and its dedup identity
is the publisher id alone (``Envelope.origin``). See docs/issue16/redrive.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp import commands as spec

from ._amqp import CHANNEL_ERRORS, open_channel
from ._batch import BatchFormatError
from ._envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_FAILED_AT,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_REDRIVE,
    HEADER_WORKER,
    Job,
    dead_letter_headers,
    decode,
    header_text,
    jobs_of,
)
from ._errors import InvalidKeyError, RabbitkeysError
from ._topology import KeyRef, Names

__all__ = [
    "REGISTRY_WORKER_ID",
    "DeadLetter",
    "DeadLetterSelection",
    "RearrangeError",
    "read_dead_letters",
    "rearrange",
    "skip_head",
]

log = logging.getLogger("rabbitkeys.registry")

#: What a dead letter made by ``skip`` names as its worker (``x-rabbitkeys-worker``).
REGISTRY_WORKER_ID = "registry"

#: Headers a dead-lettered copy got (``dead_letter_headers``) that a redriven one drops.
_FAILURE_HEADERS = (HEADER_ERROR, HEADER_ATTEMPTS, HEADER_FAILED_AT, HEADER_WORKER)

#: Messages moved per round of a rotation: got one by one (a ``basic.get`` is a round trip),
#: their copies published together (confirms pipelined), acked with one ``multiple`` ack. A
#: rotation cut inside a round leaves at most this many messages both at the head (requeued)
#: and at the tail (their confirmed copies).
_ROTATION_ROUND = 64


class RearrangeError(RabbitkeysError):
    """:func:`rearrange` failed; how far it got says what state the queue is in.

    ``removed``: the routing keys it had unbound (the book must know them gone, whatever
    else happened). ``sent``: dead-letter copies sent to the queue's tail, of which
    ``published`` were confirmed there (all of the dead letters, or none: those copies are
    sent together); ``rotated``: messages moved from the head to the tail after them.

    :attr:`queue_changed` False: the queue's messages are as they were (only unbound).
    True: it holds copies, or a rotation cut part way; a recovery (``dead_letters=None``,
    same redrive id) must finish the rotation before the key is consumed again. The dead
    letters may be acked after that recovery only if ``published`` is their number (all
    are in the queue, at its head once recovered); else they go back to the dead-letter
    queue, and the copies that did reach the queue are duplicates of them (a rerun of the
    redrive makes them again: the documented limit)."""

    def __init__(
        self, message: str, *, removed: list[str], sent: int, published: int, rotated: int
    ) -> None:
        super().__init__(message)
        self.removed = removed
        self.sent = sent
        self.published = published
        self.rotated = rotated

    @property
    def queue_changed(self) -> bool:
        """Whether redriven copies may be in the queue, or a rotation was cut part way: a
        recovery is due."""
        return self.sent > 0 or self.rotated > 0


# --- reading the dead-letter queue ------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One message got from ``NS.dead-letter``, not acked yet (its selection holds it)."""

    delivery_tag: int
    body: bytes
    properties: spec.Basic.Properties
    job_type: str
    key: str
    #: ``x-rabbitkeys-failed-at`` (epoch microseconds), None if missing or not an int
    failed_at: int | None


class DeadLetterSelection:
    """The dead letters a redrive selected, per (job type, key), held unacked on the
    channel they were got on, which this object owns: until :meth:`settle` acks or
    requeues a key's, or :meth:`close` requeues what is left, they stay out of the
    dead-letter queue. If the channel or the connection closes first, the broker puts them
    all back in their places: a redrive cut short loses no dead letter.

    The broker may take unacked messages back once they are held longer than its
    ``consumer_timeout`` (30 minutes by default), closing the channel: the same outcome."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        selected: dict[tuple[str, str], list[DeadLetter]],
        *,
        not_selected: int,
        unreadable: int,
    ) -> None:
        self._channel = channel
        self._queue = queue
        #: (job type, key) -> its dead letters, in the queue's order stably sorted by
        #: ``failed_at`` (those without it first)
        self.selected = selected
        #: dead letters left in place because the selection refused them
        self.not_selected = not_selected
        #: dead letters left in place because they name no valid key and job type
        self.unreadable = unreadable
        self._unsettled = {ref: [d.delivery_tag for d in found] for ref, found in selected.items()}

    @property
    def count(self) -> int:
        """How many dead letters were selected."""
        return sum(map(len, self.selected.values()))

    async def settle(self, job_type: str, key: str, ok: bool) -> None:
        """Ack (``ok``: they were put back at their key's head) or requeue (to their place
        in the dead-letter queue) the dead letters of one key; a second call for the same
        key does nothing. Raises one of ``CHANNEL_ERRORS`` if the channel is gone: the
        broker then requeued them all already (after an ``ok`` rearrangement they are
        copies: rerunning the redrive would put them at the head again)."""
        tags = self._unsettled.pop((job_type, key), [])
        if not tags:
            return
        underlay = await self._channel.get_underlay_channel()
        for tag in tags:  # interleaved with other keys' tags: no ``multiple``
            if ok:
                await underlay.basic_ack(tag)
            else:
                await underlay.basic_nack(tag, requeue=True)
        await _settled(underlay, self._queue)

    async def close(self) -> None:
        """Requeue every dead letter not settled yet, each to its place, and close the
        channel (closing it alone would requeue them too, but with nothing to say when)."""
        if self._channel.is_closed:
            return
        with contextlib.suppress(*CHANNEL_ERRORS):
            if any(self._unsettled.values()):
                self._unsettled.clear()
                underlay = await self._channel.get_underlay_channel()
                # tag 0 with ``multiple``: every delivery of the channel not settled yet
                await underlay.basic_nack(0, multiple=True, requeue=True)
                await _settled(underlay, self._queue)
            await self._channel.close()

    async def __aenter__(self) -> DeadLetterSelection:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def read_dead_letters(
    connection: AbstractConnection, names: Names, select: Callable[[str, str], bool]
) -> DeadLetterSelection:
    """Read ``NS.dead-letter`` to its end with ``basic.get`` (no auto-ack) on a channel of
    its own, and keep, unacked, the dead letters ``select(job_type, key)`` accepts.

    The others (refused, or naming no valid key and job type) are held too until the end
    is reached, then requeued, each to its own place: requeued at once, a refused head
    would be the next ``basic.get``'s answer again. The end is where the queue was when the
    first message was got: dead letters that arrive meanwhile are not read (they would
    keep a busy queue from ever being read to its end). Raises (the channel closed: every
    message back in its place) if the queue cannot be read."""
    channel = await open_channel(connection)
    try:
        underlay = await channel.get_underlay_channel()
        selected: dict[tuple[str, str], list[DeadLetter]] = defaultdict(list)
        left: list[int] = []
        not_selected = unreadable = 0
        remaining: int | None = None
        while remaining is None or remaining > 0:
            got = await underlay.basic_get(names.dead_letter_queue, no_ack=False)
            delivery = got.delivery
            if not isinstance(delivery, spec.Basic.GetOk):
                break
            if remaining is None:
                remaining = delivery.message_count or 0
            else:
                remaining -= 1
            dead_letter = _dead_letter(_tag(got), got)
            if dead_letter is None:
                unreadable += 1
                left.append(_tag(got))
            elif not select(dead_letter.job_type, dead_letter.key):
                not_selected += 1
                left.append(_tag(got))
            else:
                selected[(dead_letter.job_type, dead_letter.key)].append(dead_letter)
        for tag in left:
            await underlay.basic_nack(tag, requeue=True)
        await _settled(underlay, names.dead_letter_queue)
    except BaseException:
        with contextlib.suppress(*CHANNEL_ERRORS):
            await channel.close()
        raise
    for found in selected.values():
        # stable: dead letters failed at the same time (or not saying when) keep the
        # queue's order; those not saying when go first
        found.sort(key=lambda d: -1 if d.failed_at is None else d.failed_at)
    return DeadLetterSelection(
        channel,
        names.dead_letter_queue,
        dict(selected),
        not_selected=not_selected,
        unreadable=unreadable,
    )


async def _settled(channel: aiormq.abc.AbstractChannel, queue: str) -> None:
    """Return once the broker has taken the acks and nacks sent on ``channel`` for
    ``queue`` (they have no answer): a passive declare asks the queue after them, on the
    same channel, so the broker handles it after them."""
    await channel.queue_declare(queue, passive=True)


def _dead_letter(tag: int, got: aiormq.abc.DeliveredMessage) -> DeadLetter | None:
    """The dead letter ``got`` is, or None if it names no key and job type rabbitkeys could
    have made (it cannot be redriven: it stays in the dead-letter queue)."""
    properties = got.header.properties
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    key, job_type = header_text(headers.get(HEADER_KEY)), header_text(headers.get(HEADER_JOB_TYPE))
    if not key or not job_type:
        return None
    try:
        ref = KeyRef.of(key, job_type)
    except InvalidKeyError:
        return None
    failed_at = headers.get(HEADER_FAILED_AT)
    if not isinstance(failed_at, int) or isinstance(failed_at, bool):
        failed_at = None
    return DeadLetter(tag, got.body, properties, ref.job_type, ref.key, failed_at)


# --- rearranging a key queue ------------------------------------------------------------


async def rearrange(
    connection: AbstractConnection,
    names: Names,
    ref: KeyRef,
    queue: str,
    routing_keys: Sequence[str],
    redrive_id: str,
    dead_letters: Sequence[DeadLetter] | None,
    grace: float,
) -> list[str]:
    """Put ``dead_letters`` at the head of ``queue`` (the key ``ref``'s, held and unconsumed),
    before the messages waiting there, each group in its order; returns the routing keys
    it removed (all of ``routing_keys``).

    1. Unbind ``routing_keys`` from ``NS.jobs.<type>``: publishes now come back to their
       publishers (the routing-key fence), whose ensures wait while the key is REDRIVING.
    2. Sleep ``grace``: messages routed before the unbind land. The queue is frozen now
       (unbound, unconsumed); count its messages, ``n`` (a passive declare).
    3. Bind a private routing key (``<token>|redrive-<hex>``, known to no publisher).
    4. Publish the dead letters through it: original body and properties, headers without
       the failure headers, plus ``x-rabbitkeys-redrive: redrive_id``; persistent,
       mandatory, confirmed.
    5. Rotate: move the ``n`` messages waiting before them to the tail, in order
       (``basic.get``, publish a copy through the private routing key, confirmed, ack).
    6. Unbind the private routing key.

    ``dead_letters`` None is the recovery after a registry crashed mid-way: the dead letters
    went back to the dead-letter queue, copies of some may be in the queue; only the
    rotation is finished: messages move to the tail until the head is one carrying
    ``redrive_id`` (it is requeued in its place, so it is seen as redelivered), at most
    ``n``: a full cycle (no such message: the crash came before any was published) leaves
    the queue in its order.

    No dead letters (an empty list): steps 3 to 5 are skipped (nothing goes in front).

    Raises :class:`RearrangeError` (the cause chained) if any step fails. The queue is
    then unbound from ``RearrangeError.removed``. Unless ``queue_changed``, its messages
    are as they were and the caller requeues the dead letters. Else it holds redriven
    copies behind the messages not rotated yet, the ``rotated`` ones behind them (a cut
    round may leave up to 64 messages both at the head and, as copies, at the tail: their
    duplicates are not dropped by the worker when their ``user_id`` was dropped): keep the
    redrive hold and recover (``dead_letters=None``) before the key is consumed again, and
    ack the dead letters only if all were ``published``. The private routing key is
    unbound on failure too, if the connection still allows it (a cancellation leaves it:
    no publisher knows it)."""
    exchange = names.jobs_exchange(ref.job_type)
    own_user = _own_user(connection)
    removed: list[str] = []
    progress = _Progress()
    channel = await open_channel(connection, publisher_confirms=True)
    private: str | None = None
    try:
        underlay = await channel.get_underlay_channel()
        for routing_key in routing_keys:
            await underlay.queue_unbind(queue, exchange, routing_key=routing_key)
            removed.append(routing_key)
        await asyncio.sleep(grace)
        declared = await underlay.queue_declare(queue, passive=True)
        waiting = (declared.message_count or 0) if declared is not None else 0
        private = f"{ref.token}|redrive-{secrets.token_hex(8)}"
        await underlay.queue_bind(queue, exchange, routing_key=private)
        tail = _Tail(underlay, exchange, private, own_user)
        if dead_letters is None:
            await _finish_rotation(underlay, queue, tail, redrive_id, waiting, progress)
        elif dead_letters:  # none: nothing goes before the waiting messages
            copies = [
                (d.body, _redriven_properties(d.properties, redrive_id, own_user))
                for d in dead_letters
            ]
            progress.sent = len(copies)
            await tail.publish(copies)
            progress.published = len(copies)
            await _rotate(underlay, queue, tail, waiting, progress)
        await _settled(underlay, queue)
        await underlay.queue_unbind(queue, exchange, routing_key=private)
        private = None
    except Exception as exc:
        if private is not None:
            await _unbind_quietly(connection, queue, exchange, private)
        raise RearrangeError(
            f"cannot rearrange the queue of key {ref.id}: {exc!r}",
            removed=removed,
            sent=progress.sent,
            published=progress.published,
            rotated=progress.rotated,
        ) from exc
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.close()
    return removed


@dataclass
class _Progress:
    sent: int = 0
    published: int = 0
    rotated: int = 0


class _Tail:
    """Publishes copies to the tail of the queue being rearranged, through its private
    routing key: mandatory and confirmed, a round at a time (confirms pipelined; frames
    leave in call order, so copies land in it)."""

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, exchange: str, routing_key: str, own_user: str
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._routing_key = routing_key
        self.own_user = own_user

    async def publish(self, messages: Sequence[tuple[bytes, spec.Basic.Properties]]) -> None:
        """Raises unless the broker confirmed every one into the queue."""
        if not messages:
            return
        sends = [
            asyncio.ensure_future(
                self._channel.basic_publish(
                    body,
                    exchange=self._exchange,
                    routing_key=self._routing_key,
                    properties=properties,
                    mandatory=True,
                )
            )
            for body, properties in messages
        ]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            if not isinstance(outcome, spec.Basic.Ack):
                # returned (the private binding is gone) or nacked
                raise RuntimeError(f"a copy was not confirmed into the queue: {outcome!r}")


async def _rotate(
    channel: aiormq.abc.AbstractChannel, queue: str, tail: _Tail, count: int, progress: _Progress
) -> None:
    """Move ``count`` messages from the head of ``queue`` to its tail, in order."""
    while progress.rotated < count:
        round_ = await _get(channel, queue, min(_ROTATION_ROUND, count - progress.rotated))
        if not round_:
            return  # fewer than counted (an operator purged it): nothing more to move
        await _move(channel, tail, round_, progress)


async def _finish_rotation(
    channel: aiormq.abc.AbstractChannel,
    queue: str,
    tail: _Tail,
    redrive_id: str,
    count: int,
    progress: _Progress,
) -> None:
    """Recovery: move messages from the head to the tail until the head carries
    ``redrive_id``, at most ``count``."""
    moved = 0
    while moved < count:
        round_ = await _get(channel, queue, min(_ROTATION_ROUND, count - moved))
        first_redriven = next(
            (i for i, got in enumerate(round_) if _redrive_of(got) == redrive_id), None
        )
        before = round_ if first_redriven is None else round_[:first_redriven]
        if before:
            await _move(channel, tail, before, progress)
            moved += len(before)
        if first_redriven is not None or len(round_) < _ROTATION_ROUND:
            # the head is the redrive's first message (or the queue is shorter than it was
            # counted): what was got after it goes back to its place, it first
            for got in reversed(round_[len(before) :]):
                await channel.basic_nack(_tag(got), requeue=True)
            return


async def _get(
    channel: aiormq.abc.AbstractChannel, queue: str, count: int
) -> list[aiormq.abc.DeliveredMessage]:
    got: list[aiormq.abc.DeliveredMessage] = []
    while len(got) < count:
        message = await channel.basic_get(queue, no_ack=False)
        if not isinstance(message.delivery, spec.Basic.GetOk):
            break
        got.append(message)
    return got


async def _move(
    channel: aiormq.abc.AbstractChannel,
    tail: _Tail,
    round_: list[aiormq.abc.DeliveredMessage],
    progress: _Progress,
) -> None:
    """Copies of ``round_`` to the tail, confirmed; then the originals acked at once."""
    await tail.publish([(got.body, _copy(got.header.properties, tail.own_user)) for got in round_])
    await channel.basic_ack(_tag(round_[-1]), multiple=True)
    progress.rotated += len(round_)


def _tag(got: aiormq.abc.DeliveredMessage) -> int:
    tag = got.delivery_tag
    assert tag is not None  # a GetOk's
    return tag


def _redrive_of(got: aiormq.abc.DeliveredMessage) -> str | None:
    headers = got.header.properties.headers
    return header_text(headers.get(HEADER_REDRIVE)) if isinstance(headers, dict) else None


def _redriven_properties(
    original: spec.Basic.Properties, redrive_id: str, own_user: str
) -> spec.Basic.Properties:
    """A dead letter's properties as it goes back to its key: the failure headers dropped,
    the redrive's id added, persistent, a message id of its own (aiormq's)."""
    headers = dict(original.headers) if isinstance(original.headers, dict) else {}
    for name in _FAILURE_HEADERS:
        headers.pop(name, None)
    headers[HEADER_REDRIVE] = redrive_id
    return _copy(
        original, own_user, headers=headers, delivery_mode=2, message_id=None, expiration=None
    )


def _copy(original: spec.Basic.Properties, own_user: str, **changes: Any) -> spec.Basic.Properties:
    """``original``'s properties with ``changes``; its ``user_id`` only if it is this
    connection's own (the broker refuses any other)."""
    fields: dict[str, Any] = {name: getattr(original, name) for name in _PROPERTY_NAMES}
    if fields["user_id"] != own_user:
        fields["user_id"] = None
    if isinstance(fields["headers"], dict):
        fields["headers"] = dict(fields["headers"])
    fields.update(changes)
    return spec.Basic.Properties(**fields)


_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
)


def _own_user(connection: AbstractConnection) -> str:
    """The user this connection logged in as (aiormq's default: guest)."""
    url = connection.transport.connection.url  # type: ignore[union-attr]
    return str(url.user or "guest")


async def _unbind_quietly(
    connection: AbstractConnection, queue: str, exchange: str, routing_key: str
) -> None:
    """Remove a private routing key after a failure, on a channel of its own (the one the
    failure happened on may be closed); logged if it stays (no publisher knows it)."""
    try:
        channel = await open_channel(connection)
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.queue_unbind(queue, exchange, routing_key=routing_key)
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*CHANNEL_ERRORS):
                    await channel.close()
    except Exception as exc:
        log.warning("queue %s keeps its private binding %s: %r", queue, routing_key, exc)


# --- skipping a parked key's head -------------------------------------------------------


async def skip_head(
    connection: AbstractConnection,
    names: Names,
    queue: str,
    *,
    error: str,
    attempts: int,
    job_index: int,
    user_id: str,
) -> int:
    """Dead-letter the head of a parked key's ``queue`` (nobody consumes it) and remove it;
    returns how many dead letters were made (0: the queue was empty).

    Each job of the head from ``job_index`` on (one for a plain message; the jobs before
    it were handled) is copied alone to ``NS.dead-letters`` with the headers a worker's dead
    letter has (``dead_letter_headers``: the parked ``error`` and ``attempts``, worker
    ``"registry"``), published as ``user_id`` (the connection's user), mandatory and
    confirmed; then the head is acked. A batch that cannot be read is copied whole, as a
    worker does. A ``job_index`` beyond the head's jobs (the head is not the delivery that
    was parked) copies all of them: nothing is lost. Raises if anything fails: the head
    then goes back to its place (its channel is closed), and copies already confirmed
    stay in the dead-letter queue (a retried skip makes them again)."""
    channel = await open_channel(connection, publisher_confirms=True)
    try:
        underlay = await channel.get_underlay_channel()
        head = await underlay.basic_get(queue, no_ack=False)
        if not isinstance(head.delivery, spec.Basic.GetOk):
            return 0
        properties = head.header.properties
        try:
            jobs = jobs_of(properties, head.body)
        except BatchFormatError:
            jobs = [Job(decode(properties), head.body, properties.content_type)]
        if not 0 <= job_index < len(jobs):
            log.warning(
                "queue %s: the head has %d jobs, the parked one was job %d: all dead-lettered",
                queue,
                len(jobs),
                job_index,
            )
            job_index = 0
        failed_at = time.time_ns() // 1000
        sends = []
        for job in jobs[job_index:]:
            headers = dead_letter_headers(
                job.envelope,
                error=_ParkedError(error),
                attempts=attempts,
                worker_id=REGISTRY_WORKER_ID,
                failed_at=failed_at,
            )
            headers[HEADER_ERROR] = error  # as the worker reported it, not re-wrapped
            sends.append(
                asyncio.ensure_future(
                    underlay.basic_publish(
                        job.body,
                        exchange=names.dead_letter_exchange,
                        routing_key="",
                        properties=spec.Basic.Properties(
                            headers=headers,
                            content_type=job.content_type,
                            delivery_mode=2,
                            user_id=user_id,
                        ),
                        mandatory=True,
                    )
                )
            )
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            if not isinstance(outcome, spec.Basic.Ack):
                raise RuntimeError(f"a dead letter was not confirmed: {outcome!r}")
        await underlay.basic_ack(_tag(head))
        # before the caller places the key: a worker must not receive the head
        await _settled(underlay, queue)
        return len(sends)
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await channel.close()


class _ParkedError(Exception):
    """Stands for the error a worker reported as text (``dead_letter_headers`` takes an
    exception; its text is replaced by the reported one)."""

"""The registry's broker procedures for operating a key's messages: the one home of reading
the dead-letter queue for a redrive (:func:`read_dead_letters`), of putting dead letters
back at the head of a key's queue (:func:`rearrange`, the key book's ``Rearrange``), and of
dead-lettering a parked key's head (:func:`skip_head`, the book's ``SkipHead``).

Only the registry rearranges a key queue: it alone can stop all routing to it (unbind) and
knows that nobody consumes it (the key is held, UNOWNED). AMQP cannot insert a message at
a queue's head, so a rearrangement publishes the dead letters to the tail and then moves
the ``n`` messages that were waiting before them to the tail too, in order (taken from the
head, a copy published to the tail, confirmed, then the original acked): the dead letters
end up first, the waiting messages after them, each once, in their order.

What the broker does that this relies on (RabbitMQ 3.10.8, measured: docs/probes/
redrive_rotation.py):

* a message taken and not acked goes back to *its place* (the head, for a queue's first
  messages) when its channel closes, on classic and quorum queues alike; a nack with
  requeue does that on classic queues only: a quorum queue puts it at the *back* (after
  the consumer was cancelled, or after a ``basic.get``). So nothing here nacks with
  requeue: what must go back is left unacked and its channel closed;
* a quorum queue with single active consumer (a key queue under RABBITKEYS_QUEUE_TYPE=
  quorum) refuses ``basic.get`` (RESOURCE_LOCKED): key queues are read with a consumer
  whose prefetch is exactly what is wanted, cancelled before anything is acked;
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

from .._broker.amqp import CHANNEL_ERRORS, open_channel
from .._errors import InvalidKeyError, RabbitkeysError
from .._wire.batch import BatchFormatError
from .._wire.envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_FAILED_AT,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_REDRIVE,
    HEADER_WORKER,
    Job,
    dead_letter_headers,
    decode_envelope,
    header_text,
    jobs_of,
)
from .._wire.topology import KeyRef, Names

__all__ = [
    "REGISTRY_WORKER_ID",
    "DeadLetteredMessage",
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

#: Messages moved per round of a rotation: taken together (one consumer), their copies
#: published together (confirms pipelined), acked with one ``multiple`` ack. A
#: rotation cut inside a round leaves at most this many messages both at the head (given
#: back) and at the tail (their confirmed copies).
_ROTATION_ROUND = 64

#: How long the messages at a key queue's head may take to come to a rearrangement's or a
#: skip's consumer (they are there: it is a wait for a delivery, not for a publisher).
_TAKE_TIMEOUT = 30.0

#: How long a recovery waits before it reads a key queue's length again (see
#: ``_finish_rotation``).
_RECOUNT_PAUSE = 0.2


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
class DeadLetteredMessage:
    """One message got from ``NS.dead-letter``, not acked yet (its selection holds it)."""

    delivery_tag: int
    body: bytes
    properties: spec.Basic.Properties
    job_type: str
    key: str
    #: ``x-rabbitkeys-failed-at`` (epoch microseconds), None if missing or not an int
    failed_at: int | None


class DeadLetterSelection:
    """The dead letters a redrive read, held unacked on the channel they were got on,
    which this object owns: the selected ones per (job type, key) until :meth:`settle`
    acks a key's, and every other one until :meth:`close`, which puts back every dead
    letter not acked, each in its place. If the channel or the connection closes first,
    the broker does the same: a redrive cut short loses no dead letter.

    While a selection is open, the dead letters it holds are not in the queue for anyone
    else (a second redrive does not see them). The broker takes unacked messages back
    once they are held longer than its ``consumer_timeout`` (30 minutes by default),
    closing the channel: they are back in place, and the keys still to be settled cannot
    be acked (:meth:`settle` raises)."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        selected: dict[tuple[str, str], list[DeadLetteredMessage]],
        *,
        not_selected: int,
        unreadable: int,
    ) -> None:
        self._channel = channel
        self._queue = queue
        #: (job type, key) -> its dead letters, in the queue's order stably sorted by
        #: ``failed_at`` (those without it first)
        self.selected = selected
        #: dead letters the selection refused (back in place at :meth:`close`)
        self.not_selected = not_selected
        #: dead letters that name no valid key and job type (back in place at :meth:`close`)
        self.unreadable = unreadable
        self._unsettled = {ref: [d.delivery_tag for d in found] for ref, found in selected.items()}

    @property
    def count(self) -> int:
        """How many dead letters were selected."""
        return sum(map(len, self.selected.values()))

    async def settle(self, job_type: str, key: str, ok: bool) -> None:
        """Settle the dead letters of one key: ``ok`` (they were put back at their key's
        head) acks them, at once; else they stay held, and go back to their places in the
        dead-letter queue at :meth:`close` (a nack with requeue would put them at the back
        of a quorum queue). A second call for the same key does nothing. Raises one of
        ``CHANNEL_ERRORS`` if the channel is gone: the broker put them back already
        (after an ``ok`` rearrangement they are then copies: a rerun of the redrive would
        put them at the head again)."""
        tags = self._unsettled.pop((job_type, key), [])
        if not tags or not ok:
            return
        underlay = await self._channel.get_underlay_channel()
        for tag in tags:  # interleaved with other keys' tags: no ``multiple``
            await underlay.basic_ack(tag)
        await _settled(underlay, self._queue)

    async def close(self) -> None:
        """Put every dead letter not acked back in its place (by closing the channel)."""
        self._unsettled.clear()
        if not self._channel.is_closed:
            with contextlib.suppress(*CHANNEL_ERRORS):
                await self._channel.close()

    async def __aenter__(self) -> DeadLetterSelection:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def read_dead_letters(
    connection: AbstractConnection, names: Names, select: Callable[[str, str], bool]
) -> DeadLetterSelection:
    """Read ``NS.dead-letter`` to its end with ``basic.get`` (no auto-ack; the dead-letter
    queue has no single active consumer, so quorum allows it) on a channel of its own, and
    select, per (job type, key), the dead letters ``select(job_type, key)`` accepts.

    Every dead letter read is held unacked by the returned selection; the others (refused,
    or naming no valid key and job type) go back to their places when it closes. Not
    requeued at once: a refused head would be the next ``basic.get``'s answer again, and a
    quorum queue puts a requeued message at its back. The end is where the queue was when
    the first message was got: dead letters that arrive meanwhile are not read (they would
    keep a busy queue from ever being read to its end). Raises (the channel closed: every
    message back in its place) if the queue cannot be read."""
    channel = await open_channel(connection)
    try:
        underlay = await channel.get_underlay_channel()
        selected: dict[tuple[str, str], list[DeadLetteredMessage]] = defaultdict(list)
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
            elif not select(dead_letter.job_type, dead_letter.key):
                not_selected += 1
            else:
                selected[(dead_letter.job_type, dead_letter.key)].append(dead_letter)
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
    """Return once the broker has taken the acks sent on ``channel`` for ``queue`` (they
    have no answer): a passive declare asks the queue after them, on the same channel, so
    the broker handles it after them."""
    await channel.queue_declare(queue, passive=True)


def _dead_letter(tag: int, got: aiormq.abc.DeliveredMessage) -> DeadLetteredMessage | None:
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
    return DeadLetteredMessage(tag, got.body, properties, ref.job_type, ref.key, failed_at)


# --- rearranging a key queue ------------------------------------------------------------


async def rearrange(
    connection: AbstractConnection,
    names: Names,
    ref: KeyRef,
    queue: str,
    routing_keys: Sequence[str],
    redrive_id: str,
    dead_letters: Sequence[DeadLetteredMessage] | None,
    grace: float,
) -> list[str]:
    """Put ``dead_letters`` at the head of ``queue`` (the key ``ref``'s, held and unconsumed),
    before the messages waiting there, each group in its order; returns the routing keys
    it removed (all of ``routing_keys``).

    1. Unbind ``routing_keys`` from ``NS.jobs.<type>``: publishes now come back to their
       publishers (the routing-key fence), whose ensures wait while the key is REDRIVING.
    2. Sleep ``grace``: messages routed before the unbind land. The queue is frozen now
       (unbound, unconsumed); count its messages, ``n`` (a passive declare), and check that
       it has no consumer indeed (else fail, the queue unchanged).
    3. Bind a private routing key (``<token>|redrive-<hex>``, known to no publisher).
    4. Publish the dead letters through it: original body and properties, headers without
       the failure headers, plus ``x-rabbitkeys-redrive: redrive_id``; persistent,
       mandatory, confirmed.
    5. Rotate: move the ``n`` messages waiting before them to the tail, in order, 64 at a
       time (taken by a consumer of their own channel, copies published through the
       private routing key, confirmed, then the originals acked).
    6. Unbind the private routing key.

    ``dead_letters`` None is the recovery after a registry crashed mid-way: the dead letters
    went back to the dead-letter queue, copies of some may be in the queue; only the
    rotation is finished: messages move to the tail until the head is one carrying
    ``redrive_id`` (taken to be seen, it goes back in its place: a worker then sees it
    redelivered), at most ``n``: a full cycle (no such message: the crash came before any
    was published) leaves the queue in its order.

    No dead letters (an empty list): steps 3 to 5 are skipped (nothing goes in front).

    Raises :class:`RearrangeError` (the cause chained) if any step fails. The queue is
    then unbound from ``RearrangeError.removed``. Unless ``queue_changed``, its messages
    are as they were, and the dead letters must not be acked (they go back to the
    dead-letter queue: ``settle(..., ok=False)``). Else it holds redriven
    copies behind the messages not rotated yet, the ``rotated`` ones behind them (a cut
    round may leave up to 64 messages both at the head and, as copies, at the tail: their
    duplicates are not dropped by the worker when their ``user_id`` was dropped): keep the
    redrive hold and recover (``dead_letters=None``) before the key is consumed again, and
    ack the dead letters only if all were ``published``. The private routing key is
    unbound on failure too, if the connection still allows it (a cancellation leaves it:
    no publisher knows it). A channel that cannot be opened raises as it is (nothing was
    done yet)."""
    exchange = names.jobs_exchange(ref.job_type)
    own_user = _own_user(connection)
    removed: list[str] = []
    progress = _Progress()
    channel = await open_channel(connection, publisher_confirms=True)
    try:
        # what is taken from the head but not acked goes back in place when this one closes
        taker = await open_channel(connection)
    except BaseException:
        await _close(channel)
        raise
    private: str | None = None
    try:
        underlay = await channel.get_underlay_channel()
        head = await taker.get_underlay_channel()
        for routing_key in routing_keys:
            await underlay.queue_unbind(queue, exchange, routing_key=routing_key)
            removed.append(routing_key)
        await asyncio.sleep(grace)
        declared = await underlay.queue_declare(queue, passive=True)
        waiting = (declared.message_count or 0) if declared is not None else 0
        consumers = (declared.consumer_count or 0) if declared is not None else 0
        if consumers:
            # a worker the book does not know of yet (say, after a failover) still
            # consumes it: the rotation's consumer would wait as a standby, and the
            # worker would take messages from under it. Nothing changed yet: stop here
            raise RuntimeError(f"{queue} has {consumers} consumer(s); it must have none")
        private = f"{ref.token}|redrive-{secrets.token_hex(8)}"
        await underlay.queue_bind(queue, exchange, routing_key=private)
        tail = _Tail(underlay, exchange, private, own_user)
        if dead_letters is None:
            await _finish_rotation(head, queue, tail, redrive_id, waiting, progress)
        elif dead_letters:  # none: nothing goes before the waiting messages
            copies = [
                (d.body, _redriven_properties(d.properties, redrive_id, own_user))
                for d in dead_letters
            ]
            progress.sent = len(copies)
            await tail.publish(copies)
            progress.published = len(copies)
            await _rotate(head, queue, tail, waiting, progress)
        await _settled(head, queue)
        await _close(taker)
        await underlay.queue_unbind(queue, exchange, routing_key=private)
        private = None
    except Exception as exc:
        await _close(taker)
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
        await _close(taker)
        await _close(channel)
    return removed


async def _close(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with contextlib.suppress(*CHANNEL_ERRORS):
            await channel.close()


async def _all_confirmed(sends: Sequence[asyncio.Future[Any]], what: str) -> None:
    """Wait for every publish of ``sends`` (pipelined); raise the first error, or
    ``RuntimeError(what)`` for an answer that is not an ack (a return or a nack)."""
    outcomes = await asyncio.gather(*sends, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        if not isinstance(outcome, spec.Basic.Ack):
            raise RuntimeError(f"{what}: {outcome!r}")


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
        # returned (the private binding is gone) or nacked: raised
        await _all_confirmed(sends, "a copy was not confirmed into the queue")


async def _rotate(
    channel: aiormq.abc.AbstractChannel, queue: str, tail: _Tail, count: int, progress: _Progress
) -> None:
    """Move ``count`` messages from the head of ``queue`` to its tail, in order."""
    while progress.rotated < count:
        round_ = await _take(channel, queue, min(_ROTATION_ROUND, count - progress.rotated))
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
    ``redrive_id``, at most the queue's length, ``count``.

    A quorum queue counts the messages a closed channel held only once it has taken them
    back, a moment later (measured: 36 of 100 right after the close; they are delivered
    in their places all the same): a recovery right after a failed rearrangement may be
    told too few. So a count used up without finding the redrive is read again, after a
    pause, and the rotation goes on if the queue turns out longer."""
    moved = 0
    while True:
        if moved >= count:
            await asyncio.sleep(_RECOUNT_PAUSE)
            declared = await channel.queue_declare(queue, passive=True)
            recounted = (declared.message_count or 0) if declared is not None else 0
            if recounted <= count:
                return  # a full cycle: no message carries the redrive, nothing to finish
            count = recounted
        round_ = await _take(channel, queue, min(_ROTATION_ROUND, count - moved))
        first_redriven = next(
            (i for i, got in enumerate(round_) if _redrive_of(got) == redrive_id), None
        )
        before = round_ if first_redriven is None else round_[:first_redriven]
        if before:
            await _move(channel, tail, before, progress)
            moved += len(before)
        if first_redriven is not None:
            # the head is the redrive's first message: it, and what was taken after it,
            # stay unacked, back in place when the channel closes (a nack would put them
            # at the back of a quorum queue)
            return


async def _take(
    channel: aiormq.abc.AbstractChannel, queue: str, count: int
) -> list[aiormq.abc.DeliveredMessage]:
    """The ``count`` messages at the head of ``queue``, in order, unacked (``count`` of the
    queue's ready messages, which nothing else takes or adds to before them).

    A consumer, not ``basic.get``: a quorum queue with single active consumer (a key queue
    under RABBITKEYS_QUEUE_TYPE=quorum) refuses ``basic.get`` (RESOURCE_LOCKED). Its
    prefetch is exactly ``count`` and it is cancelled before anything is acked, so it
    never receives more: what lies beyond (copies just put at the tail) stays there. On a
    key queue the book keeps unconsumed, it is the single active consumer at once; raises
    TimeoutError if the messages do not come within ``_TAKE_TIMEOUT`` (another consumer
    is active, or the queue lost messages since it was counted)."""
    if count <= 0:
        return []
    taken: list[aiormq.abc.DeliveredMessage] = []
    enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        taken.append(message)
        if len(taken) >= count and not enough.done():
            enough.set_result(None)

    await channel.basic_qos(prefetch_count=count)
    consumer = await channel.basic_consume(queue, on_message, no_ack=False)
    closing = channel.closing
    try:
        done, _ = await asyncio.wait(
            {enough, closing}, timeout=_TAKE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if closing in done:
            why = None if closing.cancelled() else closing.exception()
            raise aiormq.exceptions.ChannelInvalidStateError(
                f"the channel closed while taking from {queue}: {why!r}"
            )
        if not done:
            raise TimeoutError(
                f"{len(taken)} of the {count} messages at the head of {queue} came within "
                f"{_TAKE_TIMEOUT:g}s"
            )
    finally:
        closing.cancel()
    assert consumer.consumer_tag is not None
    await channel.basic_cancel(consumer.consumer_tag)
    return sorted(taken, key=_tag)


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
        # the broker's count of a quorum queue's deliveries is the original's, not the copy's
        fields["headers"] = {
            name: value for name, value in fields["headers"].items() if name != _DELIVERY_COUNT
        }
    fields.update(changes)
    return spec.Basic.Properties(**fields)


#: what a quorum queue adds to a message it delivers again
_DELIVERY_COUNT = "x-delivery-count"

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
    was parked) copies all of them: nothing is lost. A queue that has a consumer is left
    as it is (raises). Raises if anything fails: the head
    then goes back to its place (its channel is closed), and copies already confirmed
    stay in the dead-letter queue (a retried skip makes them again)."""
    channel = await open_channel(connection, publisher_confirms=True)
    try:
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(queue, passive=True)
        if declared is None or not declared.message_count:
            return 0
        if declared.consumer_count:
            # its head is not ours to take: the consumer would get it, or keep us waiting
            raise RuntimeError(f"{queue} has {declared.consumer_count} consumer(s)")
        (head,) = await _take(underlay, queue, 1)
        properties = head.header.properties
        try:
            jobs = jobs_of(properties, head.body)
        except BatchFormatError:
            jobs = [Job(decode_envelope(properties), head.body, properties.content_type)]
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
        await _all_confirmed(sends, "a dead letter was not confirmed")
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

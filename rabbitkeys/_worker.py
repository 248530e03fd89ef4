"""The worker runtime: consume the keys the registry assigns, one message per key at a time.

Each key is a consumer of its own queue with a small prefetch (``prefetch`` deliveries held
per key). Deliveries of a key land in that key's buffer, in delivery order, and one runner
task per key handles them one after the other; keys run concurrently, up to ``concurrency``
handlers at once.

Letting go of a key (a rebalance, a retirement, a shutdown) never breaks its order, and the
next owner starts only after this one has let go (see docs/design.md, "Handoff"):

1. the runner finishes the message it is handling and acks it;
2. the consumer is cancelled; deliveries already on their way land in the buffer;
3. what the buffer holds (delivered, never started) is rejected with requeue, which puts
   those messages back in their original places in the queue;
4. only then does the worker report the key released; the registry assigns it elsewhere.

There is no standby consumer: on RabbitMQ before 3.10.13 a single-active-consumer switch to
a standby can crash the queue (docs/probes/sac_switch_crashes_queue.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from prometheus_client import CollectorRegistry

from ._amqp import CHANNEL_ERRORS, ChannelPool, TaskSet, sleep_unless
from ._app import App, Message
from ._connection import keep_connected
from ._control import control_message, declare_registry_queue
from ._dedup import SequenceHistory, Verdict
from ._envelope import Envelope, dead_letter_headers
from ._envelope import decode as decode_envelope
from ._errors import ConfigError, HandlerNotFoundError, ProtocolError
from ._lifecycle import Background
from ._metrics import WorkerMetrics
from ._protocol import (
    MAX_JOB_TYPES,
    MAX_KEYS_PER_MESSAGE,
    Assign,
    ControlMessage,
    KeyAssignment,
    Release,
    Released,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
    decode,
    split,
)
from ._settings import Settings, load_settings
from ._topology import Names, check_worker_id, key_queue_arguments

__all__ = ["Worker"]

log = logging.getLogger("rabbitkeys.worker")


@dataclass(eq=False)
class _OwnedKey:
    assignment: KeyAssignment
    key_id: str
    consumer_tag: str | None = None
    #: delivered and not yet acked, in delivery order; the head is the one being handled
    buffer: deque[DeliveredMessage] = field(default_factory=deque)
    runner: asyncio.Task[None] | None = None
    releasing: bool = False
    last_activity: float = field(default_factory=time.monotonic)
    idle_reported_at: float = 0.0
    history: SequenceHistory = field(default_factory=SequenceHistory)


class Worker(Background):
    """Runs an :class:`App`'s handlers: ``async with Worker(app):`` in the background, or
    ``await Worker(app).run()`` until ``stop()`` (see :mod:`._lifecycle`). Stopping is
    graceful: finish and ack in-flight messages, tell the registry.

    ``Worker(app)`` reads its settings from the ``RABBITKEYS_*`` environment; pass a
    :class:`Settings` to choose them in code. Metrics go to ``metrics_registry`` (default:
    prometheus_client's global registry).
    """

    # The app first, settings second and optional, as in Publisher(settings=None) and
    # Registry(settings=None): a worker cannot exist without an app, and can without
    # settings. The former order Worker(settings, app) binds the two the wrong way round;
    # it is caught below with a TypeError that says what to write instead.
    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        worker_id: str | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if isinstance(app, Settings) or isinstance(settings, App):
            raise TypeError(
                "Worker takes the app first: Worker(app, settings) (settings are optional, "
                "RABBITKEYS_* by default), not Worker(settings, app)"
            )
        settings = settings if settings is not None else load_settings()
        self.settings = settings
        self.app = app
        # checked here: the id names the worker's inbox queue
        self.worker_id = check_worker_id(worker_id) if worker_id else uuid.uuid4().hex[:12]
        if len(app.job_types) > MAX_JOB_TYPES:
            raise ConfigError(
                f"a worker serves at most {MAX_JOB_TYPES} job types; this app has "
                f"{len(app.job_types)}"
            )
        self._base_id = self.worker_id
        self._sessions = 0
        self.names = Names(settings.namespace)
        self._keys: dict[str, _OwnedKey] = {}
        self._key_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = asyncio.Event()
        self._tasks = TaskSet(log, "worker task")
        self._session_lost = asyncio.Event()
        self._control: AbstractChannel | None = None
        self._consume: aiormq.Channel | None = None
        self._dead_letters: AbstractChannel | None = None
        self._declares: ChannelPool | None = None
        self.handled = 0
        self.dead_lettered = 0
        self.duplicates_dropped = 0
        self.order_violations = 0
        self.malformed_messages = 0
        self._in_flight = 0
        self._joined = False
        self.metrics = WorkerMetrics(self, metrics_registry)

    def gauge_values(self) -> dict[str, float]:
        """For the metrics: read at scrape time."""
        return {
            "rabbitkeys_owned_keys": len(self._keys),
            "rabbitkeys_in_flight_messages": self._in_flight,
            "rabbitkeys_buffered_messages": max(
                0, sum(len(o.buffer) for o in self._keys.values()) - self._in_flight
            ),
        }

    @property
    def ready(self) -> bool:
        """Connected and joined: what the readiness probe reports."""
        return self._joined and not self._session_lost.is_set() and not self._stopping.is_set()

    @property
    def owned_keys(self) -> list[str]:
        return sorted(self._keys)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Work until ``stop()``; after losing the broker, reconnect and join again under a
        new worker id (the registry reassigns our keys when the old id's inbox vanishes)."""
        await keep_connected(
            self.settings, f"worker {self._base_id}", self._session, self._stopping, log
        )

    async def _session(self, connection: AbstractConnection) -> None:
        self._sessions += 1
        if self._sessions > 1:
            self.worker_id = f"{self._base_id}-{self._sessions}"
        self._keys.clear()
        self._session_lost = asyncio.Event()
        try:
            await self._start(connection)
            log.info(
                "worker %s serving %s in namespace %r",
                self.worker_id,
                ", ".join(sorted(self.app.job_types)),
                self.names.namespace,
            )
            while not self._stopping.is_set():
                if self._session_lost.is_set():
                    # A channel closed under us (the broker's consumer_timeout, a refused
                    # ack...): start over; the broker requeues what we held, in order.
                    raise ConnectionError("a channel of this worker was closed")
                await self._send(self._heartbeat())
                await sleep_unless(self._stopping, self.settings.heartbeat_interval)
            await self._drain()
        finally:
            self._joined = False
            # What is still running lost its channel: the broker requeues those deliveries.
            running = [*self._tasks, *(o.runner for o in self._keys.values() if o.runner)]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _start(self, connection: AbstractConnection) -> None:
        self._control = await connection.channel()
        self._control.close_callbacks.add(self._on_channel_close)
        await declare_registry_queue(self._control, self.names)
        self._dead_letters = await connection.channel(publisher_confirms=True)
        self._dead_letters.close_callbacks.add(self._on_channel_close)
        await self._dead_letters.declare_queue(self.names.dead_letter_queue, durable=True)
        self._declares = ChannelPool(connection, size=4)
        consume = await connection.channel()
        consume.close_callbacks.add(self._on_channel_close)
        # Applies to each consumer made on this channel afterwards, i.e. to each key.
        await consume.set_qos(prefetch_count=self.settings.prefetch)
        # RabbitMQ reads global=True as a cap shared by all consumers of the channel, on top
        # of the per-key prefetch: what this worker holds over all its keys. It must come
        # second, and no qos(global=False) may follow: that lifts the cap (probe:
        # docs/probes/global_qos_cap.py).
        await consume.set_qos(prefetch_count=self.settings.buffered_messages_cap, global_=True)
        # Consumed through aiormq directly: its callback starts (in a task scheduled when the
        # frame is read) before a later cancel-ok wakes the releasing task. aio-pika's wrapper
        # adds a second task hop, which would let a delivery slip past a release.
        self._consume = cast(aiormq.Channel, await consume.get_underlay_channel())
        self._consume.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        workers = await self._control.declare_exchange(
            self.names.workers_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        inbox = await self._control.declare_queue(
            self.names.worker_inbox(self.worker_id), exclusive=True, auto_delete=True
        )
        await inbox.bind(workers)
        await inbox.consume(self._on_command, no_ack=True)
        await self._send_join()
        self._joined = True

    def _on_channel_close(self, *_: Any) -> None:
        self._session_lost.set()

    async def _send_join(self) -> None:
        """Join, with the keys we consume: several messages when they do not fit in one."""
        owned = [owned.assignment for owned in self._keys.values() if not owned.releasing]
        job_types = sorted(self.app.job_types)
        inbox = self.names.worker_inbox(self.worker_id)
        for join in split(
            owned,
            lambda keys: WorkerJoin(
                worker_id=self.worker_id, inbox=inbox, job_types=job_types, keys=keys
            ),
        ):
            await self._send(join)

    def _heartbeat(self) -> WorkerHeartbeat:
        now = time.monotonic()
        idle: list[str] = []
        for owned in self._keys.values():
            quiet_since = max(owned.last_activity, owned.idle_reported_at)
            if (
                not owned.buffer
                and not owned.releasing
                and now - quiet_since >= self.settings.idle_period
                and len(idle) < MAX_KEYS_PER_MESSAGE  # the rest go with the next heartbeat
            ):
                owned.idle_reported_at = now
                idle.append(owned.key_id)
        waiting = sum(
            len(owned.buffer) - (1 if owned.runner is not None and owned.buffer else 0)
            for owned in self._keys.values()
        )
        return WorkerHeartbeat(
            worker_id=self.worker_id, owned=len(self._keys), waiting=waiting, idle_keys=idle
        )

    async def _send(self, message: WorkerJoin | WorkerHeartbeat | WorkerLeave | Released) -> None:
        assert self._control is not None
        await self._control.default_exchange.publish(
            control_message(message, expiration=self.settings.worker_timeout),
            routing_key=self.names.registry_queue,
        )

    # --- commands from the registry -----------------------------------------------------

    def _dropped(self, what: str, error: BaseException) -> None:
        """Count, log and drop what remote input broke; the worker carries on."""
        self.malformed_messages += 1
        self.metrics.malformed.inc()
        if isinstance(error, ProtocolError):
            log.warning("dropped %s: %s", what, error)
        else:  # not a parse error: show where it failed
            log.warning("dropped %s: %r", what, error, exc_info=error)

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        """Commands from the registry (anyone can write to our inbox): whatever one breaks
        is counted as malformed, logged and dropped; the worker keeps its keys."""
        try:
            command = decode(message.body)
        except ProtocolError as exc:
            self._dropped("a command", exc)
            return
        try:
            await self._run_command(command)
        except CHANNEL_ERRORS:
            raise  # the control channel is gone: the session starts over
        except Exception as exc:
            self._dropped(f"a {command.type} command", exc)

    async def _run_command(self, command: ControlMessage) -> None:
        if isinstance(command, Assign):
            if self._stopping.is_set():
                return  # the registry learns from our leave that these keys need a home
            for assignment in command.keys:
                if self._is_ours(assignment):
                    self._tasks.spawn(self._acquire(assignment))
        elif isinstance(command, Release):
            self._tasks.spawn(self._release_and_report(command.key_ids))
        elif isinstance(command, Sync):
            await self._send_join()
        else:
            raise ProtocolError(f"a {command.type!r} message is not a command")

    def _is_ours(self, assignment: KeyAssignment) -> bool:
        """Only key queues of our namespace, named after the key they claim to be."""
        if self.names.key_of_report(assignment.queue, assignment.key_id, assignment.key) is None:
            self._dropped(
                "an assignment",
                ProtocolError(f"queue {assignment.queue!r} is not key {assignment.key_id!r}'s"),
            )
            return False
        return True

    @contextlib.asynccontextmanager
    async def _key_lock(self, key_id: str) -> AsyncIterator[None]:
        """Commands for one key run one after the other, in the order they came. The lock
        is dropped when nobody holds or waits for it, so key churn does not grow memory."""
        entry = self._key_locks.get(key_id)
        if entry is None:
            entry = self._key_locks[key_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._key_locks[key_id]

    async def _acquire(self, assignment: KeyAssignment) -> None:
        key_id = assignment.key_id
        async with self._key_lock(key_id):
            owned = self._keys.get(key_id)
            if owned is not None and self._consuming(owned):
                owned.assignment = assignment  # a new routing key after a rebind
                return
            if self._stopping.is_set():
                return
            assert self._declares is not None and self._consume is not None
            # Declaring (same arguments) first means a consume never hits a missing queue,
            # which would close the channel every key is consumed on.
            try:
                await (await self._declares.get()).queue_declare(
                    assignment.queue,
                    durable=self.settings.durable,
                    arguments=key_queue_arguments(self.settings.key_queue_expires),
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                # Declared with other arguments (settings differ between processes, say
                # during a rolling change): if it exists, consume it all the same. The same
                # code also means "no room" (the vhost's max-queues): then there is no
                # queue, and a consume would close the channel every key is consumed on.
                if not await self._queue_exists(assignment.queue):
                    log.error("cannot declare the queue of key %s: %s", key_id, exc)
                    self._tasks.spawn(self._give_back(assignment))
                    return
                log.warning("key %s: %s; consuming the queue as it is", key_id, exc)
            except Exception as exc:  # a broker refusal, or a name the client refuses
                log.error("cannot declare the queue of key %s: %r", key_id, exc)
                self._tasks.spawn(self._give_back(assignment))
                return
            if self._stopping.is_set():
                return  # stop() came while we declared: we must not consume after leaving
            owned = _OwnedKey(assignment, key_id)
            self._keys[key_id] = owned
            try:
                ok = await self._consume.basic_consume(
                    assignment.queue, partial(self._on_delivery, owned)
                )
            except Exception as exc:
                # On a channel error the channel is gone and the session starts over; else
                # the key was never ours: hand it back.
                log.error("cannot consume key %s: %r", key_id, exc)
                if self._keys.get(key_id) is owned:
                    del self._keys[key_id]
                if not isinstance(exc, CHANNEL_ERRORS):
                    self._tasks.spawn(self._give_back(assignment))
                return
            owned.consumer_tag = ok.consumer_tag

    async def _queue_exists(self, queue: str) -> bool:
        assert self._declares is not None
        try:
            await (await self._declares.get()).queue_declare(queue, passive=True)
        except Exception:  # NOT_FOUND, or the channel is gone: not a queue to consume now
            return False
        return True

    async def _give_back(self, assignment: KeyAssignment) -> None:
        """Tell the registry we do not consume a key it assigned us. After a pause: it may
        assign it to us again at once, and the failure must not turn into a busy loop."""
        await sleep_unless(self._stopping, self.settings.heartbeat_interval)
        await self._send(Released(worker_id=self.worker_id, keys=[assignment]))

    def _consuming(self, owned: _OwnedKey) -> bool:
        channel = self._consume
        return (
            owned.consumer_tag is not None
            and channel is not None
            and not channel.is_closed
            and owned.consumer_tag in channel.consumers
        )

    async def _release_and_report(self, key_ids: list[str]) -> None:
        released = await asyncio.gather(
            *(self._release(key_id) for key_id in key_ids), return_exceptions=True
        )
        keys = [assignment for assignment in released if isinstance(assignment, KeyAssignment)]
        if keys:
            for report in split(keys, lambda chunk: Released(worker_id=self.worker_id, keys=chunk)):
                await self._send(report)

    async def _release(self, key_id: str) -> KeyAssignment | None:
        """Let go of a key without reordering it (the four steps in the module docstring)."""
        async with self._key_lock(key_id):
            owned = self._keys.get(key_id)
            if owned is None:
                return None
            owned.releasing = True
            started = time.perf_counter()
            if owned.runner is not None:
                await asyncio.wait([owned.runner])
            await self._cancel(owned)
            await self._requeue_buffer(owned)
            if self._keys.get(key_id) is owned:
                del self._keys[key_id]
            self.metrics.keys_released.inc()
            self.metrics.release_duration.observe(time.perf_counter() - started)
            return owned.assignment

    async def _cancel(self, owned: _OwnedKey) -> None:
        tag, owned.consumer_tag = owned.consumer_tag, None
        channel = self._consume
        if tag is None or channel is None or channel.is_closed:
            return
        with contextlib.suppress(*CHANNEL_ERRORS):
            await channel.basic_cancel(tag)

    async def _requeue_buffer(self, owned: _OwnedKey) -> None:
        channel = self._consume
        if not owned.buffer or channel is None or channel.is_closed:
            owned.buffer.clear()
            return
        with contextlib.suppress(*CHANNEL_ERRORS):
            while owned.buffer:
                delivery = owned.buffer.popleft()
                await channel.basic_reject(_tag(delivery), requeue=True)
            # A round trip on the same channel: the broker has taken the rejects in before
            # we tell the registry (and so the next owner) that the key is free. The
            # channel-wide cap again: a per-consumer qos here would lift it.
            await channel.basic_qos(
                prefetch_count=self.settings.buffered_messages_cap, global_=True
            )

    def _on_broker_cancel(self, frame: Any) -> None:
        """The broker dropped one of our consumers (its queue was deleted or crashed): let
        go of the key as in a release, and tell the registry, which assigns it again."""
        for owned in list(self._keys.values()):
            if owned.consumer_tag == frame.consumer_tag:
                log.warning("the broker cancelled our consumer of key %s", owned.key_id)
                owned.consumer_tag = None
                self._tasks.spawn(self._release_and_report([owned.key_id]))

    # --- deliveries ---------------------------------------------------------------------

    async def _on_delivery(self, owned: _OwnedKey, delivery: DeliveredMessage) -> None:
        if self._keys.get(owned.key_id) is not owned:
            # Arrived after we let go of the key (should not happen: see _start). Hand it
            # straight back rather than sit on it and block the key.
            assert self._consume is not None
            await self._consume.basic_reject(_tag(delivery), requeue=True)
            return
        # No await before this append: deliveries enter the buffer in delivery order.
        owned.buffer.append(delivery)
        owned.last_activity = time.monotonic()
        if owned.runner is None and not owned.releasing:
            owned.runner = asyncio.ensure_future(self._run_key(owned))
            owned.runner.add_done_callback(self._tasks.log_failure)

    async def _run_key(self, owned: _OwnedKey) -> None:
        """Handle the key's buffered deliveries one at a time, oldest first."""
        try:
            while owned.buffer and not owned.releasing:
                delivery = owned.buffer[0]
                envelope = decode_envelope(delivery.header.properties)
                origin = envelope.origin if self.settings.dedup else None
                verdict = owned.history.check(*origin) if origin else Verdict.NEW
                if verdict is Verdict.DUPLICATE:
                    # the same publisher's same message again (sent twice across a lost
                    # connection, or redelivered after a crash): handled already
                    self.duplicates_dropped += 1
                    self.metrics.duplicates_dropped.inc()
                else:
                    if verdict is Verdict.OUT_OF_ORDER:
                        self.order_violations += 1
                        self.metrics.order_violations.inc()
                        log.error("key %s: message %s arrived out of order", owned.key_id, origin)
                    async with self._slots:
                        finished = await self._handle(owned, delivery, envelope)
                    if not finished:
                        return  # shutting down mid-retry: released (requeued) by the drain
                    if origin:
                        owned.history.record(*origin)
                assert self._consume is not None
                # no drain wait: acks leave in order on the channel anyway, and waiting for
                # the socket write per message halved throughput (docs/benchmarks.md)
                await self._consume.basic_ack(_tag(delivery), wait=False)
                owned.buffer.popleft()
                self.handled += 1
                owned.last_activity = time.monotonic()
        except Exception:
            # The channel is gone, or the dead-letter copy could not be made: we cannot
            # settle this delivery. Start over: the broker requeues all we held, in order.
            log.exception("key %s: cannot settle a delivery; reconnecting", owned.key_id)
            self._session_lost.set()
        finally:
            owned.runner = None

    async def _handle(
        self, owned: _OwnedKey, delivery: DeliveredMessage, envelope: Envelope
    ) -> bool:
        """Run the handler with retries; dead-letter after the last. False if shutdown
        interrupted the retries (the delivery must then stay unacked)."""
        # one copy for every attempt: what a handler does to it is not the dead letter's
        headers = dict(envelope.headers)
        job_type = owned.assignment.job_type
        if envelope.published_at is not None:
            self.metrics.end_to_end_latency.observe(
                max(0.0, time.time() - envelope.published_at / 1e6)
            )
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1:
                self.metrics.retried.inc()
            message = Message(
                # the header holds the original text even when the queue name is hashed
                key=envelope.key or owned.assignment.key,
                job_type=job_type,
                body=delivery.body,
                headers=headers,
                publisher_id=envelope.publisher_id,
                sequence=envelope.sequence,
                attempt=attempt,
                redelivered=bool(getattr(delivery.delivery, "redelivered", False)),
            )
            try:
                handler = self.app.handler_for(job_type)
            except HandlerNotFoundError as exc:
                await self._dead_letter(delivery, envelope, exc, attempt)
                return True
            self._in_flight += 1
            started = time.perf_counter()
            error: Exception | None = None
            try:
                await handler(message)
            except Exception as exc:
                error = exc
            finally:
                self._in_flight -= 1
                self.metrics.handler_duration.observe(time.perf_counter() - started)
            if error is None:
                self.metrics.handled.inc()
                return True
            self.metrics.handler_failures.inc()
            if attempt > self.settings.max_retries:
                log.error(
                    "key %s: handler failed %d times, dead-lettering: %r",
                    owned.key_id,
                    attempt,
                    error,
                )
                await self._dead_letter(delivery, envelope, error, attempt)
                return True
            delay = min(
                self.settings.retry_backoff * 2 ** (attempt - 1),
                self.settings.retry_backoff_max,
            )
            log.warning(
                "key %s: handler failed (attempt %d), retrying in %.2fs: %r",
                owned.key_id,
                attempt,
                delay,
                error,
            )
            # The key's later messages wait in its queue meanwhile.
            if await sleep_unless(self._stopping, delay):
                return False

    async def _dead_letter(
        self,
        delivery: DeliveredMessage,
        envelope: Envelope,
        error: BaseException,
        attempts: int,
    ) -> None:
        """Copy the message to the namespace's dead-letter queue with the error recorded;
        the caller acks the original only after the broker confirmed the copy."""
        assert self._dead_letters is not None
        await self._dead_letters.default_exchange.publish(
            aio_pika.Message(
                delivery.body,
                headers=dead_letter_headers(
                    envelope, error=error, attempts=attempts, worker_id=self.worker_id
                ),
                content_type=delivery.header.properties.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.names.dead_letter_queue,
        )
        self.dead_lettered += 1
        self.metrics.dead_lettered.inc()

    # --- shutdown -----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Graceful stop: take no new deliveries, finish and ack what is in flight, hand
        the rest back, then leave (the registry reassigns only keys we have let go)."""
        log.info("worker %s stopping: settling %d keys", self.worker_id, len(self._keys))
        await asyncio.gather(*(self._release(key_id) for key_id in list(self._keys)))
        with contextlib.suppress(Exception):
            await self._send(WorkerLeave(worker_id=self.worker_id))
        log.info("worker %s stopped after %d messages", self.worker_id, self.handled)


def _tag(delivery: DeliveredMessage) -> int:
    tag = getattr(delivery.delivery, "delivery_tag", None)
    assert isinstance(tag, int)
    return tag

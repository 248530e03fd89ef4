"""The leading registry's view checked against the broker's: the one home of what the
registry learns by asking the broker rather than the workers.

* key queues nobody consumes, and every key's bindings (management API listing), adopted
  into the key book once workers had a moment to report theirs, then every minute or so
  (less often the longer a listing takes);
* the backlog metric (one listing without statistics, never a declare per key) and a
  status's backlog per key;
* the holds (paused, parked, redriven keys; paused job types), read back from the bindings
  of ``NS.holds`` before a new leader places any key;
* each key queue's messages and the age of its head (``rabbitkeys keys``, the oldest
  message gauge), from the periodic listing;
* leases of key queues no worker consumes (a passive declare renews ``x-expires``);
* which workers are gone: the event exchange's ``queue.deleted`` for a worker's exclusive
  inbox, or, without it, a worker silent for ``worker_timeout`` whose inbox is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from .._broker.amqp import (
    CHANNEL_ERRORS,
    ChannelPool,
    QueueChecks,
    QueueUnavailableError,
    fresh_channel,
    open_channel,
    passive_declare_refusal,
    queue_unavailable,
)
from .._broker.management import list_bindings, list_queues, list_source_bindings, routing_keys
from .._errors import BrokerUnavailableError, InvalidKeyError
from .._settings import Settings
from .._wire.envelope import header_text
from .._wire.topology import HOLD_PAUSED, KeyRef, Names, check_job_type
from .keybook import Command, KeyBook
from .keylist import QueueStats

__all__ = ["Reconciler"]

log = logging.getLogger("rabbitkeys.registry")

_EVENT_EXCHANGE = "amq.rabbitmq.event"

# How often the leader compares its keys with the broker's key queues (management API), at
# least; and at most what share of the time its listings may take (at 100,000 keys a
# listing of queues and bindings takes seconds: it runs at most a twentieth of the time).
_RECONCILE_INTERVAL = 60.0
_RECONCILE_SHARE = 20
# How often the leader reads the key queues' depths for the backlog metric, at least; and
# the same bound on the listing's share of the time.
_BACKLOG_INTERVAL = 15.0
_BACKLOG_SHARE = 10
# How often the leader reads the key queues' head timestamps (a listing WITH statistics:
# the management API gives head_message_timestamp only there), at least; and at most what
# share of the time it may take.
_AGE_INTERVAL = 30.0
_AGE_SHARE = 20
# Passive declares at once when the adoption asks about queues the book does not know.
_PROBES_IN_FLIGHT = 32
# How long a new leader keeps asking the management API for the holds before it leads
# without them.
HOLDS_WAIT = 10.0
#: ... but only this long while every endpoint refuses the connection: no management
#: listener there (the plugin is off, or the URL is wrong), which waiting rarely mends,
#: and the leader must not keep the namespace without one for long
HOLDS_WAIT_REFUSED = 2.0


class Reconciler:
    """One leading session's checks against the broker, for its key book. It tells the
    registry of a worker that is gone (``worker_gone``), of remote input it dropped
    (``dropped``) and of keys it adopted (``adopted``: they want a rebalance)."""

    def __init__(
        self,
        settings: Settings,
        connection: AbstractConnection,
        book: KeyBook,
        *,
        worker_gone: Callable[..., None],
        dropped: Callable[[str, BaseException], None],
        adopted: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._names = Names(settings.namespace)
        self._connection = connection
        self._book = book
        self._worker_gone = worker_gone
        self._dropped = dropped
        self._adopted = adopted
        # passive declares (leases, backlog) fail with NOT_FOUND now and then: their own
        # channels, so that never fails a declare or bind of an ensure
        self._probes = ChannelPool(connection, size=2)
        # bounded: RabbitMQ 4.0 answers a passive declare of a classic queue whose node is
        # down after ~65 s, and these run in the registry's heartbeat loop
        self._checks = QueueChecks(connection)
        self.backlog_messages = 0
        self.key_queue_count = 0
        #: each key queue's messages and head timestamp as of the last listing
        self.queue_stats: dict[str, QueueStats] = {}
        #: when that listing was made (monotonic); None before the first
        self.listed_at: float | None = None
        #: head timestamps of the last listing with statistics, and when it was made
        self._heads: dict[str, int | None] = {}
        self._heads_at = float("-inf")
        self._heads_interval = _AGE_INTERVAL

    # --- holds ----------------------------------------------------------------------------

    async def load_holds(self) -> list[Command]:
        """The holds recorded on ``NS.holds``, fed to the book (its commands returned).
        Called before the leader consumes its control queue, so that no paused or parked
        key is placed after a failover. Retries for :data:`HOLDS_WAIT` seconds
        (:data:`HOLDS_WAIT_REFUSED` while no management listener answers at all), then
        leads without them, loudly."""
        started = time.monotonic()
        while True:
            try:
                return await self._read_holds()
            except (BrokerUnavailableError, KeyError, ValueError, TypeError) as exc:
                # "Connection refused" is how every platform's OSError words ECONNREFUSED
                refused = "Connection refused" in str(exc)
                waited = time.monotonic() - started
                if waited >= (HOLDS_WAIT_REFUSED if refused else HOLDS_WAIT):
                    log.error(
                        "CANNOT READ THE HOLDS (paused, parked and redriven keys, paused job "
                        "types) from the management API after %gs (%s): leading without "
                        "them, so held keys may be given to workers; they are recorded on "
                        "%s and are read again by the next leader",
                        round(waited, 1),
                        exc,
                        self._names.holds_exchange,
                    )
                    return []
                await asyncio.sleep(0.5)

    async def _read_holds(self) -> list[Command]:
        found = await list_source_bindings(self._settings, self._names.holds_exchange)
        jobs_prefix = self._names.jobs_exchange("x")[:-1]
        keys: list[tuple[KeyRef, str, dict[str, str | int]]] = []
        job_types: set[str] = set()
        for binding in found:
            if binding.destination_type == "queue":
                # the key as its queue's name tells it: a hashed key's token only; its text
                # is in the binding's arguments (HOLD_KEY_ARGUMENT), which the book believes
                # only if it stands for that token (_registry.keybook.named_by_hold)
                ref = self._names.key_of_queue(binding.destination)
                if ref is not None:
                    arguments = {
                        name: value
                        for name, value in binding.arguments.items()
                        if isinstance(value, str | int) and not isinstance(value, bool)
                    }
                    keys.append((ref, binding.routing_key, arguments))
            elif (
                binding.destination_type == "exchange"
                and binding.destination.startswith(jobs_prefix)
                and binding.routing_key == HOLD_PAUSED
            ):
                with contextlib.suppress(InvalidKeyError):
                    job_types.add(check_job_type(binding.destination[len(jobs_prefix) :]))
        if keys or job_types:
            log.info("holds read back: %d on keys, %d paused job types", len(keys), len(job_types))
        return self._book.holds_listed(keys, job_types, time.monotonic())

    # --- adoption -----------------------------------------------------------------------

    async def rebuild_from_broker(self) -> None:
        """Adopt key queues nobody consumes, and learn every key's bindings, from the
        broker itself: once workers had a moment to answer ``Sync``, then every
        ``_RECONCILE_INTERVAL`` as a safety net for keys that fell between the cracks."""
        await asyncio.sleep(2 * self._settings.heartbeat_interval)
        failures = 0
        while True:
            started = time.monotonic()
            try:
                complete = await self._adopt_from_broker()
            except (BrokerUnavailableError, *CHANNEL_ERRORS, KeyError, ValueError) as exc:
                complete = False
                if failures == 0:
                    log.warning(
                        "cannot list the broker's key queues (%s): keys no worker consumes "
                        "are not adopted until it answers; enable rabbitmq_management",
                        exc,
                    )
            failures = 0 if complete else failures + 1
            took = time.monotonic() - started
            interval = max(_RECONCILE_INTERVAL, _RECONCILE_SHARE * took)
            # right after a broker restart it may not answer: retry soon
            await asyncio.sleep(interval if complete else min(30.0, failures))

    async def _adopt_from_broker(self) -> bool:
        # Names only: the broker's per-queue statistics (consumers) cost it most at 100,000
        # queues, and only the few queues the book does not know need a consumer count.
        found = await list_queues(self._settings, self._names.key_queue_prefix, statistics=False)
        refs = {q.name: ref for q in found if (ref := self._names.key_of_queue(q.name))}
        bindings: dict[str, list[str]] = defaultdict(list)
        for job_type in {ref.job_type for ref in refs.values()}:
            try:
                exchange = self._names.jobs_exchange(job_type)
            except InvalidKeyError:  # a queue rabbitkeys cannot have made: not a key's
                refs = {name: ref for name, ref in refs.items() if ref.job_type != job_type}
                continue
            for bound_queue, routing_key in await list_bindings(self._settings, exchange):
                bindings[bound_queue].append(routing_key)
        book = self._book
        unknown = [(name, ref) for name, ref in refs.items() if ref.id not in book.keys]
        consumers = await self._consumer_counts([name for name, _ in unknown])
        adopted = 0
        for name, ref in refs.items():
            if name in consumers or ref.id in book.keys:
                bound = bindings.get(name, [])
                count = consumers.get(name, 0)
                adopted += book.adopt_listed(ref, count, bound, time.monotonic())
        if adopted:
            log.info("adopted %d unconsumed keys from the broker", adopted)
            self._adopted()
        return True

    async def _consumer_counts(self, queues: list[str]) -> dict[str, int]:
        """Each queue's consumer count, by a passive declare (a few at a time); a queue
        that is gone meanwhile is left out."""
        limit = asyncio.Semaphore(_PROBES_IN_FLIGHT)
        counts: dict[str, int] = {}

        async def count(queue: str) -> None:
            async with limit:
                with contextlib.suppress(*CHANNEL_ERRORS):
                    ok = await (await self._probes.get()).queue_declare(queue, passive=True)
                    counts[queue] = int(ok.consumer_count or 0)

        await asyncio.gather(*(count(queue) for queue in queues))
        return counts

    # --- backlog and leases ---------------------------------------------------------------

    async def poll_backlog(self) -> None:
        """Messages in key queues (ready and unacknowledged, AMQP messages: a batch counts
        once), for the metric an autoscaler reads and ``rabbitkeys keys``. One listing
        through the management API (unpaged, filtered here, without statistics), not a
        declare per key; now and then one with statistics for the head timestamps."""
        while True:
            started = time.monotonic()
            with contextlib.suppress(BrokerUnavailableError, KeyError, ValueError, TypeError):
                await self._list_heads(started)
            with contextlib.suppress(BrokerUnavailableError, KeyError, ValueError, TypeError):
                found = await list_queues(
                    self._settings, self._names.key_queue_prefix, statistics=False
                )
                self.backlog_messages = sum(queue.messages for queue in found)
                self.key_queue_count = len(found)
                self.queue_stats = {
                    q.name: QueueStats(q.messages, self._heads.get(q.name) if q.messages else None)
                    for q in found
                }
                self.listed_at = time.monotonic()
            # Keep the listing's share of the management API's time under a tenth.
            took = time.monotonic() - started
            await asyncio.sleep(max(_BACKLOG_INTERVAL, _BACKLOG_SHARE * took))

    async def _list_heads(self, now: float) -> None:
        """The head timestamps, from a listing with statistics (the costly kind at many
        queues: at most every ``_AGE_INTERVAL``, and a twentieth of the time). A broker
        that collects no statistics gives none: ages are then unknown."""
        if now - self._heads_at < self._heads_interval:
            return
        self._heads_at = now
        found = await list_queues(self._settings, self._names.key_queue_prefix, statistics=True)
        self._heads = {q.name: q.head_timestamp for q in found}
        took = time.monotonic() - now
        self._heads_interval = max(_AGE_INTERVAL, _AGE_SHARE * took)

    def oldest_age_by_job_type(self, wall_now: float | None = None) -> dict[str, float]:
        """The age in seconds of the oldest waiting message over each job type's key
        queues, as of the last listing (0 for a job type with none, or none known)."""
        wall_now = time.time() if wall_now is None else wall_now
        ages: dict[str, float] = dict.fromkeys(self._book.keys.job_types, 0.0)
        for queue, stats in self.queue_stats.items():
            ref = self._names.key_of_queue(queue)
            if ref is None:
                continue
            age = 0.0 if stats.head_timestamp is None else max(0.0, wall_now - stats.head_timestamp)
            ages[ref.job_type] = max(ages.get(ref.job_type, 0.0), age)
        return ages

    async def backlog(self) -> dict[str, int]:
        """Ready messages per key, by passive declares (a few at a time)."""
        limit = asyncio.Semaphore(32)
        counts: dict[str, int] = {}

        async def count(key_id: str, queue: str) -> None:
            async with limit:
                with contextlib.suppress(*CHANNEL_ERRORS):
                    ok = await (await self._probes.get()).queue_declare(queue, passive=True)
                    counts[key_id] = int(ok.message_count or 0)

        keys = list(self._book.keys.values())
        await asyncio.gather(*(count(k.ref.id, k.queue) for k in keys))
        return counts

    async def renew_unowned_leases(self) -> None:
        """A key queue without consumer expires with its messages (x-expires): while no
        worker can take a key, renew its lease with a passive declare."""
        book = self._book
        now = time.monotonic()
        for key in book.leases_due(now, self._settings.key_queue_expires / 3):
            try:
                await self._checks.passive_declare(key.queue)
                book.lease_renewed(key.ref.id, now)
            except QueueUnavailableError:
                continue  # its node is down: the queue comes back with it
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                if queue_unavailable(exc):
                    continue  # its node is down: the queue comes back with it
                # Retired meanwhile (the awaits above let a retirement finish), or really
                # lost: only the latter is news, and only then is it ours to drop.
                if book.keys.get(key.ref.id) is key and book.queue_lost(key.ref.id):
                    log.error("unowned key %s lost its queue (expired or deleted)", key.ref.id)

    async def recheck_unavailable(self) -> None:
        """Keys found unavailable (their cluster node down) until one of their publishers
        asks again: a passive declare tells when each is back, so that the gauge (and its
        alert) does not wait for a publish. Only those keys: a few, while a node is down."""
        book = self._book
        for key in [k for k in book.keys.values() if k.unavailable]:
            with contextlib.suppress(*CHANNEL_ERRORS, QueueUnavailableError):
                await self._checks.passive_declare(key.queue)
                book.queue_reachable(key.ref.id)

    # --- workers that are gone ------------------------------------------------------------

    async def watch_worker_inboxes(self) -> None:
        """A worker's inbox is exclusive: the broker deletes it the moment the worker's
        connection dies. With the event exchange plugin, that deletion tells us at once
        (a kill -9 is noticed in milliseconds, not after ``worker_timeout``).

        The plugin publishes the events of every vhost into ``amq.rabbitmq.event`` of one
        vhost (``event_exchange.vhost``, default ``/``; docs/internals/index.md, "Virtual hosts"):
        in any other vhost the exchange does not exist and only heartbeats tell."""
        channel = await open_channel(self._connection)  # closed by NOT_FOUND: its own number
        try:
            await channel.declare_exchange(_EVENT_EXCHANGE, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            log.warning(
                "no %s exchange in vhost %r (the rabbitmq_event_exchange plugin is off, or "
                "publishes into another vhost: event_exchange.vhost in rabbitmq.conf): a "
                "crashed worker is noticed after worker_timeout (%gs) without heartbeat",
                _EVENT_EXCHANGE,
                self._settings.vhost,
                self._settings.worker_timeout,
            )
            return
        events = await channel.declare_queue(
            self._names.events_queue, exclusive=True, auto_delete=True
        )
        await events.bind(_EVENT_EXCHANGE, routing_key="queue.deleted")
        await events.consume(self._on_queue_deleted, no_ack=True)

    async def _on_queue_deleted(self, event: AbstractIncomingMessage) -> None:
        try:
            headers = event.headers or {}
            name, vhost = (header_text(headers.get(field)) for field in ("name", "vhost"))
            if vhost is not None and vhost != self._settings.vhost:
                return  # the same names in another vhost are other workers
            prefix = self._names.worker_inbox("")
            if name is not None and name.startswith(prefix):
                self._worker_gone(name[len(prefix) :], reason="disconnected")
        except Exception as exc:
            self._dropped("a queue.deleted event", exc)

    async def owns_inbox(self, worker_id: str, session: str) -> bool:
        """Whether ``session`` is bound to the worker's exclusive inbox: only the inbox's
        own connection can bind it, so this is the broker saying which session is that
        worker (``_wire.senders.WorkerSessions``). Raises :class:`BrokerUnavailableError`
        without the management API."""
        route = self._names.worker_route(worker_id, session)
        inbox = self._names.worker_inbox(worker_id)
        return route in await routing_keys(self._settings, self._names.commands_exchange, inbox)

    async def drop_silent_workers(self) -> None:
        """A worker without heartbeat for ``worker_timeout`` is dropped only once the broker
        confirms its connection is gone (its exclusive inbox no longer exists): heartbeats
        can be late in a busy queue, and moving a key a live worker still consumes would
        give it two consumers."""
        book = self._book
        for worker in book.silent_workers(time.monotonic() - self._settings.worker_timeout):
            async with fresh_channel(self._connection) as probe:
                try:
                    await probe.queue_declare(
                        self._names.worker_inbox(worker.worker_id), passive=True
                    )
                except aiormq.exceptions.ChannelNotFoundEntity:
                    self._worker_gone(worker.worker_id, reason="is gone (no heartbeat)")
                    continue
                except aiormq.exceptions.ChannelAccessRefused as exc:
                    # not an answer: the worker may be gone, and its keys wait until a
                    # heartbeat or the broker's event says so
                    inbox = f"queue {self._names.worker_inbox(worker.worker_id)!r}"
                    log.error("%s", passive_declare_refusal(inbox, exc))
                except CHANNEL_ERRORS:
                    pass  # RESOURCE_LOCKED: its connection is alive
                except ValueError as exc:  # an id no queue can have (the protocol checks)
                    self._dropped(f"worker {worker.worker_id[:200]!r}", exc)
                    self._worker_gone(worker.worker_id, reason="has an impossible id")
                    continue
            log.warning("worker %s sends no heartbeat but is still connected", worker.worker_id)
            book.still_connected(worker.worker_id, time.monotonic())  # look again later

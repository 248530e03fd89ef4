"""The registry service: which workers live, which keys live, who consumes which key.

It is the only party that binds, unbinds and deletes key queues (see ``_topology``), which is
what lets it retire a key without losing a message: stop routing to it (unbind), wait out what
was already routed, have the owner let go, check the queue empty, then delete it.

One registry leads per namespace; the others wait. Leadership is an exclusive queue: the
broker gives it to one connection and frees it the moment that connection dies.

State lives in memory and is rebuilt from the workers (each reports the keys it consumes)
when a registry starts leading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from . import _assignment
from ._amqp import CHANNEL_ERRORS, ChannelPool, TaskSet, open_channel, sleep_unless
from ._connection import keep_connected
from ._control import control_message, declare_registry_queue
from ._errors import BrokerUnavailableError, InvalidKeyError, ProtocolError, RabbitkeysError
from ._lifecycle import Background
from ._management import list_bindings, list_queues
from ._metrics import RegistryMetrics
from ._protocol import (
    REFUSED_QUOTA_EXCEEDED,
    Assign,
    ControlMessage,
    Ensured,
    EnsureKey,
    KeyAssignment,
    Refused,
    Release,
    Released,
    Status,
    StatusRequest,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
    WorkerStatus,
    decode,
    split,
)
from ._settings import Settings, load_settings
from ._topology import KeyRef, Names, key_queue_arguments, new_routing_key

__all__ = ["Registry"]

log = logging.getLogger("rabbitkeys.registry")

_EVENT_EXCHANGE = "amq.rabbitmq.event"

# How often the leader compares its keys with the broker's key queues (management API).
_RECONCILE_INTERVAL = 60.0

# How long retirement waits for the owner to settle its in-flight message and let go.
_RELEASE_WAIT = 60.0
# How often the leader reads the key queues' depths for the backlog metric.
_BACKLOG_INTERVAL = 15.0


@dataclass(eq=False)
class _Worker:
    worker_id: str
    job_types: frozenset[str]
    last_seen: float
    keys: set[str] = field(default_factory=set)
    #: deliveries it holds that no handler has started (from its last heartbeat)
    waiting: int = 0


@dataclass(eq=False)
class _Key:
    ref: KeyRef
    queue: str
    #: routing keys bound to the queue now; the newest is what publishers are told
    routing_keys: list[str] = field(default_factory=list)
    #: the worker consuming the key (or, during a handoff, still settling it)
    owner: str | None = None
    #: during a handoff: the worker that gets the key once the owner reports it released
    target: str | None = None
    handing_off: bool = False
    #: held while the key's queue is declared, bound, or retired
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_lease_renewal: float = field(default_factory=time.monotonic)
    #: when a move (not a retirement) asked the owner to release the key
    move_started: float | None = None

    @property
    def routing_key(self) -> str | None:
        return self.routing_keys[-1] if self.routing_keys else None

    def assignment(self) -> KeyAssignment:
        return KeyAssignment(
            key_id=self.ref.id,
            job_type=self.ref.job_type,
            key=self.ref.key,
            queue=self.queue,
            routing_key=self.routing_key,
        )


class _KeyTable(dict[str, _Key]):
    """The live keys by id, counting their job types as keys come and go (the job-type
    quota is checked on every new key: it must not walk 50,000 keys each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.job_types: Counter[str] = Counter()

    def __setitem__(self, key_id: str, key: _Key) -> None:
        old = self.get(key_id)
        if old is not None:
            self._uncount(old)
        super().__setitem__(key_id, key)
        self.job_types[key.ref.job_type] += 1

    def __delitem__(self, key_id: str) -> None:
        self._uncount(self[key_id])
        super().__delitem__(key_id)

    def pop(self, key_id: str, *default: Any) -> Any:
        if key_id in self:
            self._uncount(self[key_id])
        return super().pop(key_id, *default)

    def clear(self) -> None:
        super().clear()
        self.job_types.clear()

    def _uncount(self, key: _Key) -> None:
        self.job_types[key.ref.job_type] -= 1
        if self.job_types[key.ref.job_type] <= 0:
            del self.job_types[key.ref.job_type]

    # Mutators that bypass __setitem__/__delitem__ would break the count.
    def setdefault(self, *_: Any) -> Any:
        raise NotImplementedError

    def update(self, *_: Any, **__: Any) -> None:
        raise NotImplementedError

    def popitem(self) -> Any:
        raise NotImplementedError


class Registry(Background):
    """Leads (or stands by) for a namespace: ``async with Registry():`` in the background, or
    ``await Registry().run()`` until ``stop()`` (see :mod:`._lifecycle`).

    ``Registry()`` reads its settings from the ``RABBITKEYS_*`` environment; pass a
    :class:`Settings` to choose them in code. Metrics go to ``metrics_registry`` (default:
    prometheus_client's global registry).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        settings = settings if settings is not None else load_settings()
        self.settings = settings
        self.registry_id = uuid.uuid4().hex[:12]
        self.names = Names(settings.namespace)
        self._workers: dict[str, _Worker] = {}
        self._keys = _KeyTable()
        self._declared_exchanges: set[str] = set()
        self._stopping = asyncio.Event()
        self._leading = asyncio.Event()
        self._rebalance_wanted = asyncio.Event()
        self._tasks = TaskSet(log, "registry task")
        self._connection: AbstractConnection | None = None
        self._control: AbstractChannel | None = None
        self._pool: ChannelPool | None = None
        self._probes: ChannelPool | None = None
        self.malformed_messages = 0
        self.keys_retired = 0
        #: last sign of life of each worker lost since the last rebalance (failover gap)
        self._lost_workers_seen: list[float] = []
        self._backlog_messages = 0
        self._key_queue_count = 0
        self._connected = False
        self.metrics = RegistryMetrics(self, metrics_registry)

    def gauge_values(self) -> dict[str, float]:
        """For the metrics: read at scrape time. Only the leader's view counts."""
        if not self.is_leader:
            return {"rabbitkeys_leader": 0}
        return {
            "rabbitkeys_leader": 1,
            "rabbitkeys_live_keys": len(self._keys),
            "rabbitkeys_unassigned_keys": sum(1 for k in self._keys.values() if k.owner is None),
            "rabbitkeys_live_workers": len(self._workers),
            "rabbitkeys_backlog_messages": self._backlog_messages,
            "rabbitkeys_key_queues": self._key_queue_count,
        }

    @property
    def ready(self) -> bool:
        """Connected to the broker, leading or standing by: the readiness probe."""
        return self._connected and not self._stopping.is_set()

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def stop(self) -> None:
        self._stopping.set()

    async def wait_leading(self) -> None:
        await self._leading.wait()

    async def run(self) -> None:
        """Lead (or stand by) until ``stop()``; survive broker restarts by starting over."""
        await keep_connected(
            self.settings, f"registry {self.registry_id}", self._session, self._stopping, log
        )

    async def _session(self, connection: AbstractConnection) -> None:
        # Each connection starts from nothing: state is rebuilt from the workers.
        self._workers.clear()
        self._keys.clear()
        self._declared_exchanges.clear()
        self._leading.clear()
        self._connection = connection
        self._connected = True
        try:
            await self._run_connected(connection)
        finally:
            self._connected = False
            self._leading.clear()
            running = list(self._tasks)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _run_connected(self, connection: AbstractConnection) -> None:
        self._control = await connection.channel()
        await self._take_leadership(connection)
        if self._stopping.is_set():
            return
        self._pool = ChannelPool(connection, size=8)
        # passive declares (leases, backlog) fail with NOT_FOUND now and then: their own
        # channels, so that never fails a declare or bind of an ensure
        self._probes = ChannelPool(connection, size=2)
        await declare_registry_queue(self._control, self.names)
        await self._control.declare_exchange(
            self.names.workers_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await self._control.declare_queue(self.names.dead_letter_queue, durable=True)
        # Generous: answers can wait on a key's lock (a retirement), and heartbeats must not
        # starve behind them. Control messages are small.
        await self._control.set_qos(prefetch_count=10_000)
        queue = await self._control.get_queue(self.names.registry_queue, ensure=False)
        await queue.consume(self._on_control_message)
        await self._watch_worker_inboxes(connection)
        log.info("registry %s leads namespace %r", self.registry_id, self.names.namespace)
        self._leading.set()
        self.metrics.leadership_acquired.inc()
        # Workers that survived a registry restart tell us what they consume; the broker
        # tells us the rest.
        await self._broadcast(Sync())
        self._tasks.spawn(self._rebuild_from_broker())
        self._tasks.spawn(self._rebalance_loop())
        self._tasks.spawn(self._poll_backlog())
        while not self._stopping.is_set():
            await sleep_unless(self._stopping, self.settings.heartbeat_interval)
            if connection.is_closed:
                raise aiormq.exceptions.AMQPConnectionError("connection closed")
            await self._drop_silent_workers()
            await self._renew_unowned_leases()

    async def _take_leadership(self, connection: AbstractConnection) -> None:
        """Hold the namespace's leader lock: an exclusive queue only one connection can have."""
        lock_name = f"{self.names.namespace}.registry.leader"
        waiting_logged = False
        while not self._stopping.is_set():
            channel = await open_channel(connection)  # closed by RESOURCE_LOCKED
            try:
                await channel.declare_queue(lock_name, exclusive=True, auto_delete=True)
                return
            except aiormq.exceptions.ChannelLockedResource:
                if not waiting_logged:
                    log.info("registry %s is standby: another registry leads", self.registry_id)
                    waiting_logged = True
            await sleep_unless(self._stopping, 1.0)

    async def _watch_worker_inboxes(self, connection: AbstractConnection) -> None:
        """A worker's inbox is exclusive: the broker deletes it the moment the worker's
        connection dies. With the event exchange plugin, that deletion tells us at once
        (a kill -9 is noticed in milliseconds, not after ``worker_timeout``).

        The plugin publishes the events of every vhost into ``amq.rabbitmq.event`` of one
        vhost (``event_exchange.vhost``, default ``/``; docs/design.md, "Virtual hosts"):
        in any other vhost the exchange does not exist and only heartbeats tell."""
        channel = await open_channel(connection)  # closed by NOT_FOUND: a number of its own
        try:
            await channel.declare_exchange(_EVENT_EXCHANGE, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            log.warning(
                "no %s exchange in vhost %r (the rabbitmq_event_exchange plugin is off, or "
                "publishes into another vhost: event_exchange.vhost in rabbitmq.conf): a "
                "crashed worker is noticed after worker_timeout (%gs) without heartbeat",
                _EVENT_EXCHANGE,
                self.settings.vhost,
                self.settings.worker_timeout,
            )
            return
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind(_EVENT_EXCHANGE, routing_key="queue.deleted")
        await events.consume(self._on_queue_deleted, no_ack=True)

    async def _on_queue_deleted(self, event: AbstractIncomingMessage) -> None:
        try:
            headers = event.headers or {}
            name, vhost = (_text(headers.get(field)) for field in ("name", "vhost"))
            if vhost is not None and vhost != self.settings.vhost:
                return  # the same names in another vhost are other workers
            prefix = self.names.worker_inbox("")
            if name is not None and name.startswith(prefix):
                self._remove_worker(name[len(prefix) :], reason="disconnected")
        except Exception as exc:
            self._dropped("a queue.deleted event", exc)

    # --- control messages -------------------------------------------------------------

    def _dropped(self, what: str, error: BaseException) -> None:
        """Count, log and drop what remote input broke; the registry carries on."""
        self.malformed_messages += 1
        self.metrics.malformed.inc()
        if isinstance(error, ProtocolError | InvalidKeyError):
            log.warning("dropped %s: %s", what, error)
        else:  # not a parse error: show where it failed
            log.warning("dropped %s: %r", what, error, exc_info=error)

    async def _on_control_message(self, message: AbstractIncomingMessage) -> None:
        """Every control request. Nothing a request holds may end the session: whatever it
        breaks is counted as malformed, logged and dropped (see ``_protocol`` for limits)."""
        try:
            request = decode(message.body)
        except ProtocolError as exc:
            self._dropped("a control message", exc)
            # Its sender may wait for an answer: tell it why rather than let it time out
            # (counted once: a bad reply_to is not counted again here).
            if self.names.is_reply_queue(message.reply_to or ""):
                await self._reply(message, Refused(reason=_reason(exc)))
            await self._ack(message)
            return
        if isinstance(request, EnsureKey | StatusRequest):
            # Answered in their own task: an ensure may wait for a declare or a retirement.
            self._tasks.spawn(self._answer(message, request))
            return
        try:
            self._handle_membership(request)
        except Exception as exc:
            self._dropped(f"a {request.type} message", exc)
        finally:
            await self._ack(message)

    def _handle_membership(self, request: ControlMessage) -> None:
        if isinstance(request, WorkerJoin):
            self._on_join(request)
        elif isinstance(request, WorkerHeartbeat):
            self._on_heartbeat(request)
        elif isinstance(request, WorkerLeave):
            self._remove_worker(request.worker_id, reason="left")
        elif isinstance(request, Released):
            self._on_released(request)
        else:
            raise ProtocolError(f"a {request.type!r} message is not a request")

    async def _answer(self, message: AbstractIncomingMessage, request: ControlMessage) -> None:
        reply: Ensured | Refused | Status
        try:
            if isinstance(request, EnsureKey):
                reply = await self._ensure(request)
            else:
                assert isinstance(request, StatusRequest)
                reply = await self._status(request.backlog)
        except Exception as exc:
            log.exception("failed to answer %s", request.type)
            reply = Refused(reason=_reason(exc))
        if isinstance(reply, Refused) and reply.code == REFUSED_QUOTA_EXCEEDED:
            self.metrics.quota_refusals.inc()
        await self._reply(message, reply)
        await self._ack(message)

    async def _reply(
        self, message: AbstractIncomingMessage, reply: Ensured | Refused | Status
    ) -> None:
        """Answer to the request's ``reply_to``, only if it is a reply queue of this
        namespace: a request must not make the registry write anywhere else."""
        reply_to = message.reply_to
        if not reply_to or self._control is None:
            return
        if not self.names.is_reply_queue(reply_to):
            self._dropped(
                "a reply", ProtocolError(f"reply_to {reply_to[:300]!r} is not a reply queue")
            )
            return
        try:
            await self._control.default_exchange.publish(
                control_message(reply, correlation_id=message.correlation_id),
                routing_key=reply_to,
            )
        except CHANNEL_ERRORS:
            raise  # the control channel is gone: the session ends, as it must
        except Exception as exc:  # e.g. a correlation_id pamqp cannot encode
            self._dropped("a reply", exc)

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(*CHANNEL_ERRORS):  # the channel is gone: so is the session
            await message.ack()

    # --- keys ---------------------------------------------------------------------------

    async def _ensure(self, request: EnsureKey) -> Ensured | Refused:
        try:
            ref = KeyRef.of(request.key, request.job_type)
        except InvalidKeyError as exc:
            return Refused(reason=str(exc))
        key = self._keys.get(ref.id)
        if key is None:
            if (refused := self._beyond_quota(ref)) is not None:
                return refused
            key = self._keys[ref.id] = _Key(ref, self.names.key_queue(ref))
        async with key.lock:
            if self._keys.get(ref.id) is not key:  # retired while we waited: start over
                return await self._ensure(request)
            current = key.routing_key
            if current is not None and current != request.stale_routing_key:
                return Ensured(routing_key=current)
            if current is not None:
                # A message came back on the newest binding: the queue was deleted under us
                # (x-expires or an operator). Its bindings went with it.
                log.warning("key %s lost its queue; declaring it again", ref.id)
                key.routing_keys.clear()
            try:
                await self._declare_and_bind(key)
            except Exception as exc:
                return self._declare_failed(key, exc)
            if key.owner is None or key.owner not in self._workers:
                self._place(key)
            elif current is not None:
                # the queue was recreated: its old consumer was cancelled by the broker
                self._send(key.owner, Assign(keys=[key.assignment()]))
            return Ensured(routing_key=key.routing_keys[-1])

    def _beyond_quota(self, ref: KeyRef) -> Refused | None:
        """Refuse a new key once the namespace holds ``max_keys`` live keys, or if it would
        bring a job type beyond ``max_job_types``. A key being retired counts until its
        queue is gone; keys adopted from workers or the broker are never refused (their
        queues exist), so a lowered limit is reached again as keys retire."""
        limits = self.settings
        if len(self._keys) >= limits.max_keys:
            reason = (
                f"namespace {self.names.namespace!r} holds {len(self._keys):,} live keys, its "
                f"limit (RABBITKEYS_MAX_KEYS={limits.max_keys:,}); a key frees its place when "
                "it is retired, after RABBITKEYS_IDLE_PERIOD without traffic"
            )
        elif (
            ref.job_type not in self._keys.job_types
            and len(self._keys.job_types) >= limits.max_job_types
        ):
            reason = (
                f"namespace {self.names.namespace!r} has live keys of "
                f"{len(self._keys.job_types):,} job types, its limit "
                f"(RABBITKEYS_MAX_JOB_TYPES={limits.max_job_types:,}); job type "
                f"{ref.job_type!r} would be one more"
            )
        else:
            return None
        return Refused(reason=reason, code=REFUSED_QUOTA_EXCEEDED)

    def _declare_failed(self, key: _Key, error: Exception) -> Refused:
        """A declare or bind failed (the broker refused it, say the vhost's queue limit, or
        the client library refused a name): a key that nothing routes to is forgotten, so
        that no worker is told to consume a queue that may not exist."""
        log.warning("cannot declare or bind the queue of key %s: %r", key.ref.id, error)
        if not key.routing_keys and self._keys.get(key.ref.id) is key:
            self._set_owner(key, None)
            key.handing_off, key.target, key.move_started = False, None, None
            del self._keys[key.ref.id]
        if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed) and (
            "queue limit in vhost" in str(error)
        ):
            # the broker's own queue limit (the vhost's max-queues) is a quota like ours
            detail = str(error).rpartition("PRECONDITION_FAILED - ")[2].rstrip('"')
            return Refused(
                reason=f"the broker refused another queue ({detail}): the vhost's max-queues limit"[
                    :1000
                ],
                code=REFUSED_QUOTA_EXCEEDED,
            )
        if isinstance(error, RabbitkeysError):
            reason = str(error)
        elif isinstance(error, aiormq.exceptions.AMQPError):
            reason = f"the broker refused it ({error})"
        else:
            reason = f"{type(error).__name__}: {error}"
        return Refused(reason=f"cannot declare or bind the key's queue: {reason}"[:1000])

    async def _declare_and_bind(self, key: _Key) -> None:
        assert self._pool is not None
        exchange = self.names.jobs_exchange(key.ref.job_type)
        channel = await self._pool.get()
        if exchange not in self._declared_exchanges:
            await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
            self._declared_exchanges.add(exchange)
        await channel.queue_declare(
            key.queue,
            durable=self.settings.durable,
            arguments=key_queue_arguments(self.settings.key_queue_expires),
        )
        routing_key = new_routing_key(key.ref)
        await channel.queue_bind(key.queue, exchange, routing_key=routing_key)
        key.routing_keys.append(routing_key)
        key.last_lease_renewal = time.monotonic()
        self.metrics.keys_created.inc()

    def _place(self, key: _Key) -> None:
        """Give a new or orphaned key to a worker, without moving any other key."""
        eligible = [w for w, s in self._workers.items() if key.ref.job_type in s.job_types]
        loads = {w: len(self._workers[w].keys) for w in eligible}
        owner = _assignment.pick(key.ref.id, eligible, loads, sum(loads.values()) + 1)
        self._set_owner(key, owner)
        if owner is not None:
            self._send(owner, Assign(keys=[key.assignment()]))

    def _set_owner(self, key: _Key, owner: str | None) -> None:
        if key.owner is not None and key.owner in self._workers:
            self._workers[key.owner].keys.discard(key.ref.id)
        key.owner = owner
        if owner is not None:
            self._workers[owner].keys.add(key.ref.id)

    async def _retire(self, key_id: str, reporter: str) -> None:
        """Delete an idle key's queue with nothing lost, or keep it if anything is left."""
        assert self._pool is not None
        key = self._keys.get(key_id)
        if key is None or key.lock.locked() or key.handing_off or key.owner != reporter:
            return
        try:
            async with key.lock:
                await self._retire_locked(key, reporter)
        finally:
            self._rebalance_wanted.set()  # whatever happened, the key gets a home

    async def _retire_locked(self, key: _Key, reporter: str) -> None:
        assert self._pool is not None
        exchange = self.names.jobs_exchange(key.ref.job_type)
        channel = await self._pool.get()
        # 1. stop routing: from here on, publishes come back to their publisher
        for routing_key in list(key.routing_keys):
            await channel.queue_unbind(key.queue, exchange, routing_key=routing_key)
            key.routing_keys.remove(routing_key)
        # 2. messages routed before the unbind may still be on their way into the queue
        await asyncio.sleep(self.settings.retire_grace)
        # 3. the owner settles what it holds (acks what it handled, requeues the rest) and
        #    reports the key released; only then do the queue's counts tell the truth
        key.handing_off, key.target = True, None
        self._send(reporter, Release(key_ids=[key.ref.id]))
        if not await self._wait_released(key, reporter):
            # A long handler: leave the handoff open; its Released places the key.
            log.info("key %s: owner still busy after %gs; not retired", key.ref.id, _RELEASE_WAIT)
            return
        # 4. delete only an empty, unconsumed queue; the broker checks both atomically
        async with self._fresh_channel() as probe:
            try:
                ok = await probe.queue_declare(key.queue, passive=True)
                if not ok.message_count and not ok.consumer_count:
                    await probe.queue_delete(key.queue, if_empty=True, if_unused=True)
                    self._forget(key)
                    return
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._forget(key)  # deleted meanwhile (x-expires, an operator)
                return
            except CHANNEL_ERRORS as exc:
                log.info("kept key %s: %s", key.ref.id, exc)
        # Something arrived meanwhile: keep the key, consumed and unbound. The next
        # publish comes back, and its ensure binds the key again behind these messages.
        self._place(key)

    def _forget(self, key: _Key) -> None:
        key.handing_off = False
        self._set_owner(key, None)
        del self._keys[key.ref.id]
        self.keys_retired += 1
        self.metrics.keys_retired.inc()

    async def _wait_released(self, key: _Key, reporter: str) -> bool:
        """Wait until the owner has reported the key released (or died)."""
        deadline = time.monotonic() + _RELEASE_WAIT
        while key.owner == reporter:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    @contextlib.asynccontextmanager
    async def _fresh_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A channel of its own, for calls whose error must not fail anyone else's."""
        assert self._connection is not None
        # the broker closes it on NOT_FOUND / RESOURCE_LOCKED: a number of its own
        channel = await open_channel(self._connection)
        try:
            yield await channel.get_underlay_channel()
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*CHANNEL_ERRORS):
                    await channel.close()

    async def _renew_unowned_leases(self) -> None:
        """A key queue without consumer expires with its messages (x-expires): while no
        worker can take a key, renew its lease with a passive declare."""
        assert self._probes is not None
        now = time.monotonic()
        period = self.settings.key_queue_expires / 3
        for key in list(self._keys.values()):
            if key.owner is None and now - key.last_lease_renewal > period:
                try:
                    await (await self._probes.get()).queue_declare(key.queue, passive=True)
                    key.last_lease_renewal = now
                except aiormq.exceptions.ChannelNotFoundEntity:
                    # Retired meanwhile (the awaits above let a retirement finish), or
                    # really lost: only the latter is news, and only then is it ours to drop.
                    if self._keys.get(key.ref.id) is key and not key.lock.locked():
                        log.error("unowned key %s lost its queue (expired or deleted)", key.ref.id)
                        self._set_owner(key, None)
                        del self._keys[key.ref.id]

    # --- workers ------------------------------------------------------------------------

    def _on_join(self, join: WorkerJoin) -> None:
        worker = self._workers.get(join.worker_id)
        if worker is None:
            worker = self._workers[join.worker_id] = _Worker(
                join.worker_id,
                frozenset(join.job_types),
                time.monotonic(),
            )
            log.info("worker %s joined (%s)", join.worker_id, ", ".join(sorted(join.job_types)))
        worker.last_seen = time.monotonic()
        for reported in join.keys:
            self._adopt(worker, reported)
        self._rebalance_wanted.set()

    def _adopt(self, worker: _Worker, reported: KeyAssignment) -> None:
        """A worker says it consumes a key (after a registry restart): rebuild it."""
        ref = self._ref_of(reported)
        if ref is None:
            return
        key = self._keys.get(ref.id) or self._adopt_key(ref, reported.routing_key)
        if key.owner is None or key.owner not in self._workers:
            self._set_owner(key, worker.worker_id)
        elif key.owner != worker.worker_id:
            self._send(worker.worker_id, Release(key_ids=[ref.id]))

    def _ref_of(self, assignment: KeyAssignment) -> KeyRef | None:
        """The key of an assignment a worker sent back, named after its queue."""
        ref = self.names.key_of_report(assignment.queue, assignment.key_id, assignment.key)
        if ref is None:
            self._dropped(
                "a report about a key",
                ProtocolError(f"queue {assignment.queue!r} is not key {assignment.key_id!r}'s"),
            )
        return ref

    async def _rebuild_from_broker(self) -> None:
        """Adopt key queues nobody consumes, and learn every key's bindings, from the
        broker itself: once workers had a moment to answer ``Sync``, then every
        ``_RECONCILE_INTERVAL`` as a safety net for keys that fell between the cracks."""
        await asyncio.sleep(2 * self.settings.heartbeat_interval)
        failures = 0
        while True:
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
            # right after a broker restart its statistics are incomplete: retry soon
            await asyncio.sleep(_RECONCILE_INTERVAL if complete else min(30.0, failures))

    async def _adopt_from_broker(self) -> bool:
        found = await list_queues(self.settings, self.names.key_queue_prefix)
        if any(queue.consumers is None for queue in found):
            return False
        refs = {q.name: ref for q in found if (ref := self.names.key_of_queue(q.name))}
        bindings: dict[str, list[str]] = defaultdict(list)
        for job_type in {ref.job_type for ref in refs.values()}:
            try:
                exchange = self.names.jobs_exchange(job_type)
            except InvalidKeyError:  # a queue rabbitkeys cannot have made: not a key's
                refs = {name: ref for name, ref in refs.items() if ref.job_type != job_type}
                continue
            for bound_queue, routing_key in await list_bindings(self.settings, exchange):
                bindings[bound_queue].append(routing_key)
        adopted = 0
        for queue in found:
            ref = refs.get(queue.name)
            if ref is None:
                continue
            key = self._keys.get(ref.id)
            if key is None:
                if queue.consumers:
                    continue  # a worker consumes it; it reports it on its next join
                key = self._adopt_key(ref, None)
                adopted += 1
            if not key.lock.locked():
                # Merge, never replace: a binding made after the listing must not be
                # forgotten, or a retirement would delete a queue that still routes.
                listed = [rk for rk in bindings.get(queue.name, []) if rk not in key.routing_keys]
                key.routing_keys[:0] = listed
        if adopted:
            log.info("adopted %d unconsumed keys from the broker", adopted)
            self._rebalance_wanted.set()
        return True

    def _adopt_key(self, ref: KeyRef, routing_key: str | None) -> _Key:
        key = self._keys[ref.id] = _Key(ref, self.names.key_queue(ref))
        if routing_key:
            key.routing_keys.append(routing_key)
        return key

    def _on_heartbeat(self, beat: WorkerHeartbeat) -> None:
        worker = self._workers.get(beat.worker_id)
        if worker is None:
            # We do not know it (we started after it joined): ask it to join again.
            self._send(beat.worker_id, Sync())
            return
        worker.last_seen = time.monotonic()
        worker.waiting = beat.waiting
        for key_id in beat.idle_keys:
            self._tasks.spawn(self._retire(key_id, beat.worker_id))

    def _on_released(self, released: Released) -> None:
        """The owner has settled these keys and no longer consumes them: hand them on."""
        for assignment in released.keys:
            ref = self._ref_of(assignment)
            if ref is None:
                continue
            key = self._keys.get(ref.id)
            if key is None:
                # Released to a registry that led before us: adopt the key, or it would sit
                # unconsumed until its queue expires.
                key = self._adopt_key(ref, assignment.routing_key)
                key.owner = released.worker_id
            if key.owner != released.worker_id:
                continue  # stale: the key moved or retired meanwhile
            target = key.target if key.handing_off else None
            key.handing_off, key.target = False, None
            if key.move_started is not None:
                self.metrics.handoff_duration.observe(time.monotonic() - key.move_started)
                key.move_started = None
            self._set_owner(key, None)
            if key.lock.locked():
                continue  # a retirement in progress decides where it goes
            if target is not None and target in self._workers:
                self._set_owner(key, target)
                self._send(target, Assign(keys=[key.assignment()]))
            else:
                self._place(key)

    def _remove_worker(self, worker_id: str, *, reason: str) -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        log.info("worker %s %s; its %d keys move", worker_id, reason, len(worker.keys))
        if reason != "left" and worker.keys:
            self._lost_workers_seen.append(worker.last_seen)
        # Its connection is gone (or it let go of every key before leaving), so nothing
        # consumes its keys any more: they can go to other workers at once.
        for key_id in worker.keys:
            key = self._keys.get(key_id)
            if key is not None:
                key.owner = None
                key.handing_off, key.target = False, None
                key.move_started = None
        self._rebalance_wanted.set()

    async def _drop_silent_workers(self) -> None:
        """A worker without heartbeat for ``worker_timeout`` is dropped only once the broker
        confirms its connection is gone (its exclusive inbox no longer exists): heartbeats
        can be late in a busy queue, and moving a key a live worker still consumes would
        give it two consumers."""
        limit = time.monotonic() - self.settings.worker_timeout
        for worker in list(self._workers.values()):
            if worker.last_seen >= limit:
                continue
            async with self._fresh_channel() as probe:
                try:
                    await probe.queue_declare(
                        self.names.worker_inbox(worker.worker_id), passive=True
                    )
                except aiormq.exceptions.ChannelNotFoundEntity:
                    self._remove_worker(worker.worker_id, reason="is gone (no heartbeat)")
                    continue
                except CHANNEL_ERRORS:
                    pass  # RESOURCE_LOCKED: its connection is alive
                except ValueError as exc:  # an id no queue can have (the protocol checks)
                    self._dropped(f"worker {worker.worker_id[:200]!r}", exc)
                    self._remove_worker(worker.worker_id, reason="has an impossible id")
                    continue
            log.warning("worker %s sends no heartbeat but is still connected", worker.worker_id)
            worker.last_seen = time.monotonic()  # look again after another worker_timeout

    async def _rebalance_loop(self) -> None:
        while True:
            await self._rebalance_wanted.wait()
            # Joins come in bursts (a scaled deployment): settle them in one rebalance.
            await asyncio.sleep(0.2)
            self._rebalance_wanted.clear()
            try:
                self._rebalance()
            except Exception:  # a bug; the next event tries again, the registry stays up
                log.exception("rebalance failed")

    def _rebalance(self) -> None:
        """Spread keys over the workers again. A key that moves is first released by its
        owner, which settles what it holds and reports it released; only then is it
        assigned to the new owner (see ``_on_released``). Never two consumers at once."""
        by_type: dict[str, list[_Key]] = defaultdict(list)
        for key in self._keys.values():
            if not key.lock.locked():  # keys being declared or retired are placed afterwards
                by_type[key.ref.job_type].append(key)
        assigns: dict[str, list[KeyAssignment]] = defaultdict(list)
        releases: dict[str, list[str]] = defaultdict(list)
        moved = 0
        for job_type, keys in by_type.items():
            eligible = [w for w, s in self._workers.items() if job_type in s.job_types]
            desired = _assignment.assign((k.ref.id for k in keys), eligible)
            for key in keys:
                new_owner = desired.get(key.ref.id)
                if key.handing_off:
                    key.target = new_owner
                elif new_owner == key.owner:
                    continue
                elif key.owner is None:
                    self._set_owner(key, new_owner)
                    if new_owner is not None:
                        assigns[new_owner].append(key.assignment())
                else:
                    key.handing_off, key.target = True, new_owner
                    key.move_started = time.monotonic()
                    releases[key.owner].append(key.ref.id)
                    moved += 1
        for worker_id, key_ids in releases.items():
            for release in split(key_ids, lambda chunk: Release(key_ids=chunk)):
                self._send(worker_id, release)
        for worker_id, assignments in assigns.items():
            for assign in split(assignments, lambda chunk: Assign(keys=chunk)):
                self._send(worker_id, assign)
        if self._workers:  # with no worker left, the keys wait: the gap is not over
            now = time.monotonic()
            for last_seen in self._lost_workers_seen:
                self.metrics.failover_gap.observe(now - last_seen)
            self._lost_workers_seen.clear()
        if moved:
            self.metrics.rebalances.inc()
            self.metrics.keys_moved.inc(moved)
            log.info("rebalancing: %d keys move over %d workers", moved, len(self._workers))

    async def _poll_backlog(self) -> None:
        """Messages waiting in key queues, for the metric an autoscaler reads. One listing
        through the management API (paged), not a declare per key."""
        while True:
            started = time.monotonic()
            with contextlib.suppress(BrokerUnavailableError, KeyError, ValueError):
                found = await list_queues(self.settings, self.names.key_queue_prefix)
                self._backlog_messages = sum(queue.messages for queue in found)
                self._key_queue_count = len(found)
            # A listing of 100,000 queues takes the broker tens of seconds: keep its share
            # of the management API's time under a tenth.
            took = time.monotonic() - started
            await asyncio.sleep(max(_BACKLOG_INTERVAL, 10 * took))

    # --- sending ------------------------------------------------------------------------

    def _send(self, worker_id: str, command: Assign | Release | Sync) -> None:
        self._tasks.spawn(self._publish(self.names.worker_inbox(worker_id), command))

    async def _broadcast(self, command: Sync) -> None:
        assert self._control is not None
        exchange = await self._control.get_exchange(self.names.workers_exchange, ensure=False)
        await exchange.publish(control_message(command), routing_key="")

    async def _publish(self, routing_key: str, command: Assign | Release | Sync) -> None:
        assert self._control is not None
        await self._control.default_exchange.publish(
            control_message(command), routing_key=routing_key
        )

    # --- status -------------------------------------------------------------------------

    async def _status(self, with_backlog: bool) -> Status:
        backlog: dict[str, int] = {}
        if with_backlog:
            backlog = await self._backlog()
        now = time.monotonic()
        workers = [
            WorkerStatus(
                worker_id=w.worker_id,
                job_types=sorted(w.job_types),
                keys=len(w.keys),
                backlog=(
                    sum(backlog.get(k, 0) for k in w.keys) + w.waiting if with_backlog else None
                ),
                last_seen_seconds=round(now - w.last_seen, 3),
            )
            for w in sorted(self._workers.values(), key=lambda w: w.worker_id)
        ]
        return Status(
            namespace=self.names.namespace,
            registry_id=self.registry_id,
            workers=workers,
            keys=len(self._keys),
            unassigned_keys=sum(1 for k in self._keys.values() if k.owner is None),
            retiring_keys=sum(1 for k in self._keys.values() if k.lock.locked()),
            backlog=(
                sum(backlog.values()) + sum(w.waiting for w in self._workers.values())
                if with_backlog
                else None
            ),
        )

    async def _backlog(self) -> dict[str, int]:
        """Ready messages per key, by passive declares (a few at a time). The backlog shown
        adds what workers hold but have not started (their heartbeats say)."""
        limit = asyncio.Semaphore(32)
        counts: dict[str, int] = {}

        async def count(key: _Key) -> None:
            async with limit:
                assert self._probes is not None
                with contextlib.suppress(*CHANNEL_ERRORS):
                    ok = await (await self._probes.get()).queue_declare(key.queue, passive=True)
                    counts[key.ref.id] = int(ok.message_count or 0)

        await asyncio.gather(*(count(k) for k in list(self._keys.values())))
        return counts


def _reason(error: BaseException) -> str:
    """An error as a Refused reason (bounded)."""
    text = str(error) if isinstance(error, RabbitkeysError) else f"{type(error).__name__}: {error}"
    return text[:1000]


def _text(value: object) -> str | None:
    """A header value as text (the event exchange sends long strings as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None

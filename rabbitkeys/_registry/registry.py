"""The registry service: the I/O shell around the key book.

The registry is the only party that binds, unbinds and deletes key queues (see
``_wire.topology``), which is what lets it retire a key without losing a message. *What* to do
with a key, and when, is decided by the key book (``_registry.keybook``: a key's states, pure and
property-tested); this module runs the leading session, dispatches the control messages the
roles send to the book, answers ensures and status requests, and decides when to rebalance.
What a leadership needs (its control channel, runner, reconciler) is one object,
``_registry.session``, built when it wins the leader lock. The book's commands are
carried out over AMQP by ``_registry.runner``; leadership is ``_registry.leadership``; what is
learnt from the broker itself (adoption, backlog, leases, workers that are gone, the holds a
new leader reads back) is ``_registry.reconcile``. Operators' requests (list keys; pause,
resume, skip; redrive dead letters) come through ``NS.operations`` and are answered by
``_registry.operator_requests``, each in its own task, like ensures.

State lives in memory and is rebuilt from the workers (each reports the keys it consumes)
and from the broker when a registry starts leading.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from typing import cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from .._broker.amqp import CHANNEL_ERRORS, TaskSet, sleep_unless
from .._broker.connection import keep_connected
from .._broker.control import control_message, declare_control_topology, publish_control
from .._errors import BrokerUnavailableError, InvalidKeyError, ProtocolError
from .._lifecycle import Background
from .._observe.metrics import RegistryMetrics
from .._settings import Settings, load_settings
from .._wire.protocol import (
    REFUSED_QUOTA_EXCEEDED,
    ControlMessage,
    Ensured,
    EnsureKey,
    EnsureKeys,
    KeyAnswer,
    KeyAssignment,
    KeyParked,
    KeysEnsured,
    KeyToEnsure,
    Refused,
    Released,
    Status,
    StatusRequest,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
    decode_control,
)
from .._wire.senders import (
    OperatorRequest,
    Refusal,
    WorkerReport,
    WorkerSessions,
    check_request,
    record_drop,
)
from .._wire.topology import KeyRef, Names
from .keybook import Command, KeyBook, Parked, ReleaseKeys, SyncWorker
from .leadership import take_leadership
from .operator_requests import OperatorReply, OperatorRequests, reason_of
from .reconcile import Reconciler
from .runner import CommandRunner
from .session import NOT_LEADING, LeadingSession, NotLeading

__all__ = ["Registry"]

log = logging.getLogger("rabbitkeys.registry")

_Reply = Ensured | Refused | KeysEnsured | Status | OperatorReply

#: Seconds the answer to an ``EnsureKeys`` waits for its slowest keys (a declare, a
#: retirement to finish): the keys answered by then go back at once, in one reply, and the
#: publisher asks again for the others. Without it the keys of a burst would wait for the
#: last of them to be declared.
_ENSURE_KEYS_REPLY_WAIT = 0.1


class Registry(Background):
    """Leads (or stands by) for a namespace: ``async with Registry():`` in the background, or
    ``await Registry().run()`` until ``stop()`` (see :mod:`rabbitkeys._lifecycle`).

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
        self._book = self._new_book()
        self._stopping = asyncio.Event()
        self._leading = asyncio.Event()
        self._rebalance_wanted = asyncio.Event()
        self._tasks = TaskSet(log, "registry task")
        #: the leading session: NOT_LEADING until this registry first leads, then that of its
        #: current (or last) leadership. Not reset when a connection ends: what is still being
        #: handled then meets that session's closed channels and fails as on a lost
        #: connection, and a scrape from another thread never sees a leader without one.
        self._lead: LeadingSession | NotLeading = NOT_LEADING
        #: control messages refused, by reason (``_wire.senders.REFUSAL_REASONS``)
        self.refused: collections.Counter[str] = collections.Counter()
        #: which user and session speak for each live worker
        self._sessions = WorkerSessions(self.names)
        self.keys_retired = 0
        #: last sign of life of each worker lost since the last rebalance (failover gap)
        self._lost_workers_seen: list[float] = []
        self._connected = False
        self.metrics = RegistryMetrics(self, metrics_registry)

    def _new_book(self) -> KeyBook:
        return KeyBook(
            self.names.key_queue,
            namespace=self.names.namespace,
            max_keys=self.settings.max_keys,
            max_job_types=self.settings.max_job_types,
        )

    def gauge_values(self) -> dict[str, float]:
        """For the metrics: read at scrape time. Only the leader's view counts."""
        if not self.is_leader:
            self.metrics.set_oldest_ages({})
            return {"rabbitkeys_leader": 0}
        broker = self._lead.reconciler
        # the labelled gauge is set here too: one reading of the leader's view per scrape
        self.metrics.set_oldest_ages(broker.oldest_age_by_job_type())
        held = self._book.held_counts()
        return {
            "rabbitkeys_leader": 1,
            "rabbitkeys_parked_keys": held["parked"],
            "rabbitkeys_paused_keys": held["paused"],
            "rabbitkeys_paused_job_types": held["paused_job_types"],
            "rabbitkeys_live_keys": len(self._book.keys),
            "rabbitkeys_unassigned_keys": self._book.unassigned(),
            "rabbitkeys_unavailable_keys": self._book.unavailable(),
            "rabbitkeys_live_workers": len(self._book.workers),
            "rabbitkeys_backlog_messages": broker.backlog_messages,
            "rabbitkeys_key_queues": broker.key_queue_count,
        }

    @property
    def malformed_messages(self) -> int:
        """Control messages dropped, whatever the reason."""
        return sum(self.refused.values())

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
            self.settings, f"registry {self.registry_id}", self._on_connection, self._stopping, log
        )

    async def _on_connection(self, connection: AbstractConnection) -> None:
        # Each connection starts from nothing: state is rebuilt from the workers.
        self._book = self._new_book()
        self._sessions.clear()
        self._leading.clear()
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
        control = await connection.channel()
        await take_leadership(connection, self.names, self.registry_id, self._stopping)
        if self._stopping.is_set():
            return
        lead = self._lead = self._leading_session(connection, control)
        reconciler = lead.reconciler
        await declare_control_topology(connection, control, self.names, self.settings.queue_type)
        # The holds first: no paused or parked key may be placed once requests flow.
        self._do(await reconciler.load_holds())
        # Generous: answers can wait for a declare or a retirement, and heartbeats must not
        # starve behind them. Control messages are small.
        await control.set_qos(prefetch_count=10_000)
        queue = await control.get_queue(self.names.registry_queue, ensure=False)
        consumer_tag = await queue.consume(self._on_control_message)
        underlay = cast(aiormq.Channel, await control.get_underlay_channel())
        await reconciler.watch_worker_inboxes()
        log.info("registry %s leads namespace %r", self.registry_id, self.names.namespace)
        self._leading.set()
        self.metrics.leadership_acquired.inc()
        # Workers that survived a registry restart tell us what they consume; the broker
        # tells us the rest.
        await self._broadcast(Sync())
        self._tasks.spawn(reconciler.rebuild_from_broker())
        self._tasks.spawn(self._rebalance_loop())
        self._tasks.spawn(reconciler.poll_backlog())
        while not self._stopping.is_set():
            await sleep_unless(self._stopping, self.settings.heartbeat_interval)
            if connection.is_closed:
                raise aiormq.exceptions.AMQPConnectionError("connection closed")
            if consumer_tag not in underlay.consumers:
                # The broker cancelled our consumer: the registry queue's node is down (a
                # classic queue on a cluster). Start over; the declare waits for the node.
                raise aiormq.exceptions.AMQPConnectionError("the registry queue went away")
            await reconciler.drop_silent_workers()
            # ids heard of that never joined (or are gone) hold no pin: they are free
            self._sessions.retain(self._book.workers)
            await reconciler.renew_unowned_leases()
            await reconciler.recheck_unavailable()

    def _leading_session(
        self, connection: AbstractConnection, control: AbstractChannel
    ) -> LeadingSession:
        """The leading session on ``connection``, for this connection's book: built once
        this registry holds the leader lock."""
        runner = CommandRunner(
            self.settings,
            connection,
            control,
            self._book,
            tasks=self._tasks,
            metrics=self.metrics,
            rebalance=self._rebalance_wanted.set,
            retired=self._count_retired,
            route=self._sessions.route,
        )
        reconciler = Reconciler(
            self.settings,
            connection,
            self._book,
            worker_gone=self._remove_worker,
            dropped=self._dropped,
            adopted=self._rebalance_wanted.set,
        )
        operator_requests = OperatorRequests(self.names, self._book, runner, reconciler, connection)
        return LeadingSession(connection, control, runner, reconciler, operator_requests)

    # --- control messages -------------------------------------------------------------

    def _dropped(self, what: str, error: BaseException) -> None:
        """Count, log and drop what remote input broke or was refused; the registry carries
        on."""
        record_drop(log, self.refused, self.metrics, what, error)

    async def _on_control_message(self, message: AbstractIncomingMessage) -> None:
        """Every control request. Nothing a request holds may end the session: whatever it
        breaks is counted as malformed, logged and dropped (see ``_wire.protocol`` for limits)."""
        try:
            request = decode_control(message.body)
        except ProtocolError as exc:
            self._dropped("a control message", exc)
            # Its sender may wait for an answer: tell it why rather than let it time out
            # (counted once: a bad reply_to is not counted again here).
            if self.names.is_reply_queue(message.reply_to or ""):
                await self._reply(message, Refused(reason=reason_of(exc)))
            await self._ack(message)
            return
        speaks = True
        try:
            # the exchange it came through is the sender's role; user_id, the sender
            check_request(self.names, message.exchange or "", message.user_id, request)
            if isinstance(request, WorkerReport):
                speaks = await self._speaks_for_itself(request, message.user_id or "")
        except Refusal as refusal:
            self._dropped(f"a {request.type} message", refusal)
            await self._ack(message)
            return
        if not speaks:
            await self._ack(message)  # the worker's own, sent before it took its id over
            return
        if isinstance(request, EnsureKey | EnsureKeys | StatusRequest | OperatorRequest):
            # Answered in their own task: an ensure may wait for a declare or a retirement,
            # a skip or a redrive for the broker.
            self._tasks.spawn(self._answer(message, request))
            return
        try:
            self._handle_membership(request)
        except Exception as exc:
            self._dropped(f"a {request.type} message", exc)
        finally:
            await self._ack(message)

    async def _speaks_for_itself(self, report: WorkerReport, user_id: str) -> bool:
        """Whether to act on a worker's report. Raises :class:`Refusal` if another session
        holds the worker id and the sender does not own the worker's inbox; False for a
        report of the inbox's owner that must first take the id over (it is asked to join)."""
        if self._sessions.check(report, user_id):
            return True
        worker_id = report.worker_id
        try:
            owned = await self._lead.reconciler.owns_inbox(worker_id, report.session)
        except BrokerUnavailableError as exc:
            raise Refusal(
                "impersonation",
                f"another session holds worker {worker_id!r}; cannot ask the broker whose "
                f"its inbox is: {exc}",
            ) from None
        if not owned:
            raise Refusal(
                "impersonation",
                f"a {report.type} for worker {worker_id!r} (user {user_id!r}) from a session "
                f"that does not own its inbox",
            )
        self._sessions.take_over(report, user_id)
        if not isinstance(report, WorkerJoin):
            self._do([SyncWorker(worker_id)])  # its join says which keys it really holds
            return False
        # What the other session said about this id (the keys it claimed) goes: the join
        # reports which keys the worker really consumes.
        log.warning(
            "worker %s: its inbox's owner takes its id over from another session", worker_id
        )
        self._do(self._book.gone(worker_id))
        return True

    def _handle_membership(self, request: ControlMessage) -> None:
        now = time.monotonic()
        if isinstance(request, WorkerJoin):
            reported = self._refs_of(request.keys)
            self._do(self._book.joined(request.worker_id, request.job_types, reported, now))
        elif isinstance(request, WorkerHeartbeat):
            beat = request
            failing = [(f.key_id, f.attempts, f.error) for f in beat.failing]
            self._do(
                self._book.heartbeat(
                    beat.worker_id, beat.waiting, beat.idle_keys, now, failing=failing
                )
            )
        elif isinstance(request, KeyParked):
            self._key_parked(request, now)
        elif isinstance(request, WorkerLeave):
            self._remove_worker(request.worker_id, reason="left")
        elif isinstance(request, Released):
            released = self._refs_of(request.keys)
            self._do(self._book.released(request.worker_id, released, now))
        else:
            raise ProtocolError(f"a {request.type!r} message is not a request")

    def _key_parked(self, report: KeyParked, now: float) -> None:
        refs = self._refs_of([report.key])
        if not refs:
            return
        ((ref, routing_key),) = refs
        parked = Parked(
            error=report.error,
            attempts=report.attempts,
            job_index=report.job_index,
            worker_id=report.worker_id,
            at=int(time.time()),
        )
        log.warning(
            "key %s parked by worker %s after %d attempts: %s",
            ref.id,
            report.worker_id,
            report.attempts,
            report.error,
        )
        self._do(self._book.key_parked(report.worker_id, ref, routing_key, parked, now))

    def _refs_of(self, assignments: list[KeyAssignment]) -> list[tuple[KeyRef, str | None]]:
        """The keys of assignments a worker sent back, each named after its queue."""
        refs = []
        for assignment in assignments:
            ref = self.names.key_of_report(assignment.queue, assignment.key_id, assignment.key)
            if ref is None:
                self._dropped(
                    "a report about a key",
                    Refusal(
                        "foreign_queue",
                        f"queue {assignment.queue!r} is not key {assignment.key_id!r}'s",
                    ),
                )
            else:
                refs.append((ref, assignment.routing_key))
        return refs

    async def _answer(
        self,
        message: AbstractIncomingMessage,
        request: EnsureKey | EnsureKeys | StatusRequest | OperatorRequest,
    ) -> None:
        reply: _Reply
        try:
            if isinstance(request, EnsureKey):
                reply = await self._ensure(request)
            elif isinstance(request, EnsureKeys):
                reply = await self._ensure_keys(request)
            elif isinstance(request, StatusRequest):
                reply = await self._status(request.backlog)
            else:
                reply = await self._lead.operator_requests.answer(request)
        except Exception as exc:
            log.exception("failed to answer %s", request.type)
            reply = Refused(reason=reason_of(exc))
        if isinstance(reply, Refused) and reply.code == REFUSED_QUOTA_EXCEEDED:
            self.metrics.quota_refusals.inc()
        elif isinstance(reply, KeysEnsured):  # counted per key, as if asked one by one
            quota = sum(
                1
                for one in reply.answers
                if isinstance(one.answer, Refused) and one.answer.code == REFUSED_QUOTA_EXCEEDED
            )
            if quota:
                self.metrics.quota_refusals.inc(quota)
        await self._reply(message, reply)
        await self._ack(message)

    async def _reply(self, message: AbstractIncomingMessage, reply: _Reply) -> None:
        """Answer to the request's ``reply_to``, only if it is a reply queue of this
        namespace: a request must not make the registry write anywhere else."""
        reply_to = message.reply_to
        if not reply_to:
            return
        if not self.names.is_reply_queue(reply_to):
            self._dropped(
                "a reply",
                Refusal("bad_reply_to", f"reply_to {reply_to[:300]!r} is not a reply queue"),
            )
            return
        try:
            await publish_control(
                self._lead.control,
                self.names.replies_exchange,
                control_message(
                    reply, user_id=self.settings.amqp_user, correlation_id=message.correlation_id
                ),
                reply_to,
            )
        except aiormq.exceptions.DeliveryError as exc:
            # nacked (RabbitMQ 4.0: the reply queue's node is down; 3.10 drops it unrouted):
            # the publisher asks again
            self._dropped("a reply", exc)
        except CHANNEL_ERRORS:
            raise  # the control channel is gone: the session ends, as it must
        except Exception as exc:  # e.g. a correlation_id pamqp cannot encode
            self._dropped("a reply", exc)

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(*CHANNEL_ERRORS):  # the channel is gone: so is the session
            await message.ack()

    async def _ensure_keys(self, request: EnsureKeys) -> KeysEnsured:
        """One ensure per key, each answered as it would be alone; the reply holds those
        answered within ``_ENSURE_KEYS_REPLY_WAIT`` (the publisher asks again for the rest:
        their waiters go, the book's work for them carries on)."""
        asked = [(one, asyncio.ensure_future(self._ensure(one))) for one in request.keys]
        try:
            await asyncio.wait([task for _, task in asked], timeout=_ENSURE_KEYS_REPLY_WAIT)
        finally:
            for _, task in asked:
                task.cancel()  # no-op for those answered; the others' waiters go
        answers = []
        for one, task in asked:
            if not task.done():  # cancelled above: not answered in time
                continue
            exc = task.exception()
            if exc is not None:
                log.error("failed to ensure key %r", one.key, exc_info=exc)
            answer = task.result() if exc is None else Refused(reason=reason_of(exc))
            answers.append(KeyAnswer(job_type=one.job_type, key=one.key, answer=answer))
        return KeysEnsured(answers=answers)

    async def _ensure(self, request: EnsureKey | KeyToEnsure) -> Ensured | Refused:
        try:
            ref = KeyRef.of(request.key, request.job_type)
        except InvalidKeyError as exc:
            return Refused(reason=str(exc))
        reply = await self._lead.runner.ensure(ref, request.stale_routing_key)
        if reply.routing_key is not None:
            return Ensured(routing_key=reply.routing_key)
        if reply.code is not None:
            return Refused(reason=reply.reason or "refused", code=reply.code)
        return Refused(reason=reply.reason or "refused")

    async def _status(self, with_backlog: bool) -> Status:
        backlog = None
        if with_backlog:
            backlog = await self._lead.reconciler.backlog()
        return self._book.status(self.registry_id, backlog, time.monotonic())

    # --- membership ---------------------------------------------------------------------

    def _remove_worker(self, worker_id: str, *, reason: str) -> None:
        self._sessions.forget(worker_id)  # whoever joins as this id next is let in
        worker = self._book.workers.get(worker_id)
        if worker is None:
            return
        log.info("worker %s %s; its %d keys move", worker_id, reason, len(worker.keys))
        if reason != "left" and worker.keys:
            self._lost_workers_seen.append(worker.last_seen)
        self._do(self._book.gone(worker_id))

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
        commands = self._book.rebalance(time.monotonic())
        moved = sum(len(c.key_ids) for c in commands if isinstance(c, ReleaseKeys))
        self._do(commands)
        if self._book.workers:  # with no worker left, the keys wait: the gap is not over
            now = time.monotonic()
            for last_seen in self._lost_workers_seen:
                self.metrics.failover_gap.observe(now - last_seen)
            self._lost_workers_seen.clear()
        if moved:
            self.metrics.rebalances.inc()
            self.metrics.keys_moved.inc(moved)
            log.info("rebalancing: %d keys move over %d workers", moved, len(self._book.workers))

    def _do(self, commands: list[Command]) -> None:
        self._lead.runner.do(commands)

    def _count_retired(self) -> None:
        self.keys_retired += 1
        self.metrics.keys_retired.inc()

    # --- sending ---------------------------------------------------------------------

    async def _broadcast(self, command: Sync) -> None:
        await publish_control(
            self._lead.control,
            self.names.commands_exchange,
            control_message(command, user_id=self.settings.amqp_user),
            self.names.all_workers_route,
        )

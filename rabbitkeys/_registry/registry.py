"""The registry service: the I/O shell around the key book.

The registry is the only party that binds, unbinds and deletes key queues (see
``_wire.topology``), which is what lets it retire a key without losing a message. *What* to do
with a key, and when, is decided by the key book (``_registry.keybook``: a key's states, pure and
property-tested); this module runs the leading session, dispatches the control messages the
roles send to the book, answers ensures and status requests, and decides when to rebalance.
The book's commands are carried out over AMQP by ``_registry.runner``; leadership is
``_registry.leadership``; what is learnt from the broker itself (adoption, backlog, leases, workers
that are gone, the holds a new leader reads back) is ``_registry.reconcile``. Operators' requests
(list keys; pause, resume, skip; redrive dead letters) come through ``NS.operations`` and
are answered each in its own task, like ensures.

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
from .._errors import BrokerUnavailableError, InvalidKeyError, ProtocolError, RabbitkeysError
from .._lifecycle import Background
from .._observe.metrics import RegistryMetrics
from .._settings import Settings, load_settings
from .._wire.protocol import (
    REFUSED_QUOTA_EXCEEDED,
    ControlMessage,
    Ensured,
    EnsureKey,
    HoldReply,
    HoldRequest,
    KeyAssignment,
    KeyParked,
    KeysPage,
    KeysRequest,
    RedriveKeySummary,
    RedriveReply,
    RedriveRequest,
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
from . import keylist, redrive
from .keybook import (
    Command,
    HoldRefused,
    KeyBook,
    Parked,
    ReleaseKeys,
    SkipHead,
    SyncWorker,
)
from .leadership import take_leadership
from .reconcile import Reconciler
from .runner import CommandRunner

__all__ = ["Registry"]

log = logging.getLogger("rabbitkeys.registry")

#: How long a redrive waits for a key to be let go by its owner and rearranged before its
#: dead letters go back to the dead-letter queue (the key stays held for the redrive; its
#: rearrangement then only rotates, and a new redrive moves them)
REDRIVE_WAIT = 300.0

_Reply = Ensured | Refused | Status | KeysPage | HoldReply | RedriveReply


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
        self._control: AbstractChannel | None = None
        self._runner: CommandRunner | None = None
        self._reconciler: Reconciler | None = None
        self._connection: AbstractConnection | None = None
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
        broker = self._reconciler
        # the labelled gauge is set here too: one reading of the leader's view per scrape
        self.metrics.set_oldest_ages(broker.oldest_age_by_job_type() if broker else {})
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
            "rabbitkeys_backlog_messages": broker.backlog_messages if broker else 0,
            "rabbitkeys_key_queues": broker.key_queue_count if broker else 0,
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
            self.settings, f"registry {self.registry_id}", self._session, self._stopping, log
        )

    async def _session(self, connection: AbstractConnection) -> None:
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
        self._control = await connection.channel()
        await take_leadership(connection, self.names, self.registry_id, self._stopping)
        if self._stopping.is_set():
            return
        self._runner = CommandRunner(
            self.settings,
            connection,
            self._control,
            self._book,
            tasks=self._tasks,
            metrics=self.metrics,
            rebalance=self._rebalance_wanted.set,
            retired=self._count_retired,
            route=self._sessions.route,
        )
        reconciler = self._reconciler = Reconciler(
            self.settings,
            connection,
            self._book,
            worker_gone=self._remove_worker,
            dropped=self._dropped,
            adopted=self._rebalance_wanted.set,
        )
        await declare_control_topology(
            connection, self._control, self.names, self.settings.queue_type
        )
        self._connection = connection
        # The holds first: no paused or parked key may be placed once requests flow.
        self._do(await reconciler.load_holds())
        # Generous: answers can wait for a declare or a retirement, and heartbeats must not
        # starve behind them. Control messages are small.
        await self._control.set_qos(prefetch_count=10_000)
        queue = await self._control.get_queue(self.names.registry_queue, ensure=False)
        consumer_tag = await queue.consume(self._on_control_message)
        underlay = cast(aiormq.Channel, await self._control.get_underlay_channel())
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
                await self._reply(message, Refused(reason=_reason(exc)))
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
        if isinstance(request, EnsureKey | StatusRequest | OperatorRequest):
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
        assert self._reconciler is not None  # control messages are consumed once it exists
        try:
            owned = await self._reconciler.owns_inbox(worker_id, report.session)
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

    async def _answer(self, message: AbstractIncomingMessage, request: ControlMessage) -> None:
        reply: _Reply
        try:
            if isinstance(request, EnsureKey):
                reply = await self._ensure(request)
            elif isinstance(request, KeysRequest):
                reply = self._keys(request)
            elif isinstance(request, HoldRequest):
                reply = await self._hold(request)
            elif isinstance(request, RedriveRequest):
                reply = await self._redrive_request(request)
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

    async def _reply(self, message: AbstractIncomingMessage, reply: _Reply) -> None:
        """Answer to the request's ``reply_to``, only if it is a reply queue of this
        namespace: a request must not make the registry write anywhere else."""
        reply_to = message.reply_to
        if not reply_to or self._control is None:
            return
        if not self.names.is_reply_queue(reply_to):
            self._dropped(
                "a reply",
                Refusal("bad_reply_to", f"reply_to {reply_to[:300]!r} is not a reply queue"),
            )
            return
        try:
            await publish_control(
                self._control,
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

    async def _ensure(self, request: EnsureKey) -> Ensured | Refused:
        try:
            ref = KeyRef.of(request.key, request.job_type)
        except InvalidKeyError as exc:
            return Refused(reason=str(exc))
        assert self._runner is not None
        reply = await self._runner.ensure(ref, request.stale_routing_key)
        if reply.routing_key is not None:
            return Ensured(routing_key=reply.routing_key)
        if reply.code is not None:
            return Refused(reason=reply.reason or "refused", code=reply.code)
        return Refused(reason=reply.reason or "refused")

    async def _status(self, with_backlog: bool) -> Status:
        backlog = None
        if with_backlog and self._reconciler is not None:
            backlog = await self._reconciler.backlog()
        return self._book.status(self.registry_id, backlog, time.monotonic())

    # --- operators ------------------------------------------------------------------------

    def _keys(self, request: KeysRequest) -> KeysPage:
        broker = self._reconciler
        listed_at = broker.listed_at if broker is not None else None
        stats = broker.queue_stats if broker is not None and listed_at is not None else None
        return keylist.page(self._book, request, stats, listed_at, time.monotonic(), time.time())

    async def _hold(self, request: HoldRequest) -> HoldReply:
        """Pause or resume a key or a job type; skip a parked key's head (answered once the
        head is dead-lettered, or why not)."""
        what = f"job type {request.job_type!r}"
        try:
            ref = None if request.key is None else KeyRef.of(request.key, request.job_type)
            if ref is not None:
                what = f"key {request.key!r} of {what}"
            if request.action == "skip":
                if ref is None:
                    return HoldReply(ok=False, detail="skip needs a key")
                return await self._skip(ref, what)
            if request.action == "pause":
                commands = (
                    self._book.pause_type(request.job_type)
                    if ref is None
                    else (self._book.pause(ref))
                )
            else:
                commands = (
                    self._book.resume_type(request.job_type)
                    if ref is None
                    else (self._book.resume(ref))
                )
        except (HoldRefused, InvalidKeyError) as exc:
            return HoldReply(ok=False, detail=str(exc)[:1000])
        self._do(commands)
        done = "paused" if request.action == "pause" else "resumed"
        log.info("operator: %s %s", what, done)
        return HoldReply(ok=True, detail=f"{what} {done}"[:1000])

    async def _skip(self, ref: KeyRef, what: str) -> HoldReply:
        assert self._runner is not None
        outcome = self._runner.expect_skip(ref.id)
        try:
            commands = self._book.skip(ref)
        except HoldRefused as exc:
            outcome.cancel()
            return HoldReply(ok=False, detail=str(exc)[:1000])
        self._do(commands)
        if not any(isinstance(c, SkipHead) and c.key_id == ref.id for c in commands):
            outcome.cancel()
            return HoldReply(ok=False, detail=f"{what}: nothing to skip"[:1000])
        try:
            skipped = await outcome
        except Exception as exc:
            return HoldReply(ok=False, detail=f"{what}: the skip failed: {_reason(exc)}"[:1000])
        log.info("operator: %s skipped its head (%d jobs dead-lettered)", what, skipped)
        return HoldReply(
            ok=True, detail=f"{what}: {skipped} job(s) dead-lettered; the key resumes"[:1000]
        )

    async def _redrive_request(self, request: RedriveRequest) -> RedriveReply:
        """Dead letters back at the head of their keys (``apply``), or what would be (a dry
        run: nothing moves)."""
        assert self._connection is not None and self._runner is not None

        def select(job_type: str, key: str) -> bool:
            return (request.job_type is None or job_type == request.job_type) and (
                request.key is None or key == request.key
            )

        selection = await redrive.read_dead_letters(self._connection, self.names, select)
        try:
            selected = list(selection.selected.items())
            if not request.apply:
                summaries = [
                    RedriveKeySummary(job_type=job_type, key=key, messages=len(letters))
                    for (job_type, key), letters in selected
                ]
                for (job_type, key), _ in selected:
                    await selection.settle(job_type, key, False)
            else:
                redrive_id = uuid.uuid4().hex[:16]
                log.info(
                    "operator: redrive %s of %d dead letters over %d keys",
                    redrive_id,
                    sum(len(letters) for _, letters in selected),
                    len(selected),
                )
                summaries = list(
                    await asyncio.gather(
                        *(
                            self._redrive_key(selection, redrive_id, job_type, key, letters)
                            for (job_type, key), letters in selected
                        )
                    )
                )
        finally:
            await selection.close()
        return RedriveReply(
            applied=request.apply,
            keys=summaries[:10_000],
            messages=sum(s.messages for s in summaries),
            not_selected=selection.not_selected,
            unreadable=selection.unreadable,
        )

    async def _redrive_key(
        self,
        selection: redrive.DeadLetterSelection,
        redrive_id: str,
        job_type: str,
        key: str,
        letters: list[redrive.DeadLetteredMessage],
    ) -> RedriveKeySummary:
        """One key of a redrive: held, let go by its owner, rearranged; its dead letters
        acked if that went well, else back in the dead-letter queue."""
        assert self._runner is not None
        runner = self._runner
        error: str | None
        try:
            ref = KeyRef.of(key, job_type)
        except InvalidKeyError as exc:
            error = str(exc)
        else:
            done = runner.hold_dead_letters(redrive_id, ref.id, letters)
            try:
                self._do(self._book.redrive(ref, redrive_id))
            except HoldRefused as exc:
                runner.take_back_dead_letters(redrive_id, ref.id)
                error = str(exc)
            else:
                try:
                    error = await asyncio.wait_for(asyncio.shield(done), REDRIVE_WAIT)
                except TimeoutError:
                    if runner.take_back_dead_letters(redrive_id, ref.id):
                        error = (
                            f"its owner did not let it go within {REDRIVE_WAIT:g}s: its dead "
                            "letters stay in the dead-letter queue (redrive again)"
                        )
                    else:  # its rearrangement is under way with them: wait for its end
                        error = await done
        ok = error is None
        await selection.settle(job_type, key, ok)
        return RedriveKeySummary(
            job_type=job_type,
            key=key,
            messages=len(letters),
            error=None if error is None else error[:1000],
        )

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
        assert self._runner is not None  # control messages are consumed once it exists
        self._runner.do(commands)

    def _count_retired(self) -> None:
        self.keys_retired += 1
        self.metrics.keys_retired.inc()

    # --- sending ---------------------------------------------------------------------

    async def _broadcast(self, command: Sync) -> None:
        assert self._control is not None
        await publish_control(
            self._control,
            self.names.commands_exchange,
            control_message(command, user_id=self.settings.amqp_user),
            self.names.all_workers_route,
        )


def _reason(error: BaseException) -> str:
    """An error as a Refused reason (bounded)."""
    text = str(error) if isinstance(error, RabbitkeysError) else f"{type(error).__name__}: {error}"
    return text[:1000]

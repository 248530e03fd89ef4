"""The registry's hands: the one home of carrying out the key book's commands over AMQP
(declare and bind a key's queue, unbind it, wait out the grace, check it empty and delete
it, tell workers to take or release keys, answer waiting ensures; record holds as bindings
on ``NS.holds``, skip a parked key's head, put a redrive's dead letters at a key's head)
and of feeding each outcome back to the book as its next event.

One runner per leading session, with that session's book: an outcome that arrives after
the session ended goes to a book nobody reads any more.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from .._broker.amqp import (
    CHANNEL_ERRORS,
    ChannelPool,
    QueueChecks,
    TaskSet,
    broker_version,
    fresh_channel,
    open_channel,
    queue_unavailable,
)
from .._broker.control import control_message, publish_control
from .._errors import RabbitkeysError
from .._observe.metrics import RegistryMetrics
from .._settings import Settings
from .._wire.protocol import (
    REFUSED_QUOTA_EXCEEDED,
    REFUSED_UNAVAILABLE,
    Assign,
    Release,
    Sync,
    split,
)
from .._wire.topology import (
    KeyRef,
    Names,
    key_queue_arguments,
    key_queue_durable,
    new_routing_key,
    unlimited_deliveries_command,
)
from . import redrive
from .keybook import (
    RELEASE_WAIT,
    AssignKeys,
    CheckAndDelete,
    Command,
    DeclareAndBind,
    HandoffDone,
    KeyBook,
    Rearrange,
    Rebalance,
    ReleaseKeys,
    Reply,
    Retired,
    SetHold,
    SkipHead,
    SyncWorker,
    Unbind,
    WaitGrace,
    WaitRelease,
)

__all__ = ["DECLARE_CHANNELS", "CommandRunner"]

log = logging.getLogger("rabbitkeys.registry")

#: Channels the registry declares and binds key queues on. A channel carries one call at a
#: time (the client waits for each answer), so new keys are declared this many at a time;
#: the broker's own declare rate levels off around 16 (docs/internals/registry.md, "A new key").
DECLARE_CHANNELS = 32
#: Retirements' unbinds, and checks and deletes, under way at once. Retirement can wait; new
#: keys cannot: a thousand idle keys retiring together put their unbinds ahead of new keys'
#: declares on the same channels, and opened a channel each for their deletes
#: (docs/benchmarks.md, "Issue 25: new keys while idle keys retire").
RETIREMENT_UNBINDS = 2
RETIREMENT_DELETES = 4
#: Seconds a check and delete may take before the key is kept (as when it cannot be asked):
#: RabbitMQ 4.0 answers a passive declare of a classic queue whose cluster node is down only
#: after ~65 s, and such a check must not hold up the other retirements that long.
RETIREMENT_DELETE_TIMEOUT = 15.0

#: Tries to finish a redrive's rearrangement that was cut with the key queue changed.
_RECOVERY_ATTEMPTS = 3


class CommandRunner:
    """Carries out ``book``'s commands for one leading session. ``rebalance`` is called when
    the book wants a rebalance, ``retired`` when a key's queue is gone for good."""

    def __init__(
        self,
        settings: Settings,
        connection: AbstractConnection,
        control: AbstractChannel,
        book: KeyBook,
        *,
        tasks: TaskSet,
        metrics: RegistryMetrics,
        rebalance: Callable[[], None],
        retired: Callable[[], None],
        route: Callable[[str], str | None],
    ) -> None:
        self._settings = settings
        self._names = Names(settings.namespace)
        self._connection = connection
        self._control = control
        self._book = book
        self._tasks = tasks
        self._metrics = metrics
        self._rebalance = rebalance
        self._retired = retired
        self._route = route
        self._pool = ChannelPool(connection, size=DECLARE_CHANNELS)
        self._checks = QueueChecks(connection)
        self._unbinding = asyncio.Semaphore(RETIREMENT_UNBINDS)
        self._deleting = asyncio.Semaphore(RETIREMENT_DELETES)
        broker = broker_version(connection)
        self._queue_arguments = key_queue_arguments(
            settings.key_queue_expires, settings.queue_type, broker
        )
        self._queue_durable = key_queue_durable(settings.durable, broker)
        self._warned_delivery_limit = False
        self._declared_exchanges: set[str] = set()
        #: commands waiting to be sent to each worker, in order (see :meth:`_send`)
        self._outboxes: dict[str, list[Assign | Release | Sync]] = {}
        #: ensures waiting for the book's answer, by waiter number
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._waiter_numbers = itertools.count()
        #: holds to record or remove, in the book's order (see :meth:`_set_holds`)
        self._holds: list[SetHold] = []
        self._holds_channel: AbstractChannel | None = None
        #: skips an operator waits for, by key id: the dead-lettered count, or the error
        self._skips: dict[str, asyncio.Future[int]] = {}
        #: the dead letters a redrive holds for a key, by (redrive id, key id), until its
        #: ``Rearrange`` takes them (``None`` for a redrive this session holds none for)
        self._dead_letters: dict[tuple[str, str], Sequence[Any]] = {}
        #: redrives waiting for a key's rearrangement: None if done, else why not
        self._rearranged: dict[tuple[str, str], asyncio.Future[str | None]] = {}

    async def ensure(self, ref: KeyRef, stale_routing_key: str | None) -> Reply:
        """The book's answer to an ensure, once it has one (after a declare or retirement)."""
        waiter = next(self._waiter_numbers)
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = answer
        try:
            self.do(self._book.ensure(ref, stale_routing_key, waiter))
            return await answer
        finally:
            del self._waiters[waiter]

    def do(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case Reply(waiter=waiter):
                    answer = self._waiters.get(waiter)
                    if answer is not None and not answer.done():
                        answer.set_result(command)
                case AssignKeys(worker_id=worker_id, keys=keys):
                    # unbounded here (a rebalance of 100,000 keys): split when sent
                    self._send(worker_id, Assign.model_construct(keys=list(keys)))
                case ReleaseKeys(worker_id=worker_id, key_ids=key_ids):
                    self._send(worker_id, Release.model_construct(key_ids=list(key_ids)))
                case SyncWorker(worker_id=worker_id):
                    self._send(worker_id, Sync())
                case Rebalance():
                    self._rebalance()
                case Retired():
                    self._retired()
                case HandoffDone(seconds=seconds):
                    self._metrics.handoff_duration.observe(seconds)
                case DeclareAndBind():
                    self._tasks.spawn(self._declare(command))
                case Unbind():
                    self._tasks.spawn(self._unbind(command))
                case WaitGrace(key_id=key_id, epoch=epoch):
                    grace_over = functools.partial(self._book.grace_over, key_id, epoch)
                    self._tasks.spawn(self._after(self._settings.retire_grace, grace_over))
                case WaitRelease(key_id=key_id, epoch=epoch):
                    wait_over = functools.partial(self._book.release_wait_over, key_id, epoch)
                    self._tasks.spawn(self._after(RELEASE_WAIT, wait_over))
                case CheckAndDelete():
                    self._tasks.spawn(self._check_and_delete(command))
                case SetHold():
                    self._hold(command)
                case SkipHead():
                    self._tasks.spawn(self._skip_head(command))
                case Rearrange():
                    self._tasks.spawn(self._rearrange(command))

    async def _after(self, delay: float, event: Callable[[], list[Command]]) -> None:
        await asyncio.sleep(delay)
        self.do(event())

    async def _declare(self, command: DeclareAndBind) -> None:
        key = self._book.keys.get(command.key_id)
        try:
            if key is not None and key.routing_keys:
                # A key that was bound before, asked for again after a nack or a return:
                # its queue was deleted (declared anew below), or its node is down. RabbitMQ
                # 4.0 declares and binds a classic queue whose node is down as if it were
                # there (and nacks every publish to it): only a passive declare says it is
                # unavailable (docs/probes/classic_node_down.py).
                try:
                    await self._checks.passive_declare(command.queue)
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    if queue_unavailable(exc):
                        raise
                    # gone (x-expires, an operator): declared anew below
            routing_key = await self._declare_and_bind(command.ref, command.queue)
        except Exception as exc:
            if not queue_unavailable(exc):  # the book says that one, once
                log.warning("cannot declare or bind the queue of key %s: %r", command.key_id, exc)
            refused = _declare_refusal(exc)
            self.do(self._book.declare_failed(command.key_id, command.epoch, *refused))
            return
        self._metrics.keys_created.inc()
        now = time.monotonic()
        self.do(self._book.declared(command.key_id, command.epoch, routing_key, now))

    async def _declare_and_bind(self, ref: KeyRef, queue: str) -> str:
        exchange = self._names.jobs_exchange(ref.job_type)
        channel = await self._pool.get()
        if exchange not in self._declared_exchanges:
            await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
            self._declared_exchanges.add(exchange)
        # One round trip, not two: the declare goes without waiting for its declare-ok, the
        # bind right behind it on the same channel. The broker handles a channel's methods
        # in order, so the bind-ok means the queue was declared; a refused declare (the
        # vhost's queue limit, other arguments) closes the channel, and the bind raises the
        # declare's error.
        routing_key = new_routing_key(ref)
        try:
            await channel.queue_declare(
                queue,
                durable=self._queue_durable,
                arguments=self._queue_arguments,
                nowait=True,
            )
            await channel.queue_bind(queue, exchange, routing_key=routing_key)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if "inequivalent arg" not in str(exc):
                raise
            # The queue exists with other arguments: declared by an earlier version, before
            # a RABBITKEYS_QUEUE_TYPE change, or on another broker version's placement
            # argument. It is the key's queue all the same: keep it as it is (its type
            # changes when it is retired and declared anew).
            log.info("key %s keeps its queue as it is: %s", ref.id, exc)
            if "x-delivery-limit" in str(exc) and not self._warned_delivery_limit:
                self._warned_delivery_limit = True
                log.warning(
                    "quorum key queues declared before rabbitkeys lifted RabbitMQ 4's delivery "
                    "limit keep it: the broker drops a job let go 20 times (moves, parks, "
                    "crashes). Lift it once with: %s",
                    unlimited_deliveries_command(self._settings.namespace),
                )
            channel = await self._pool.get()
            await channel.queue_declare(queue, passive=True)
            await channel.queue_bind(queue, exchange, routing_key=routing_key)
        return routing_key

    async def _unbind(self, command: Unbind) -> None:
        """Retiring, 1: stop routing; from here on, publishes come back to their publisher."""
        removed: list[str] = []
        try:
            exchange = self._names.jobs_exchange(command.ref.job_type)
            async with self._unbinding:
                channel = await self._pool.get()
                for routing_key in command.routing_keys:
                    await channel.queue_unbind(command.queue, exchange, routing_key=routing_key)
                    removed.append(routing_key)
        except Exception as exc:
            log.warning("cannot unbind key %s; not retired: %r", command.key_id, exc)
            self.do(self._book.unbound(command.key_id, command.epoch, removed, ok=False))
            return
        self.do(self._book.unbound(command.key_id, command.epoch, removed, ok=True))

    async def _check_and_delete(self, command: CheckAndDelete) -> None:
        """Retiring, 4: delete only an empty, unconsumed queue; the broker checks both
        atomically."""
        deleted = False
        try:
            async with (
                self._deleting,
                asyncio.timeout(RETIREMENT_DELETE_TIMEOUT),
                fresh_channel(self._connection) as probe,
            ):
                try:
                    ok = await probe.queue_declare(command.queue, passive=True)
                    if not ok.message_count and not ok.consumer_count:
                        await self._delete(probe, command.queue)
                        deleted = True
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    # deleted meanwhile (x-expires, an operator); or its node is down, and
                    # it comes back with the node, messages and all: keep that one
                    deleted = not queue_unavailable(exc)
                except CHANNEL_ERRORS as exc:
                    log.info("kept key %s: %s", command.key_id, exc)
        except CHANNEL_ERRORS as exc:  # no channel to ask on: keep it
            log.info("kept key %s: %s", command.key_id, exc)
        except TimeoutError:  # its node down, or the broker swamped: keep it, retire later
            log.info("kept key %s: no answer within %gs", command.key_id, RETIREMENT_DELETE_TIMEOUT)
        self.do(self._book.delete_outcome(command.key_id, command.epoch, deleted))

    async def _delete(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        """Delete a key queue just found empty and unconsumed. A classic queue is deleted
        only if it still is (the broker checks both with the delete). A quorum queue refuses
        those checks (NOT_IMPLEMENTED, which closes the connection), so it is deleted as
        it is: safe all the same, because nothing can fill or consume it between the check
        and the delete. It is unbound, the grace for messages routed before the unbind is
        over, the registry is the only party that binds it, and no worker may consume it
        (the book assigns a retiring key to nobody, and its last owner settled every
        delivery before it cancelled: docs/internals/broker.md, "Retiring a quorum key queue")."""
        if self._settings.queue_type == "quorum":
            await channel.queue_delete(queue)
        else:
            await channel.queue_delete(queue, if_empty=True, if_unused=True)

    # --- holds, skips, redrives -----------------------------------------------------------

    def _hold(self, command: SetHold) -> None:
        """Record (or remove) a hold durably, after every hold command before it: a pause
        and a resume of the same key must reach the broker in that order."""
        self._holds.append(command)
        if len(self._holds) == 1:
            self._tasks.spawn(self._set_holds())

    async def _set_holds(self) -> None:
        while self._holds:
            command = self._holds[0]
            try:
                await self._set_hold(command)
            except Exception as exc:
                # the book holds it all the same; a registry taking over would not know it
                log.error(
                    "cannot %s hold %r of %s on %s: a registry that takes over will not "
                    "know it: %r",
                    "record" if command.add else "remove",
                    command.hold,
                    command.queue or f"job type {command.job_type}",
                    self._names.holds_exchange,
                    exc,
                )
            finally:
                self._holds.pop(0)

    async def _set_hold(self, command: SetHold) -> None:
        channel = self._holds_channel
        if channel is None or channel.is_closed:
            channel = self._holds_channel = await open_channel(self._connection)
        underlay = await channel.get_underlay_channel()
        holds = self._names.holds_exchange
        arguments: dict[str, Any] = dict(command.arguments)
        if command.queue is not None:
            if command.add:
                await underlay.queue_bind(
                    command.queue, holds, routing_key=command.hold, arguments=arguments
                )
            else:
                await underlay.queue_unbind(
                    command.queue, holds, routing_key=command.hold, arguments=arguments
                )
            return
        assert command.job_type is not None
        exchange = self._names.jobs_exchange(command.job_type)
        if command.add:
            if exchange not in self._declared_exchanges:  # a job type with no key yet
                await underlay.exchange_declare(exchange, exchange_type="direct", durable=True)
                self._declared_exchanges.add(exchange)
            await underlay.exchange_bind(
                exchange, holds, routing_key=command.hold, arguments=arguments
            )
        else:
            await underlay.exchange_unbind(
                exchange, holds, routing_key=command.hold, arguments=arguments
            )

    def expect_skip(self, key_id: str) -> asyncio.Future[int]:
        """The outcome of the next :class:`SkipHead` of ``key_id``: how many jobs went to
        the dead letters (or the error that stopped it)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._skips[key_id] = future
        return future

    async def _skip_head(self, command: SkipHead) -> None:
        try:
            skipped = await redrive.skip_head(
                self._connection,
                self._names,
                command.queue,
                error=command.error,
                attempts=command.attempts,
                job_index=command.job_index,
                user_id=self._settings.amqp_user,
            )
        except Exception as exc:
            log.warning("cannot skip the head of key %s: %r", command.key_id, exc)
            self.do(self._book.skipped(command.key_id, command.epoch, False))
            self._settle(self._skips.pop(command.key_id, None), exc)
            return
        self._metrics.skipped_messages.inc(skipped)
        log.info("key %s: skipped its head (%d jobs dead-lettered)", command.key_id, skipped)
        self.do(self._book.skipped(command.key_id, command.epoch, True))
        self._settle(self._skips.pop(command.key_id, None), skipped)

    def hold_dead_letters(
        self, redrive_id: str, key_id: str, dead_letters: Sequence[Any]
    ) -> asyncio.Future[str | None]:
        """Give a redrive's dead letters for a key to its coming :class:`Rearrange`; the
        future says when the key is rearranged (None) or why not."""
        self._dead_letters[redrive_id, key_id] = dead_letters
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._rearranged[redrive_id, key_id] = future
        return future

    def take_back_dead_letters(self, redrive_id: str, key_id: str) -> bool:
        """Whether the dead letters given for a key were not taken by a rearrangement (and
        now never will be); if they were, the rearrangement's future tells its end."""
        if self._dead_letters.pop((redrive_id, key_id), None) is None:
            return False
        self._rearranged.pop((redrive_id, key_id), None)
        return True

    async def _rearrange(self, command: Rearrange) -> None:
        ids = (command.redrive_id, command.key_id)
        dead_letters = self._dead_letters.pop(ids, None)
        removed: Sequence[str] = ()
        error: str | None = None
        try:
            removed = await redrive.rearrange(
                self._connection,
                self._names,
                command.ref,
                command.queue,
                command.routing_keys,
                command.redrive_id,
                dead_letters,
                self._settings.retire_grace,
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
            # what it unbound before it failed, if it says (else the book keeps them all:
            # an unbound routing key it still lists only costs a publisher a resend)
            removed = tuple(getattr(exc, "removed", ()))
            log.warning("cannot redrive key %s: %s", command.key_id, error)
            if isinstance(exc, redrive.RearrangeError) and exc.queue_changed:
                # copies in the queue, or a rotation cut part way: finish the rotation
                # before anyone consumes the key. If every copy was confirmed, they are
                # at the head then, and the dead letters themselves may go.
                recovered = await self._recover(command)
                if recovered and dead_letters and exc.published == len(dead_letters):
                    error = None
        ok = error is None
        if ok and dead_letters:
            self._metrics.redriven_messages.inc(len(dead_letters))
        self.do(self._book.rearranged(command.key_id, command.epoch, ok, list(removed)))
        self._settle(self._rearranged.pop(ids, None), error)

    async def _recover(self, command: Rearrange) -> bool:
        """Finish a rearrangement cut part way (``dead_letters`` None: only the rotation);
        a few tries, as the key must not be consumed before."""
        for attempt in range(_RECOVERY_ATTEMPTS):
            try:
                await redrive.rearrange(
                    self._connection,
                    self._names,
                    command.ref,
                    command.queue,
                    (),
                    command.redrive_id,
                    None,
                    0.0,
                )
            except CHANNEL_ERRORS as exc:
                if self._connection.is_closed:  # the session ends: the next leader's turn
                    raise
                error: Exception = exc
            except Exception as exc:
                error = exc
            else:
                log.info(
                    "key %s: redrive %s finished by a recovery", command.key_id, command.redrive_id
                )
                return True
            log.warning(
                "key %s: recovery %d of redrive %s failed: %r",
                command.key_id,
                attempt + 1,
                command.redrive_id,
                error,
            )
            await asyncio.sleep(1.0)
        log.error(
            "key %s: redrive %s was cut with the queue changed, and its recovery failed: "
            "the key is consumed again as it is (copies may repeat messages, out of order)",
            command.key_id,
            command.redrive_id,
        )
        return False

    @staticmethod
    def _settle(future: asyncio.Future[Any] | None, outcome: Any) -> None:
        if future is None or future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    # --- sending ------------------------------------------------------------------------

    def _send(self, worker_id: str, command: Assign | Release | Sync) -> None:
        """Queue ``command`` in the worker's outbox. One message per worker is in flight
        (sent, not yet confirmed); what is queued meanwhile goes next, consecutive
        ``Assign``s (or ``Release``s) merged into one message: a burst of new keys costs a
        worker a few commands, not one per key. The order of commands to a worker is kept
        (a ``Release`` must not overtake the ``Assign`` of the same key)."""
        outbox = self._outboxes.get(worker_id)
        if outbox is None:
            outbox = self._outboxes[worker_id] = []
            self._tasks.spawn(self._deliver(worker_id, outbox))
        merge_commands(outbox, command)

    async def _deliver(self, worker_id: str, outbox: list[Assign | Release | Sync]) -> None:
        try:
            while outbox:
                command = outbox.pop(0)
                route = self._route(worker_id)
                if route is None:  # a worker we never heard from (or gone): nothing
                    continue  # reaches it, and the book only commands workers that reported
                for message in split_command(command):
                    try:
                        await self._publish(route, message)
                    except aiormq.exceptions.DeliveryError:
                        # nacked (RabbitMQ 4.0: the worker's inbox went down with its node;
                        # 3.10 drops it unrouted): that worker is gone or will be dropped
                        log.info("a %s to worker %s was nacked", message.type, worker_id)
                    except CHANNEL_ERRORS:
                        raise  # the control channel is gone: so is this session
                    except Exception:
                        log.exception("cannot send a %s to worker %s", message.type, worker_id)
        finally:
            del self._outboxes[worker_id]

    async def _publish(self, routing_key: str, command: Assign | Release | Sync) -> None:
        await publish_control(
            self._control,
            self._names.commands_exchange,
            control_message(command, user_id=self._settings.amqp_user),
            routing_key,
        )


def merge_commands(outbox: list[Assign | Release | Sync], command: Assign | Release | Sync) -> None:
    """Append ``command`` to a worker's outbox, merged into the last one if both are
    ``Assign``s or both ``Release``s (their order within the merged list is kept)."""
    last = outbox[-1] if outbox else None
    if isinstance(last, Assign) and isinstance(command, Assign):
        outbox[-1] = Assign.model_construct(keys=[*last.keys, *command.keys])
    elif isinstance(last, Release) and isinstance(command, Release):
        outbox[-1] = Release.model_construct(key_ids=[*last.key_ids, *command.key_ids])
    elif not (isinstance(last, Sync) and isinstance(command, Sync)):
        outbox.append(command)


def split_command(command: Assign | Release | Sync) -> list[Assign | Release | Sync]:
    """``command`` as messages within the protocol's bounds
    (:func:`rabbitkeys._wire.protocol.split`)."""
    if isinstance(command, Assign):
        return list(split(command.keys, lambda chunk: Assign(keys=chunk)))
    if isinstance(command, Release):
        return list(split(command.key_ids, lambda chunk: Release(key_ids=chunk)))
    return [command]


def _declare_refusal(error: Exception) -> tuple[str, str | None]:
    """Why a declare or bind failed, as a Refused reason and code: the broker refused it (say
    the vhost's queue limit), the queue's node is down, or the client library refused a
    name."""
    if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed) and (
        "queue limit in vhost" in str(error)
    ):
        # the broker's own queue limit (the vhost's max-queues) is a quota like ours
        detail = str(error).rpartition("PRECONDITION_FAILED - ")[2].rstrip('"')
        reason = f"the broker refused another queue ({detail}): the vhost's max-queues limit"
        return reason[:1000], REFUSED_QUOTA_EXCEEDED
    if queue_unavailable(error):
        detail = str(error).rpartition("NOT_FOUND - ")[2].rstrip('"')
        return f"the key's queue is unavailable ({detail})"[:1000], REFUSED_UNAVAILABLE
    if isinstance(error, RabbitkeysError):
        reason = str(error)
    elif isinstance(error, aiormq.exceptions.AMQPError):
        reason = f"the broker refused it ({error})"
    else:
        reason = f"{type(error).__name__}: {error}"
    return f"cannot declare or bind the key's queue: {reason}"[:1000], None

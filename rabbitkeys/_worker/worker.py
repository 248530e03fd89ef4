"""The worker: the one home of a worker's session and membership. It connects, joins the
registry with the keys it holds, sends heartbeats (with the keys gone idle), carries out the
registry's commands, and on stop drains and leaves. Its two other jobs have modules of their
own: taking and letting go of keys, each in a named state (:mod:`.handoff`), and running a
delivery: dedup, handler, retries, dead letter (:mod:`.execution`, :mod:`.retry`).

A session is one connection. After losing it the worker joins again under a new worker id,
holding no keys (the registry reassigns the old id's keys when its inbox vanishes).

Around all its sessions, once per run: the app's startup hooks before the first connect (one
that raises stops the worker with :class:`StartupError`, never joined), the thread pool for
plain ``def`` handlers and sync hooks, and the shutdown hooks after the drain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from .._broker.amqp import CHANNEL_ERRORS, ChannelPool, TaskSet, broker_version, sleep_unless
from .._broker.connection import keep_connected
from .._broker.control import control_message, publish_control, topology_exists
from .._errors import ConfigError, ProtocolError, StartupError
from .._lifecycle import Background
from .._observe.metrics import WorkerMetrics
from .._settings import Settings, load_settings
from .._wire.protocol import (
    MAX_FAILING_PER_HEARTBEAT,
    MAX_JOB_TYPES,
    MAX_KEYS_PER_MESSAGE,
    Assign,
    ControlMessage,
    KeyAssignment,
    KeyFailure,
    KeyParked,
    Release,
    Released,
    Sync,
    WorkerHeartbeat,
    WorkerJoin,
    WorkerLeave,
    decode_control,
    split,
)
from .._wire.senders import Refusal, check_command, record_drop
from .._wire.topology import Names, check_worker_id
from .app import App, Context, Hook, hook_name, is_async
from .execution import Executor, Park
from .handoff import Handoff

__all__ = ["Worker"]

log = logging.getLogger("rabbitkeys.worker")


class Worker(Background):
    """Runs an :class:`App`'s handlers: ``async with Worker(app):`` in the background, or
    ``await Worker(app).run()`` until ``stop()`` (see :mod:`rabbitkeys._lifecycle`). Stopping is
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
        self._stopping = asyncio.Event()
        self._tasks = TaskSet(log, "worker task")
        self._session_lost = asyncio.Event()
        self._control: AbstractChannel | None = None
        #: commands refused, by reason (``_wire.senders.REFUSAL_REASONS``)
        self.refused: collections.Counter[str] = collections.Counter()
        # Sent in every message to the registry, which only the registry reads: what tells
        # it that a message for our worker id is ours (``_wire.senders.WorkerSessions``).
        self._secret = secrets.token_hex(16)
        self._joined = False
        self.metrics = WorkerMetrics(self, metrics_registry)
        for job_type in app.job_types:
            # at 0 from the start, so that a rate over it has data before the first timeout
            self.metrics.job_timeouts.labels(job_type=job_type)
        #: shared by the app's hooks and handlers (``message.context``) in this worker
        self.context = Context()
        self._executor = Executor(app, settings, self.metrics, self._stopping, self.context)
        self._handoff = Handoff(
            settings,
            self._executor,
            self.metrics,
            self._tasks,
            self._stopping,
            self._released,
            parked=self._key_parked,
        )

    # What the worker has done, over all its sessions (read by tests and the CLI's logs).
    @property
    def handled(self) -> int:
        """Deliveries run to their end and acked (handled, dropped as copies, dead-lettered)."""
        return self._handoff.handled

    @property
    def queues_checked(self) -> int:
        """Keys whose queue was checked (passive declare) before consuming it."""
        return self._handoff.queues_checked

    @property
    def checks_skipped(self) -> int:
        """Keys consumed without a check: the registry had just declared their queue."""
        return self._handoff.checks_skipped

    @property
    def dead_lettered(self) -> int:
        return self._executor.dead_lettered

    @property
    def parked(self) -> int:
        """Keys parked: let go with their failed head put back (``on_failure="park"``)."""
        return self._handoff.parked

    @property
    def duplicates_dropped(self) -> int:
        return self._executor.duplicates_dropped

    @property
    def order_violations(self) -> int:
        return self._executor.order_violations

    def gauge_values(self) -> dict[str, float]:
        """For the metrics: read at scrape time."""
        holds = self._handoff.holds()
        in_flight = self._executor.in_flight
        return {
            "rabbitkeys_owned_keys": len(holds),
            "rabbitkeys_in_flight_messages": in_flight,
            "rabbitkeys_buffered_messages": max(
                0, sum(len(owned.buffer) for owned in holds) - in_flight
            ),
        }

    @property
    def malformed_messages(self) -> int:
        """Control messages dropped, whatever the reason."""
        return sum(self.refused.values())

    @property
    def ready(self) -> bool:
        """Connected and joined: what the readiness probe reports."""
        return self._joined and not self._session_lost.is_set() and not self._stopping.is_set()

    @property
    def owned_keys(self) -> list[str]:
        return sorted(owned.key_id for owned in self._handoff.holds())

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run the startup hooks, then work until ``stop()``, then the shutdown hooks. After
        losing the broker, reconnect and join again under a new worker id (the registry
        reassigns our keys when the old id's inbox vanishes). Raises :class:`StartupError`
        if a startup hook fails: the worker never connected."""
        threads = ThreadPoolExecutor(
            max_workers=self.settings.sync_handler_threads,
            thread_name_prefix=f"rabbitkeys-worker-{self._base_id}",
        )
        self._executor.threads = threads
        try:
            if not await self._start_up():
                return  # stopped while starting up
            try:
                await keep_connected(
                    self.settings, f"worker {self._base_id}", self._session, self._stopping, log
                )
            finally:
                await self._shut_down()
        finally:
            # Threads cannot be cancelled: wait for the ones still running (a sync handler
            # of a session that was lost), off the loop.
            await asyncio.get_running_loop().run_in_executor(None, threads.shutdown)
            self._executor.threads = None

    async def _call_hook(self, hook: Hook) -> None:
        if is_async(hook):
            await hook(self.context)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor.threads, hook, self.context)

    async def _start_up(self) -> bool:
        """The app's startup hooks, in order; False if ``stop()`` came first (an async hook
        still running is cancelled). Raises :class:`StartupError` naming the hook."""
        for hook in self.app.startup_hooks:
            running = asyncio.ensure_future(self._call_hook(hook))
            stopped = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                log.info("worker %s stopped during startup hook %s", self._base_id, hook_name(hook))
                return False
            error = running.exception()
            if error is not None:
                log.error(
                    "worker %s: startup hook %s failed; not joining",
                    self._base_id,
                    hook_name(hook),
                    exc_info=error,
                )
                raise StartupError(
                    f"startup hook {hook_name(hook)} failed: {type(error).__name__}: {error}"
                ) from error
        return not self._stopping.is_set()

    async def _shut_down(self) -> None:
        """The app's shutdown hooks, in order, each once; what one raises is logged and the
        next runs."""
        for hook in self.app.shutdown_hooks:
            try:
                await self._call_hook(hook)
            except Exception:
                log.exception("worker %s: shutdown hook %s failed", self._base_id, hook_name(hook))

    async def _session(self, connection: AbstractConnection) -> None:
        self._sessions += 1
        if self._sessions > 1:
            self.worker_id = f"{self._base_id}-{self._sessions}"
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
            running = [*self._tasks, *self._handoff.runners()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self._handoff.end()

    async def _start(self, connection: AbstractConnection) -> None:
        if not await self._wait_for_registry(connection):
            return
        self._control = await connection.channel()
        self._control.close_callbacks.add(self._on_channel_close)
        dead_letters = await connection.channel(publisher_confirms=True)
        dead_letters.close_callbacks.add(self._on_channel_close)
        self._executor.begin(dead_letters, self.worker_id, self.settings.amqp_user)
        # Classic keys are consumed here; quorum keys each on a channel of their own,
        # closed to let them go in order (_handoff: a reject there puts them at the back).
        consume = await connection.channel()
        consume.close_callbacks.add(self._on_channel_close)
        # Applies to each consumer made on this channel afterwards, i.e. to each key.
        await consume.set_qos(prefetch_count=self.settings.prefetch)
        # RabbitMQ reads global=True as a cap shared by all consumers of the channel, on top
        # of the per-key prefetch: what this worker holds over all its keys. It must come
        # second, and no qos(global=False) may follow: that lifts the cap (probe:
        # docs/probes/global_qos_cap.py).
        # Quorum queues refuse a global qos (NOT_IMPLEMENTED closes the connection), and
        # RabbitMQ 4.3 reads one as a per-consumer qos, which would make the cap every key's
        # prefetch: there the handoff gives each key a prefetch out of the cap instead
        # (_worker.handoff.PrefetchBudget).
        global_cap = self.settings.queue_type == "classic" and broker_version(connection) < (4, 0)
        if global_cap:
            await consume.set_qos(prefetch_count=self.settings.buffered_messages_cap, global_=True)
        # Consumed through aiormq directly: its callback starts (in a task scheduled when the
        # frame is read) before a later cancel-ok wakes the releasing task. aio-pika's wrapper
        # adds a second task hop, which would let a delivery slip past a release.
        self._handoff.begin(
            cast(aiormq.Channel, await consume.get_underlay_channel()),
            ChannelPool(connection, size=4),
            self._session_lost,
            global_cap=global_cap,
        )
        # Exclusive: no other connection can consume, bind or delete it.
        inbox = await self._control.declare_queue(
            self.names.worker_inbox(self.worker_id), exclusive=True, auto_delete=True
        )
        commands = self.names.commands_exchange
        await inbox.bind(
            commands, routing_key=self.names.worker_route(self.worker_id, self._secret)
        )
        await inbox.bind(commands, routing_key=self.names.all_workers_route)
        await inbox.consume(self._on_command, no_ack=True)
        await self._send_join()
        self._joined = True

    async def _wait_for_registry(self, connection: AbstractConnection) -> bool:
        """Wait until a registry has declared the namespace's control names (only it may);
        False if stopped first."""
        exchange = self.names.membership_exchange
        if await topology_exists(connection, exchange):
            return True
        log.warning(
            "worker %s: namespace %r has no %s exchange yet; waiting for a registry "
            "(`rabbitkeys registry`) to start",
            self.worker_id,
            self.names.namespace,
            exchange,
        )
        while not await sleep_unless(self._stopping, 0.5):
            if await topology_exists(connection, exchange):
                return True
        return False

    def _on_channel_close(self, *_: Any) -> None:
        self._session_lost.set()

    async def _send_join(self) -> None:
        """Join, with the keys we consume: several messages when they do not fit in one."""
        held = [owned.assignment for owned in self._handoff.holds() if owned.state.held]
        job_types = sorted(self.app.job_types)
        inbox = self.names.worker_inbox(self.worker_id)
        for join in split(
            held,
            lambda keys: WorkerJoin(
                worker_id=self.worker_id,
                session=self._secret,
                inbox=inbox,
                job_types=job_types,
                keys=keys,
            ),
        ):
            await self._send(join)

    def _heartbeat(self) -> WorkerHeartbeat:
        now = time.monotonic()
        holds = self._handoff.holds()
        idle: list[str] = []
        for owned in holds:
            quiet_since = max(owned.last_activity, owned.idle_reported_at)
            if (
                not owned.buffer
                and owned.state.held
                and now - quiet_since >= self.settings.idle_period
                and len(idle) < MAX_KEYS_PER_MESSAGE  # the rest go with the next heartbeat
            ):
                owned.idle_reported_at = now
                idle.append(owned.key_id)
        waiting = sum(
            len(owned.buffer) - (1 if owned.runner is not None and owned.buffer else 0)
            for owned in holds
        )
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            session=self._secret,
            owned=len(holds),
            waiting=waiting,
            idle_keys=idle,
            failing=self._failing(),
        )

    def _failing(self) -> list[KeyFailure]:
        """Held keys whose head failed and waits for its next attempt (at most
        ``MAX_FAILING_PER_HEARTBEAT``: the first ones that began failing)."""
        failing: list[KeyFailure] = []
        for key_id, failure in list(self._executor.failing.items()):
            if self._handoff.holding(key_id):
                failing.append(failure)
                if len(failing) == MAX_FAILING_PER_HEARTBEAT:
                    break
        return failing

    async def _send(
        self, message: WorkerJoin | WorkerHeartbeat | WorkerLeave | Released | KeyParked
    ) -> None:
        assert self._control is not None
        try:
            await publish_control(
                self._control,
                self.names.membership_exchange,
                control_message(
                    message,
                    user_id=self.settings.amqp_user,
                    expiration=self.settings.worker_timeout,
                ),
                "",
            )
        except aiormq.exceptions.DeliveryError:
            # Nacked: the registry's queue cannot take it now. RabbitMQ 4.0 nacks what is
            # routed to a classic queue whose cluster node is down (3.10 drops it unrouted,
            # and so does this): the registry starts its session over once its queue is
            # back and asks every worker for its keys (Sync). Not a lost connection.
            log.debug("a %s to the registry was nacked (its queue is unavailable)", message.type)

    async def _released(self, keys: list[KeyAssignment]) -> None:
        """Tell the registry we let go of these keys (or never took them)."""

        def released(chunk: list[KeyAssignment]) -> Released:
            return Released(worker_id=self.worker_id, session=self._secret, keys=chunk)

        for report in split(keys, released):
            await self._send(report)

    async def _key_parked(self, assignment: KeyAssignment, park: Park) -> None:
        """Tell the registry this key is parked (its head put back already); the key's
        ``Released`` follows on the same channel."""
        await self._send(
            KeyParked(
                worker_id=self.worker_id,
                session=self._secret,
                key=assignment,
                error=park.error,
                attempts=park.attempts,
                job_index=park.job_index,
            )
        )

    # --- commands from the registry -----------------------------------------------------

    def _dropped(self, what: str, error: BaseException) -> None:
        """Count, log and drop what remote input broke or was refused; the worker carries
        on."""
        record_drop(log, self.refused, self.metrics, what, error)

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        """Commands, obeyed only from the registry (``_wire.senders``): whatever one breaks or
        is refused for is counted, logged and dropped; the worker keeps its keys."""
        try:
            command = decode_control(message.body)
        except ProtocolError as exc:
            self._dropped("a command", exc)
            return
        try:
            check_command(self.names, message.exchange or "", message.user_id, command)
        except Refusal as refusal:
            self._dropped(f"a {command.type} command", refusal)
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
                    self._tasks.spawn(self._handoff.acquire(assignment))
        elif isinstance(command, Release):
            self._tasks.spawn(self._handoff.release_and_report(command.key_ids))
        elif isinstance(command, Sync):
            await self._send_join()
        else:
            raise ProtocolError(f"a {command.type!r} message is not a command")

    def _is_ours(self, assignment: KeyAssignment) -> bool:
        """Only key queues of our namespace, named after the key they claim to be, of a job
        type we serve."""
        if self.names.key_of_report(assignment.queue, assignment.key_id, assignment.key) is None:
            self._dropped(
                "an assignment",
                Refusal(
                    "foreign_queue",
                    f"queue {assignment.queue!r} is not key {assignment.key_id!r}'s",
                ),
            )
            return False
        if assignment.job_type not in self.app.job_types:
            self._dropped(
                "an assignment",
                Refusal("job_type_not_served", f"job type {assignment.job_type!r} is not served"),
            )
            return False
        return True

    # --- shutdown -----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Graceful stop: take no new deliveries, finish and ack what is in flight, hand
        the rest back, then leave (the registry reassigns only keys we have let go)."""
        holds = self._handoff.holds()
        log.info("worker %s stopping: settling %d keys", self.worker_id, len(holds))
        await asyncio.gather(*(self._handoff.release(owned.key_id) for owned in holds))
        with contextlib.suppress(Exception):
            await self._send(WorkerLeave(worker_id=self.worker_id, session=self._secret))
        log.info("worker %s stopped after %d deliveries", self.worker_id, self.handled)

"""Test an :class:`~rabbitkeys.App`'s handlers, middleware and failure policies in memory:
no broker, no registry, no sleeping.

    from rabbitkeys.testing import InMemoryWorker

    async def test_comments_are_saved_in_order() -> None:
        async with InMemoryWorker(app) as worker:      # runs the app's startup hooks
            await worker.publish("post A", Comment(post="post A", text="hi"), job_type="comments")
            await worker.publish("post A", Comment(post="post A", text="ho"), job_type="comments")
            await worker.join()                        # until every key is idle or parked
        assert [job.payload.text for job in worker.handled] == ["hi", "ho"]

:class:`InMemoryWorker` runs jobs as a :class:`~rabbitkeys.Worker` does: one job per key at
a time, in publish order per key, keys concurrently up to ``settings.concurrency`` handlers
at once, ``def`` handlers in a thread pool of ``settings.sync_handler_threads``, the app's
middleware around each attempt within its time limit (``job_timeout``, or the job type's
``timeout=``: a :class:`~rabbitkeys.JobTimeoutError`, for real, not simulated), the retry
policy of the settings (``max_retries``, ``retry_backoff``, ``retry_backoff_max``), and after
the last attempt the job type's ``on_failure``: dead-letter it and go on, or park the key
(:meth:`InMemoryWorker.resume`, :meth:`InMemoryWorker.skip`). Not a copy of the worker: a
job runs in the worker's own job-run core (:mod:`rabbitkeys._worker.job_run`) and calls its
handler as the worker does (:func:`~rabbitkeys._worker.execution.call_handler`); only the
edges differ, the ports this module gives the core (:class:`_JobPorts`). A body that does
not fit the handler's declared type fails at once (no retry): dead-lettered, or parked for a
job type that parks; a job type without a handler is dead-lettered at once.
``publish`` has :meth:`Publisher.publish <rabbitkeys.Publisher.publish>`'s signature and
encodes payloads and headers the same way (:mod:`rabbitkeys._wire.payload`,
:mod:`rabbitkeys._wire.envelope`), so a handler sees the same :class:`~rabbitkeys.Message`
it would get from the broker.

What differs, on purpose: a retry's backoff is recorded (``job.backoffs``), not slept,
unless ``sleep_backoff=True``; nothing is redelivered (``message.redelivered`` is False) and
nothing is a duplicate; there is one worker, so no handoff.

:func:`run_jobs` is the same for a plain (sync) test.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ._errors import RabbitkeysError, StartupError
from ._publisher.publisher import encode_body
from ._settings import Settings
from ._wire.envelope import Envelope, dead_letter_headers, encode_envelope, jobs_of
from ._wire.topology import DEFAULT_JOB_TYPE, KeyRef
from ._worker.app import App, Context, Hook, Message, Route, hook_name, is_async
from ._worker.execution import Deadlines, HandlerThreads, call_handler, time_limit
from ._worker.job_run import (
    Decide,
    Failure,
    JobEnd,
    JobToRun,
    Park,
    route_of,
    run_attempts,
)
from ._worker.retry import RetryPolicy

__all__ = ["InMemoryWorker", "JobRecord", "JobState", "JobsFailedError", "run_jobs"]

log = logging.getLogger("rabbitkeys.testing")

#: what dead letters name as their worker (``x-rabbitkeys-worker``)
WORKER_ID = "in-memory"
_PERSISTENT = 2


class JobState(enum.Enum):
    """Where a published job is. A job moves forward only: ``WAITING`` → ``RUNNING`` (↔
    ``RETRYING``) → ``HANDLED`` | ``DEAD_LETTERED`` | ``PARKED``; a parked job goes back to
    ``RUNNING`` when its key is resumed, or to ``DEAD_LETTERED`` when it is skipped."""

    #: published, behind earlier jobs of its key (or behind a parked one)
    WAITING = "waiting"
    #: its handler runs (an attempt, in a concurrency slot)
    RUNNING = "running"
    #: an attempt failed; the next waits out its backoff (holding no concurrency slot)
    RETRYING = "retrying"
    HANDLED = "handled"
    #: copied to the dead letters (``InMemoryWorker.dead_letters``); its key went on
    DEAD_LETTERED = "dead_lettered"
    #: its last attempt failed and its job type parks: the key stops with it at its head
    PARKED = "parked"


_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset(
        {JobState.RETRYING, JobState.HANDLED, JobState.DEAD_LETTERED, JobState.PARKED}
    ),
    JobState.RETRYING: frozenset({JobState.RUNNING}),
    JobState.PARKED: frozenset({JobState.RUNNING, JobState.DEAD_LETTERED}),
    JobState.HANDLED: frozenset(),
    JobState.DEAD_LETTERED: frozenset(),
}


@dataclass(eq=False)
class JobRecord:
    """One published job and what became of it. Read it; the worker writes it."""

    job_type: str
    key: str
    #: what was given to ``publish`` (the handler gets it encoded, then decoded as declared)
    payload: object
    #: what travelled: the encoded body, its content type, and the headers the handler sees
    #: (the application's and rabbitkeys' own ``x-rabbitkeys-*``)
    body: bytes
    content_type: str | None
    headers: Mapping[str, Any]
    #: its place in the worker's publish order (``message.sequence``)
    sequence: int
    state: JobState = JobState.WAITING
    #: attempts of its latest run (a resumed job starts again at 1), as a dead letter counts
    attempts: int = 0
    #: every failed attempt's exception, in order, over all runs
    errors: list[BaseException] = field(default_factory=list)
    #: the backoff before each retry, in seconds (slept only with ``sleep_backoff=True``)
    backoffs: list[float] = field(default_factory=list)
    #: what the handler returned, once handled
    result: Any = None
    #: the headers its dead-lettered copy carries (``x-rabbitkeys-error``, ``-attempts``,
    #: ``-failed-at``, ``-worker`` added), once dead-lettered
    dead_letter_headers: dict[str, Any] | None = None
    _envelope: Envelope | None = field(default=None, repr=False)
    _reported: bool = field(default=False, repr=False)

    @property
    def error(self) -> BaseException | None:
        """The last failed attempt's exception (None if none failed)."""
        return self.errors[-1] if self.errors else None

    def _move(self, state: JobState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"job {self.sequence} of {self.key!r}: {self.state} -> {state}")
        self.state = state


class JobsFailedError(RabbitkeysError, AssertionError):
    """Jobs failed (dead-lettered or parked) during :meth:`InMemoryWorker.join` (with
    ``check=True``, the default). ``jobs`` lists them; the first one's error is chained
    (``__cause__``), so a test's report shows the handler's traceback. An
    ``AssertionError``, so pytest reports it as a failed assertion."""

    def __init__(self, jobs: Sequence[JobRecord]) -> None:
        self.jobs = list(jobs)
        lines = [
            f"  {job.job_type} {job.key!r} #{job.sequence} {job.state.value} after "
            f"{job.attempts} attempt(s): {_describe(job.error)}"
            for job in self.jobs
        ]
        super().__init__(
            f"{len(self.jobs)} job(s) failed (join(check=False) to inspect failures "
            "instead):\n" + "\n".join(lines)
        )


def _describe(error: BaseException | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"


class _Life(enum.Enum):
    """An InMemoryWorker's life: it runs once, as a Worker does."""

    NEW = "new"
    STARTING = "starting"  # its startup hooks run
    RUNNING = "running"  # jobs can be published
    CLOSED = "closed"  # closed, or its startup failed


@dataclass(eq=False)
class _KeyLine:
    """One key's jobs not yet finished, in order; the head runs (or is parked)."""

    jobs: deque[JobRecord] = field(default_factory=deque)
    runner: asyncio.Task[None] | None = None
    parked: JobRecord | None = None


class InMemoryWorker:
    """Runs ``app`` on jobs published to it, in memory, with a worker's semantics (see the
    module's docstring). ``async with`` runs the app's startup hooks (unless
    ``run_hooks=False``: put test doubles on ``context`` yourself) and, at the end, stops
    what still runs and runs the shutdown hooks.

    ``settings``: the retry policy, ``job_timeout``, ``concurrency``,
    ``sync_handler_threads`` and ``max_message_bytes`` come from it; by default rabbitkeys'
    defaults (not the ``RABBITKEYS_*`` environment: a test does not depend on the shell it
    runs in).
    ``context``: the :class:`~rabbitkeys.Context` hooks and handlers share (a fresh one by
    default). ``user_id``: what ``message.user_id`` says (a Publisher's is the RabbitMQ
    user it connected as). ``sleep_backoff``: sleep a retry's backoff for real."""

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        context: Context | None = None,
        run_hooks: bool = True,
        sleep_backoff: bool = False,
        user_id: str | None = None,
    ) -> None:
        self.app = app
        self.settings = settings if settings is not None else Settings.model_construct()
        self.context = context if context is not None else Context()
        self.policy = RetryPolicy.from_settings(self.settings)
        #: every job published, in publish order
        self.jobs: list[JobRecord] = []
        #: jobs handled, in the order they ended (per key: publish order)
        self.handled: list[JobRecord] = []
        #: jobs dead-lettered, in the order they were (per key: publish order)
        self.dead_letters: list[JobRecord] = []
        self.publisher_id = f"in-memory-{uuid.uuid4().hex[:8]}"
        self._run_hooks = run_hooks
        self._sleep_backoff = sleep_backoff
        self._user_id = user_id
        self._keys: dict[tuple[str, str], _KeyLine] = {}
        self._crashed: list[BaseException] = []
        self._slots: asyncio.Semaphore | None = None
        self._handler_threads: HandlerThreads | None = None
        self._deadlines = Deadlines()
        self._threads: ThreadPoolExecutor | None = None
        self._life = _Life.NEW
        self._next_sequence = 1
        #: handlers running now, and the most that ever ran at once
        self.in_flight = 0
        self.most_in_flight = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> InMemoryWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Run the startup hooks (in order; one that raises: :class:`StartupError`, as a
        worker's, and no shutdown hook runs); then jobs can be published."""
        if self._life is not _Life.NEW:
            raise RuntimeError("an InMemoryWorker runs once: make a new one")
        self._life = _Life.STARTING
        self._threads = ThreadPoolExecutor(
            max_workers=self.settings.sync_handler_threads, thread_name_prefix="rabbitkeys-test"
        )
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._handler_threads = HandlerThreads(self.settings.sync_handler_threads)
        self._handler_threads.pool = self._threads
        hooks = self.app.startup_hooks if self._run_hooks else ()
        try:
            for hook in hooks:
                try:
                    await self._call_hook(hook)
                except Exception as error:
                    raise StartupError(
                        f"startup hook {hook_name(hook)} failed: {type(error).__name__}: {error}"
                    ) from error
        except BaseException:  # a failed hook, or the test cancelled
            self._life = _Life.CLOSED
            self._threads.shutdown(wait=False)
            raise
        self._life = _Life.RUNNING

    async def close(self) -> None:
        """Stop: what still runs or waits is cancelled where it is (call :meth:`join` first
        to finish it), then the shutdown hooks run (what one raises is logged, as by a
        worker) and the thread pool stops."""
        if self._life is not _Life.RUNNING:
            return
        self._life = _Life.CLOSED
        runners = [line.runner for line in self._keys.values() if line.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        try:
            if self._run_hooks:
                for hook in self.app.shutdown_hooks:
                    try:
                        await self._call_hook(hook)
                    except Exception:
                        log.exception("shutdown hook %s failed", hook_name(hook))
        finally:
            assert self._threads is not None
            await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)

    async def _call_hook(self, hook: Hook) -> None:
        if is_async(hook):
            await hook(self.context)
        else:
            await asyncio.get_running_loop().run_in_executor(self._threads, hook, self.context)

    # --- publishing -----------------------------------------------------------------------

    async def publish(
        self,
        key: str,
        payload: object,
        *,
        job_type: str = DEFAULT_JOB_TYPE,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> JobRecord:
        """Publish as :meth:`Publisher.publish <rabbitkeys.Publisher.publish>` does (same
        checks, same encoding, same errors before anything is queued: ``InvalidKeyError``,
        ``InvalidMessageError``); the job starts when its key's earlier jobs are done.
        ``timeout`` is accepted for the signature's sake and means nothing here. Returns
        the job's record."""
        if self._life is not _Life.RUNNING:
            raise RuntimeError(
                "the InMemoryWorker is not running: use `async with InMemoryWorker(app) as w`"
            )
        ref = KeyRef.of(key, job_type)
        body, content_type = encode_body(payload, self.settings.max_message_bytes)
        sequence = self._next_sequence
        properties = encode_envelope(
            ref,
            publisher_id=self.publisher_id,
            sequence=sequence,
            delivery_mode=_PERSISTENT,
            user_id=self._user_id,
            content_type=content_type,
            headers=headers,
        )
        self._next_sequence += 1
        (job,) = jobs_of(properties, body)  # what a worker reads back from the delivery
        record = JobRecord(
            job_type=ref.job_type,
            key=ref.key,
            payload=payload,
            body=body,
            content_type=content_type,
            headers=job.envelope.headers,
            sequence=sequence,
            _envelope=job.envelope,
        )
        self.jobs.append(record)
        line = self._keys.setdefault((ref.job_type, ref.key), _KeyLine())
        line.jobs.append(record)
        self._run(line)
        return record

    # --- what happened --------------------------------------------------------------------

    @property
    def parked(self) -> list[JobRecord]:
        """The jobs at the head of parked keys, in publish order."""
        return [job for job in self.jobs if job.state is JobState.PARKED]

    def of(self, key: str, job_type: str = DEFAULT_JOB_TYPE) -> list[JobRecord]:
        """The jobs published for ``key`` (of ``job_type``), in publish order."""
        return [job for job in self.jobs if job.key == key and job.job_type == job_type]

    async def join(self, *, check: bool = True) -> None:
        """Wait until every key is idle or parked (jobs that handlers publish meanwhile
        included). With ``check`` (the default) raise :class:`JobsFailedError` if a job was
        dead-lettered or parked since the last ``join`` (each failure is reported once; a
        test of failures passes ``check=False`` and reads ``dead_letters`` / ``parked``)."""
        while True:
            if self._crashed:
                raise self._crashed[0]
            runners = [line.runner for line in self._keys.values() if line.runner is not None]
            if not runners:
                break
            await asyncio.wait(runners)
        failed = [
            job
            for job in self.jobs
            if job.state in (JobState.DEAD_LETTERED, JobState.PARKED) and not job._reported
        ]
        for job in failed:
            job._reported = True
        if check and failed:
            raise JobsFailedError(failed) from failed[0].error

    # --- operating parked keys ------------------------------------------------------------

    async def resume(self, key: str, *, job_type: str = DEFAULT_JOB_TYPE) -> None:
        """As ``rabbitkeys resume``: retry the parked key's head job with fresh attempts,
        then go on with the key. Raises ``ValueError`` if the key is not parked."""
        line, job = self._parked_line(key, job_type)
        line.parked = None
        job._reported = False  # if it fails again, that is news
        self._run(line)

    async def skip(self, key: str, *, job_type: str = DEFAULT_JOB_TYPE) -> None:
        """As ``rabbitkeys skip``: dead-letter the parked key's head job with its error,
        then go on with the key's next job. Raises ``ValueError`` if the key is not parked."""
        line, job = self._parked_line(key, job_type)
        line.parked = None
        line.jobs.popleft()
        self._dead_letter(job, job.error or RuntimeError("skipped"))
        self._run(line)

    def _parked_line(self, key: str, job_type: str) -> tuple[_KeyLine, JobRecord]:
        line = self._keys.get((job_type, key))
        if line is None or line.parked is None:
            raise ValueError(f"key {key!r} of job type {job_type!r} is not parked")
        return line, line.parked

    # --- running --------------------------------------------------------------------------

    def _run(self, line: _KeyLine) -> None:
        """Start the key's runner unless it runs already or the key is parked."""
        if line.runner is None and line.parked is None and line.jobs:
            line.runner = asyncio.create_task(self._run_key(line))
            line.runner.add_done_callback(functools.partial(self._runner_done, line))

    def _runner_done(self, line: _KeyLine, runner: asyncio.Task[None]) -> None:
        if line.runner is runner:
            line.runner = None
        error = None if runner.cancelled() else runner.exception()
        if error is not None:  # not a handler's error (those are recorded): a bug to show
            self._crashed.append(error)

    async def _run_key(self, line: _KeyLine) -> None:
        """The key's jobs, one at a time, in order, until none is left or the key parks."""
        while line.jobs:
            job = line.jobs[0]
            if not await self._handle(job):
                line.parked = job
                return
            line.jobs.popleft()

    async def _handle(self, job: JobRecord) -> bool:
        """Run a job's attempts in the worker's own job-run core; False if it parks its key."""
        assert job._envelope is not None
        job._move(JobState.RUNNING)
        job.attempts = 0
        to_run = JobToRun(job._envelope, job.body, job.content_type, job.key, job.job_type, False)
        match await run_attempts(route_of(self.app, job.job_type), to_run, _JobPorts(self, job)):
            case JobEnd.HANDLED:
                job._move(JobState.HANDLED)
                self.handled.append(job)
            case Failure(error=error, step=Park(attempts=attempts)):
                job.errors.append(error)
                job.attempts = attempts
                _log_end(job, "parking", error)
                job._move(JobState.PARKED)
                return False
        return True  # handled or dead-lettered (nothing stops it in memory)

    def _dead_letter(self, job: JobRecord, error: BaseException) -> None:
        job._move(JobState.DEAD_LETTERED)
        self._record_dead_letter(job, error)

    def _record_dead_letter(self, job: JobRecord, error: BaseException) -> None:
        assert job._envelope is not None
        job.dead_letter_headers = dead_letter_headers(
            job._envelope, error=error, attempts=job.attempts, worker_id=WORKER_ID
        )
        self.dead_letters.append(job)


def _log_end(job: JobRecord, what: str, error: BaseException) -> None:
    log.error(
        "key %r of %s: %s after %d attempt(s): %s",
        job.key,
        job.job_type,
        what,
        job.attempts,
        _describe(error),
    )


class _JobPorts:
    """The in-memory worker's ports for one run of a job (the job-run core's
    :class:`~rabbitkeys._worker.job_run.Ports`): the worker's concurrency slots, threads and
    time limits, as a worker's; the job's record written as it goes; the backoff recorded,
    slept only with ``sleep_backoff``; the dead letter kept in a list."""

    __slots__ = ("_record", "_worker", "context", "policy")

    def __init__(self, worker: InMemoryWorker, record: JobRecord) -> None:
        self._worker = worker
        self._record = record
        self.policy = worker.policy
        self.context = worker.context

    async def attempt(
        self, job: JobToRun, route: Route, message: Message[Any], decide: Decide
    ) -> Failure | None:
        """One call through the middleware in a concurrency slot (a sync handler takes a
        thread first, as in a worker), within its time limit."""
        worker, record = self._worker, self._record
        assert worker._slots is not None and worker._handler_threads is not None
        record.attempts = message.attempt
        threads = worker._handler_threads
        limit = time_limit(route, worker.settings.job_timeout, message)
        thread = None if route.is_async else await threads.take(job.job_type, job.key)
        try:
            async with worker._slots:
                worker.in_flight += 1
                worker.most_in_flight = max(worker.most_in_flight, worker.in_flight)
                try:
                    record.result = await call_handler(
                        worker.app, route, message, limit, worker._deadlines, threads, thread
                    )
                except Exception as exc:
                    return decide(exc)
                finally:
                    worker.in_flight -= 1
        finally:
            if thread is not None:
                threads.give_back(thread, route.name)
        return None

    def on_retry(self, job: JobToRun, attempt: int, error: Exception, delay: float) -> None:
        record = self._record
        record.errors.append(error)
        record.attempts = attempt
        log.warning(
            "key %r of %s: attempt %d failed, retrying in %.2fs: %s",
            job.key,
            job.job_type,
            attempt,
            delay,
            _describe(error),
        )
        record.backoffs.append(delay)
        record._move(JobState.RETRYING)

    async def wait(self, delay: float) -> bool:
        # outside the slot, as in a worker: other keys run meanwhile
        await asyncio.sleep(delay if self._worker._sleep_backoff else 0)
        self._record._move(JobState.RUNNING)
        return False  # nothing cuts it: close() cancels the runner instead

    async def dead_letter(self, job: JobToRun, error: Exception, attempts: int) -> None:
        record = self._record
        record.errors.append(error)
        record.attempts = attempts
        _log_end(record, "dead-lettering", error)
        self._worker._dead_letter(record, error)


def run_jobs(
    app: App,
    jobs: Iterable[tuple[str, object] | tuple[str, object, str]],
    settings: Settings | None = None,
    *,
    job_type: str = DEFAULT_JOB_TYPE,
    context: Context | None = None,
    run_hooks: bool = True,
    check: bool = True,
) -> InMemoryWorker:
    """For a sync test: publish ``jobs`` — ``(key, payload)``, of ``job_type``, or ``(key,
    payload, job_type)`` — to an :class:`InMemoryWorker` of ``app``, in order, run them
    until every key is idle or parked, close it and return it to read (``handled``,
    ``dead_letters``, ``parked``...). Raises :class:`JobsFailedError` if a job failed,
    unless ``check=False``. Not from a thread that runs an event loop (an ``async def``
    test): there use :class:`InMemoryWorker`."""

    async def run() -> InMemoryWorker:
        worker = InMemoryWorker(app, settings, context=context, run_hooks=run_hooks)
        async with worker:
            for job in jobs:
                key, payload, *rest = job
                await worker.publish(key, payload, job_type=rest[0] if rest else job_type)
            await worker.join(check=check)
        return worker

    return asyncio.run(run())

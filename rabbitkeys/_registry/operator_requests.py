"""Operators' requests to the leading registry: the one home of answering them.

They come through ``NS.operations`` (``rabbitkeys keys``, ``pause``, ``resume``, ``skip``,
``redrive``; ``_wire.senders`` checks that only an operator's login sends them):

* keys: a page of the key book, with the figures of the last listing of the key queues
  (``_registry.keylist``);
* hold: pause or resume a key or a whole job type (a parked key is resumed too); the book
  decides, its commands are carried out at once and the answer does not wait for them;
* skip (a hold request's third action): dead-letter a parked key's head and resume the key,
  answered once the head is dead-lettered (or why not);
* redrive: dead letters back at the head of their keys (``_registry.redrive`` reads and
  settles them), or a dry run that only counts them.

One :class:`OperatorRequests` per leading session: it works on that session's book, runner
and connection. The registry answers each request in a task of its own, like ensures: a skip
or a redrive waits for the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aio_pika.abc import AbstractConnection

from .._errors import InvalidKeyError, RabbitkeysError
from .._wire.protocol import (
    HoldReply,
    HoldRequest,
    KeysPage,
    KeysRequest,
    RedriveKeySummary,
    RedriveReply,
    RedriveRequest,
)
from .._wire.senders import OperatorRequest
from .._wire.topology import KeyRef, Names
from . import keylist
from .keybook import HoldRefused, KeyBook, SkipHead
from .reconcile import Reconciler
from .redrive import DeadLetteredMessage, DeadLetterSelection, read_dead_letters
from .runner import CommandRunner

__all__ = ["REDRIVE_WAIT", "OperatorReply", "OperatorRequests", "reason_of"]

log = logging.getLogger("rabbitkeys.registry")

#: How long a redrive waits for a key to be let go by its owner and rearranged before its
#: dead letters go back to the dead-letter queue (the key stays held for the redrive; its
#: rearrangement then only rotates, and a new redrive moves them)
REDRIVE_WAIT = 300.0

OperatorReply = KeysPage | HoldReply | RedriveReply


class OperatorRequests:
    """Answers operators' requests for one leading session: its key ``book``, the
    ``runner`` that carries out the book's commands, the ``reconciler``'s last listing of
    the key queues, and the ``connection`` dead letters are read on."""

    def __init__(
        self,
        names: Names,
        book: KeyBook,
        runner: CommandRunner,
        reconciler: Reconciler,
        connection: AbstractConnection,
    ) -> None:
        self._names = names
        self._book = book
        self._runner = runner
        self._reconciler = reconciler
        self._connection = connection

    async def answer(self, request: OperatorRequest) -> OperatorReply:
        if isinstance(request, KeysRequest):
            return self.keys(request)
        if isinstance(request, HoldRequest):
            return await self.hold(request)
        return await self.redrive(request)

    def keys(self, request: KeysRequest) -> KeysPage:
        broker = self._reconciler
        listed_at = broker.listed_at
        stats = broker.queue_stats if listed_at is not None else None
        return keylist.page(self._book, request, stats, listed_at, time.monotonic(), time.time())

    async def hold(self, request: HoldRequest) -> HoldReply:
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
        self._runner.do(commands)
        done = "paused" if request.action == "pause" else "resumed"
        log.info("operator: %s %s", what, done)
        return HoldReply(ok=True, detail=f"{what} {done}"[:1000])

    async def _skip(self, ref: KeyRef, what: str) -> HoldReply:
        outcome = self._runner.expect_skip(ref.id)
        try:
            commands = self._book.skip(ref)
        except HoldRefused as exc:
            outcome.cancel()
            return HoldReply(ok=False, detail=str(exc)[:1000])
        self._runner.do(commands)
        if not any(isinstance(c, SkipHead) and c.key_id == ref.id for c in commands):
            outcome.cancel()
            return HoldReply(ok=False, detail=f"{what}: nothing to skip"[:1000])
        try:
            skipped = await outcome
        except Exception as exc:
            return HoldReply(ok=False, detail=f"{what}: the skip failed: {reason_of(exc)}"[:1000])
        log.info("operator: %s skipped its head (%d jobs dead-lettered)", what, skipped)
        return HoldReply(
            ok=True, detail=f"{what}: {skipped} job(s) dead-lettered; the key resumes"[:1000]
        )

    async def redrive(self, request: RedriveRequest) -> RedriveReply:
        """Dead letters back at the head of their keys (``apply``), or what would be (a dry
        run: nothing moves)."""

        def select(job_type: str, key: str) -> bool:
            return (request.job_type is None or job_type == request.job_type) and (
                request.key is None or key == request.key
            )

        selection = await read_dead_letters(self._connection, self._names, select)
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
        selection: DeadLetterSelection,
        redrive_id: str,
        job_type: str,
        key: str,
        letters: list[DeadLetteredMessage],
    ) -> RedriveKeySummary:
        """One key of a redrive: held, let go by its owner, rearranged; its dead letters
        acked if that went well, else back in the dead-letter queue."""
        runner = self._runner
        error: str | None
        try:
            ref = KeyRef.of(key, job_type)
        except InvalidKeyError as exc:
            error = str(exc)
        else:
            done = runner.hold_dead_letters(redrive_id, ref.id, letters)
            try:
                runner.do(self._book.redrive(ref, redrive_id))
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


def reason_of(error: BaseException) -> str:
    """An error as the reason a reply gives (bounded): a rabbitkeys error says it itself,
    anything else is named by its type."""
    text = str(error) if isinstance(error, RabbitkeysError) else f"{type(error).__name__}: {error}"
    return text[:1000]

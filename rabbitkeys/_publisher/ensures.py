"""The publisher's requests to the registry: the routing keys its lanes ask for.

A lane that needs its key's routing key says ``Ensure`` (:mod:`.lane`); the
:class:`Ensurer` asks the registry and hands each key's answer to its lane with the lane's
own handlers (``ensured``, ``ensure_unavailable``, ``ensure_failed``,
``ensure_interrupted``), exactly as if the key had been asked alone.

**Gathered.** The keys that become due in the same event-loop turn, or while a request is
out, go together: one :class:`~rabbitkeys._wire.protocol.EnsureKeys` and one reply for a
burst of new keys, where an ``EnsureKey`` each cost the registry a delivery, an ack and a
reply each (docs/internals/publisher.md, "A new key"). One request is out at a time; a key
alone still goes at once, as an ``EnsureKey``. The registry answers the keys it has an
answer for within a moment and leaves out the slowest: those are asked again, so one key
whose queue is still being declared holds no other key back.

**Each key as alone.** A key keeps its own deadline (``ensure_timeout`` from when it became
due; asked again after an ``unavailable`` answer, a fresh one, as before); a request waits
for the latest of its keys' deadlines, and a key left out of a reply is asked again only
while its own runs. A refusal (quota, unavailable, error) is that key's; a lost connection
interrupts every key of the request, as it would each request alone.

**An older registry** does not know ``EnsureKeys`` and refuses it as malformed (a plain
``Refused``): the keys of that request and every later one go as ``EnsureKey`` s until
the next connection, which tries gathering again (the registry may have been upgraded).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .._broker.amqp import CHANNEL_ERRORS, TaskSet
from .._broker.control import ControlClient
from .._errors import PublishError, QuotaExceededError, RegistryUnavailableError
from .._wire.protocol import (
    MAX_CONTROL_MESSAGE_BYTES,
    REFUSED_QUOTA_EXCEEDED,
    REFUSED_UNAVAILABLE,
    ControlMessage,
    Ensured,
    EnsureKey,
    EnsureKeys,
    KeysEnsured,
    KeyToEnsure,
    Refused,
)
from .lane import Action, Lane

__all__ = ["BATCHED", "Ensurer"]

log = logging.getLogger("rabbitkeys.publisher")

#: Whether keys are gathered into ``EnsureKeys`` at all. Not a setting: the benchmark of
#: issue 25 turns it off to measure one ``EnsureKey`` per key against it
#: (``rabbitkeys.tools.bench.ensure_batching``).
BATCHED = True

#: Requests out at once. Two (a second one taking the keys that became due while the first
#: is out) measured no better than one on bursts, and no better on churn on RabbitMQ 4.0.5
#: (docs/benchmarks.md, "Issue 25: batched ensures"): one, the fewest control messages.
_MAX_REQUESTS_OUT = 1
#: Most keys in one request; their encoded size is bounded too (see ``_take``).
_MAX_KEYS_PER_REQUEST = 1000
_MAX_REQUEST_BYTES = MAX_CONTROL_MESSAGE_BYTES // 2

# Seconds between asking the registry again for a key whose queue is unavailable (its node
# is down): doubling from the first to the last, with jitter, so that thousands of such
# keys do not ask in step.
_UNAVAILABLE_PAUSE = 0.25
_UNAVAILABLE_PAUSE_MAX = 2.0


def nack_pause(nacks: int) -> float:
    """Seconds to wait before a message nacked ``nacks`` times in a row goes again (before
    jitter): ``_UNAVAILABLE_PAUSE`` doubling up to ``_UNAVAILABLE_PAUSE_MAX``."""
    return min(_UNAVAILABLE_PAUSE_MAX, _UNAVAILABLE_PAUSE * 2.0 ** min(nacks - 1, 8))


@dataclass(eq=False, slots=True)
class _Asking:
    """One lane's ensure, from its ``Ensure`` to the answer handed to the lane."""

    lane: Lane
    stale_routing_key: str | None
    #: the event loop's time after which the key has waited its ``ensure_timeout``
    deadline: float
    #: the next pause after an ``unavailable`` answer
    pause: float = _UNAVAILABLE_PAUSE

    def wire(self) -> KeyToEnsure:
        ref = self.lane.ref
        return KeyToEnsure(
            job_type=ref.job_type, key=ref.key, stale_routing_key=self.stale_routing_key
        )


class Ensurer:
    """Asks the registry for the routing keys the lanes need, gathered (see the module's
    docstring); reports each answer through ``carry_out``."""

    def __init__(
        self,
        ensure_timeout: float,
        control: Callable[[], ControlClient],
        carry_out: Callable[[list[Action]], None],
        background: TaskSet,
    ) -> None:
        self._ensure_timeout = ensure_timeout
        #: the current connection's control client (raises ConnectionError without one)
        self._control = control
        self._carry_out = carry_out
        self._background = background
        self._gathering = BATCHED
        #: keys due and not asked yet, in the order they became due
        self._due: deque[_Asking] = deque()
        self._requests_out = 0  # gathered requests out
        self._flush_planned = False

    def connected(self) -> None:
        """A new connection: it may lead to a registry that gathers (again)."""
        self._gathering = BATCHED

    def ask(self, lane: Lane, stale_routing_key: str | None) -> None:
        """The lane said ``Ensure``."""
        loop = asyncio.get_running_loop()
        asking = _Asking(lane, stale_routing_key, loop.time() + self._ensure_timeout)
        if lane.nacked:
            # refused by the broker: give a queue that lost its node (a quorum leader
            # being elected) a moment, doubling, before the message goes again; as often
            # as it takes: only the message's publish timeout ends this
            pause = nack_pause(lane.nacked) * random.uniform(0.5, 1.0)
            self._background.spawn(self._after(pause, asking))
        else:
            self._make_due(asking)

    async def _after(self, pause: float, asking: _Asking) -> None:
        try:
            await asyncio.sleep(pause)
        except BaseException:
            self._carry_out(asking.lane.ensure_interrupted())  # it must not wait forever
            raise
        asking.deadline = asyncio.get_running_loop().time() + self._ensure_timeout
        self._make_due(asking)

    def _make_due(self, asking: _Asking) -> None:
        if not self._gathering:
            self._background.spawn(self._request([asking]))
            return
        self._due.append(asking)
        self._plan_flush()

    def _plan_flush(self) -> None:
        if not self._flush_planned and self._requests_out < _MAX_REQUESTS_OUT:
            self._flush_planned = True
            # what becomes due in this turn of the event loop goes with it
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_planned = False
        if self._requests_out >= _MAX_REQUESTS_OUT or not self._due:
            return
        if not self._gathering:  # an older registry: every key on its own
            while self._due:
                self._background.spawn(self._request([self._due.popleft()]))
            return
        keys = self._take()
        if keys:
            self._requests_out += 1
            self._background.spawn(self._gathered(keys))

    def _take(self) -> list[_Asking]:
        """The keys due, oldest first, as many as one request carries. A key whose deadline
        passed while it waited for the request before (more keys than one request carries,
        behind one that had no answer) fails now, as it would have alone."""
        taken: list[_Asking] = []
        size = 0
        now = asyncio.get_running_loop().time()
        while self._due and len(taken) < _MAX_KEYS_PER_REQUEST:
            if self._due[0].deadline <= now:
                lane = self._due.popleft().lane
                self._carry_out(lane.ensure_failed(_no_answer(self._ensure_timeout)))
                continue
            item_size = len(self._due[0].wire().model_dump_json()) + 1
            if taken and size + item_size > _MAX_REQUEST_BYTES:
                break
            taken.append(self._due.popleft())
            size += item_size
        return taken

    async def _gathered(self, keys: list[_Asking]) -> None:
        try:
            await self._request(keys)
        finally:
            self._requests_out -= 1
            if self._due:
                self._plan_flush()

    async def _request(self, keys: list[_Asking]) -> None:
        """Ask for ``keys`` in one message (an ``EnsureKey`` for one key) and hand each
        key's answer to its lane."""
        loop = asyncio.get_running_loop()
        request: EnsureKey | EnsureKeys
        if len(keys) == 1:
            wire = keys[0].wire()
            request = EnsureKey(
                job_type=wire.job_type, key=wire.key, stale_routing_key=wire.stale_routing_key
            )
        else:
            request = EnsureKeys(keys=[asking.wire() for asking in keys])
        timeout = max(0.001, max(asking.deadline for asking in keys) - loop.time())
        try:
            reply = await self._control().request(request, timeout=timeout)
        except (RegistryUnavailableError, PublishError) as exc:
            for asking in keys:
                self._carry_out(asking.lane.ensure_failed(exc))
        except (*CHANNEL_ERRORS, ConnectionError) as exc:
            # The connection dropped during the request: ask again once reconnected.
            log.debug("ensure of %d keys interrupted: %r", len(keys), exc)
            for asking in keys:
                self._carry_out(asking.lane.ensure_interrupted())
        except BaseException:
            for asking in keys:
                self._carry_out(asking.lane.ensure_interrupted())  # they must not wait forever
            raise
        else:
            if isinstance(request, EnsureKey):
                self._answered(keys[0], reply)
            elif isinstance(reply, KeysEnsured):
                self._answered_together(keys, reply)
            elif isinstance(reply, Refused):
                self._refused_together(keys, reply)
            else:
                error = PublishError(f"unexpected reply from the registry: {reply.type}")
                for asking in keys:
                    self._carry_out(asking.lane.ensure_failed(error))

    def _answered_together(self, keys: list[_Asking], reply: KeysEnsured) -> None:
        answers: dict[tuple[str, str], list[Ensured | Refused]] = {}
        for one in reply.answers:
            answers.setdefault((one.job_type, one.key), []).append(one.answer)
        now = asyncio.get_running_loop().time()
        for asking in keys:
            ref = asking.lane.ref
            answer = answers.get((ref.job_type, ref.key))
            if answer:
                self._answered(asking, answer.pop(0))
            elif now < asking.deadline:
                # not answered yet (its declare is slow): again, with the next keys; the
                # registry heard of the stale routing key already
                asking.stale_routing_key = None
                self._make_due(asking)
            else:
                self._carry_out(asking.lane.ensure_failed(_no_answer(self._ensure_timeout)))

    def _refused_together(self, keys: list[_Asking], reply: Refused) -> None:
        """A plain refusal of the whole request: a registry older than ``EnsureKeys``."""
        log.info(
            "the registry refused %d keys asked together (%s); asking one by one until the "
            "next connection",
            len(keys),
            reply.reason,
        )
        self._gathering = False
        for asking in keys:
            self._make_due(asking)

    def _answered(self, asking: _Asking, reply: ControlMessage) -> None:
        """Hand the registry's answer for one key to its lane."""
        lane = asking.lane
        if isinstance(reply, Ensured):
            self._carry_out(lane.ensured(reply.routing_key))
        elif isinstance(reply, Refused) and reply.code == REFUSED_UNAVAILABLE:
            if lane.ensure_unavailable(reply.reason):
                pause = asking.pause * random.uniform(0.5, 1.0)
                asking.pause = min(_UNAVAILABLE_PAUSE_MAX, asking.pause * 2)
                self._background.spawn(self._after(pause, asking))
            # else nothing waits any more: the next publish asks again
        elif isinstance(reply, Refused):
            refusal = QuotaExceededError if reply.code == REFUSED_QUOTA_EXCEEDED else PublishError
            self._carry_out(
                lane.ensure_failed(
                    refusal(f"the registry refused key {lane.ref.key!r}: {reply.reason}")
                )
            )
        else:
            error = PublishError(f"unexpected reply from the registry: {reply.type}")
            self._carry_out(lane.ensure_failed(error))


def _no_answer(timeout: float) -> RegistryUnavailableError:
    return RegistryUnavailableError(
        f"the registry did not route the key within {timeout:g}s (ensure_timeout)"
    )

"""A publisher's lanes: the one home of the rule that keeps each key's messages in the order
of the ``publish()`` calls, as a pure, synchronous state machine.

Each key a :class:`~rabbitkeys.Publisher` publishes to has a :class:`Lane`. The publisher
reports what happened (a publish was called, the broker answered, the connection came or
went, the registry answered, a caller gave up); the lane changes its state and answers with
the :data:`Action` s that follow (send these messages on this routing key, ask the registry
to ensure the key, answer a caller, free a message's room). It does no I/O and knows no AMQP:
``tests/publisher/test_lane.py`` drives it through random interleavings without a broker.

A lane's states (:class:`LaneState`):

==========  =====================================  ==========================================
state       meaning                                what moves it
==========  =====================================  ==========================================
UNROUTED    no routing key known: first use, the   a message is queued while connected: ask
            key's routing key came back, or its    the registry (``Ensure`` with the stale
            ensure failed or was cut off           routing key, if any) → ENSURING
ENSURING    an ``EnsureKey`` is out; messages      ``ensured`` → ROUTED, sends what waits;
            queue up behind it; nothing is in      ``ensure_failed`` → UNROUTED, fails what
            flight                                 waits; ``ensure_interrupted`` → UNROUTED
                                                   (asks again on the next connection)
ROUTED      the routing key is known: a queued     a message comes back (``returned``: its
            message goes out at once while         routing key is dead) or is cut off while
            connected, frames in call order        others are in flight → DRAINING; with
                                                   nothing else in flight, straight on
DRAINING    something of the lane must be sent     the last message in flight is answered,
            again (it came back, or was cut off),  or the connection is lost: the messages
            or is in flight on a dead routing      to send again go back in front of the
            key: nothing new goes out, so nothing  queued ones, oldest first → ROUTED (cut
            can overtake it                        off) or UNROUTED (came back)
==========  =====================================  ==========================================

The state changes in :meth:`Lane._advance`, which every event ends with, and in the three
handlers of the registry's answer, which end ENSURING: nowhere else. A lost connection
moves every message in flight back to its lane at once (``on_connection_lost``), so
DRAINING never outlives a connection.

Each message (:class:`Entry`) has a stage (:class:`Stage`): ADMITTING (in the publisher's
``Room`` line, holding nothing) → QUEUED (in its lane, on no connection: withdrawable) →
SENT (written to the current connection, unanswered) → DONE. A SENT message goes back to
QUEUED when it must be sent again. Only :meth:`Lane._done` ends a message, with a
:class:`LeaveRoom`; each caller gets at most one :class:`Answer`.

**Batches.** A lane sends what waits as few AMQP messages as it can: each carries the
entries waiting at the front of the lane, in order, up to ``batch_max_jobs`` and
``batch_max_bytes`` (a larger entry goes alone), and at most ``max_in_flight_per_key`` of a
lane's messages are unconfirmed at a time. What arrives meanwhile waits and leaves as the
next batch once one is answered (the rule of Kafka's producer, per partition), so batches
form by themselves under load and a lone publish still leaves at once. A :class:`Batch` is
one send: the broker's one answer for it answers every entry in it (an ack confirms them
all; a nack, a return or a cut puts them all back in front, in order, to be regrouped when
sent again). With ``batch_linger`` > 0 a lane with fewer than
``batch_max_jobs`` waiting and nothing in flight holds them up to that long (a
:class:`Linger` timer the publisher runs).

Why a returned message can be put back in its place: every binding the registry makes gets a
fresh routing key, so once one message on a routing key comes back, every later message on
it comes back too (docs/internals/wire.md, "Routing keys are fenced").
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .._errors import (
    InvalidMessageError,
    PublishError,
    PublishOutcomeUnknownError,
    RabbitkeysError,
)
from .._wire.topology import KeyRef

__all__ = [
    "MAX_BROKER_CLOSES",
    "Action",
    "Answer",
    "Batch",
    "Caller",
    "Count",
    "Counted",
    "Ensure",
    "Entry",
    "Lane",
    "LaneState",
    "Lanes",
    "Linger",
    "LeaveRoom",
    "Send",
    "Stage",
]

#: The broker closed the channel or connection over something sent on it this many times
#: while a message was on it: that message is given up rather than sent again forever.
MAX_BROKER_CLOSES = 3
# Lanes of idle keys beyond this many are dropped (their routing key is asked for again).
_MAX_IDLE_LANES = 100_000


class LaneState(enum.Enum):
    """Where a lane is; the table in the module docstring says what moves it."""

    UNROUTED = "no routing key"
    ENSURING = "asking the registry for a routing key"
    ROUTED = "routed"
    DRAINING = "waiting for the messages in flight before sending again"


class Stage(enum.Enum):
    """Where a message is. Only QUEUED and SENT hold room; only ``Lane._done`` ends one."""

    ADMITTING = "waiting for room"  # in the Room's line; the publisher holds nothing of it
    QUEUED = "queued"  # in its lane (waiting or to send again), on no connection: withdrawable
    SENT = "sent"  # written to the current connection, no answer yet
    DONE = "done"  # confirmed, failed or withdrawn: holds nothing


class Caller(Protocol):
    """The caller's side of a publish (an ``asyncio.Future``): done once it was answered or
    cancelled. A lane asks it because a cancellation reaches the caller before it reaches
    the lane: a message whose caller is gone is never sent (again)."""

    def done(self) -> bool: ...


@dataclass(eq=False, kw_only=True)
class Entry:
    """One publish() call, from the call until the broker answered for it (or it was
    withdrawn). The publisher adds what it sends (body, properties) in a subclass."""

    sequence: int
    lane: Lane
    caller: Caller
    #: what it counts against max_pending_bytes: body and application headers
    size: int
    #: bytes of its content header frame, when application headers make it worth checking
    header_frame: int = 0
    stage: Stage = Stage.ADMITTING
    #: written to a connection and not known to be refused since: the broker may have it
    may_have_arrived: bool = False
    #: an earlier send of it went down with its connection, unanswered
    lost_a_copy: bool = False
    #: times the broker closed the channel or connection while it was on it
    broker_closes: int = 0
    #: times in a row the broker nacked it (the publisher pauses longer each time before it
    #: goes again); no count fails it: its publish timeout does (``give_up``)
    nacks: int = 0
    #: the broker's last refusal of it (a nack), which its timeout error names
    last_refusal: str | None = None
    #: bytes it takes in a batch (0: ``size``); what ``batch_max_bytes`` bounds
    wire_size: int = 0
    #: the routing key of its latest send
    routing_key: str | None = None
    #: sends so far; an answer names the send it answers, so one for an older send is ignored
    attempt: int = 0
    #: its caller got an Answer (or was cancelled): it gets no other
    answered: bool = False

    @property
    def caller_gone(self) -> bool:
        return self.answered or self.caller.done()


@dataclass(eq=False, slots=True)
class Batch:
    """One AMQP message of a lane: its entries, in order (one: a plain message), sent once
    on ``routing_key``. Every answer names it; one for a batch no longer in flight (its
    connection was given up) is ignored."""

    entries: list[Entry]
    routing_key: str


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``batch`` as one message with its routing key, mandatory and with a confirm;
    report its answer (``acked``, ``refused``, ``returned_unrouted`` or ``cut_off``)."""

    lane: Lane
    batch: Batch

    @property
    def routing_key(self) -> str:
        return self.batch.routing_key

    @property
    def entries(self) -> list[Entry]:
        return self.batch.entries


@dataclass(frozen=True, slots=True)
class Linger:
    """Call ``lane.linger_over(token)`` in ``delay`` seconds (``batch_linger``)."""

    lane: Lane
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class Ensure:
    """Ask the registry to ensure the lane's key (naming the routing key that came back,
    if any); report the reply with ``ensured`` / ``ensure_failed`` / ``ensure_interrupted``."""

    lane: Lane
    stale_routing_key: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the caller: published (``error`` None) or failed with ``error``."""

    entry: Entry
    error: RabbitkeysError | None


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    """The message left the publisher: free its room (``admitted``) or take it out of the
    Room's line (not admitted yet)."""

    entry: Entry
    admitted: bool


class Counted(enum.Enum):
    RETURNED = "a message came back (basic.return) and goes back in its lane"
    RESENT = "a message cut off with its connection goes back in its lane"


@dataclass(frozen=True, slots=True)
class Count:
    """Count an event for the metrics."""

    what: Counted


Action = Send | Ensure | Answer | LeaveRoom | Count | Linger


class Lanes:
    """A publisher's lanes, and what they share: the state of its connection, and the limits
    their timeout errors name."""

    def __init__(
        self,
        *,
        publish_timeout: float,
        room_bounds: str,
        batch_max_jobs: int = 100,
        batch_max_bytes: int = 262_144,
        batch_linger: float = 0.0,
        max_in_flight_per_key: int = 1,
    ) -> None:
        if batch_max_jobs < 1 or batch_max_bytes < 1 or max_in_flight_per_key < 1:
            raise ValueError("batches need room for one job, and one message in flight")
        self.publish_timeout = publish_timeout
        self.batch_max_jobs = batch_max_jobs
        self.batch_max_bytes = batch_max_bytes
        self.batch_linger = batch_linger
        self.max_in_flight_per_key = max_in_flight_per_key
        #: names the Room's bounds, for a publish that never got room
        self.room_bounds = room_bounds
        self._lanes: dict[str, Lane] = {}
        #: whether messages can be written now
        self.connected = False
        #: AMQP's minimum; the connection's negotiated value replaces it on connect
        self.frame_max = 4096
        #: counts connections: an ensure cut off by an older one is asked again at once
        self.session = 0

    def lane(self, ref: KeyRef, exchange: str) -> Lane:
        """The lane of ``ref`` (made on first use; ``exchange`` is where its messages go)."""
        lane = self._lanes.get(ref.id)
        if lane is None:
            if len(self._lanes) >= _MAX_IDLE_LANES:
                self._drop_idle_lanes()
            lane = self._lanes[ref.id] = Lane(ref, exchange, self)
        return lane

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._lanes.values()))

    def __len__(self) -> int:
        return len(self._lanes)

    def on_connected(self, frame_max: int) -> list[Action]:
        """A connection is up: every lane sends (or asks for a routing key) what waits."""
        self.connected = True
        self.frame_max = frame_max
        self.session += 1
        return [action for lane in self for action in lane._advance()]

    def on_connection_lost(self, broker_closed: str | None) -> list[Action]:
        """The connection is gone (``broker_closed``: why, when the broker closed it over
        something sent on it). Every message in flight goes back to its lane to be sent
        again on the next connection; not left to the old channel's answers, which on an
        abrupt loss some never get."""
        self.connected = False
        return [action for lane in self for action in lane._connection_lost(broker_closed)]

    def _drop_idle_lanes(self) -> None:
        """Forget the oldest lanes with nothing pending (memory stays flat under key churn)."""
        idle = [key_id for key_id, lane in self._lanes.items() if lane.idle]
        for key_id in idle[: len(self._lanes) - _MAX_IDLE_LANES * 9 // 10]:
            del self._lanes[key_id]


class Lane:
    """One key's messages, in call order; see the module docstring for its states."""

    def __init__(self, ref: KeyRef, exchange: str, lanes: Lanes) -> None:
        self.ref = ref
        self.exchange = exchange
        self._lanes = lanes
        self.state = LaneState.UNROUTED
        self.routing_key: str | None = None
        #: the routing key that came back, for the next EnsureKey
        self.stale_routing_key: str | None = None
        #: messages sent on the current connection, awaiting an answer, oldest first (their
        #: entries are SENT); at most ``max_in_flight_per_key``
        self.in_flight: list[Batch] = []
        #: QUEUED, to be sent in this order
        self.waiting: deque[Entry] = deque()
        #: QUEUED, to be sent again once nothing is in flight (returned, or cut off)
        self.returned: list[Entry] = []
        #: messages of the lane not DONE (an idle lane has none and may be dropped)
        self.live = 0
        #: the connection the outstanding EnsureKey went out on
        self._ensure_session = 0
        #: why the registry could not route the key the last time it was asked (its queue
        #: is unavailable), until it routes it
        self.unavailable: str | None = None
        #: names the latest Linger timer (an older one is ignored); whether it is running;
        #: whether it ran out, so what waits goes now whatever its number
        self._linger_token = 0
        self._lingering = False
        self._lingered = False

    def __repr__(self) -> str:
        return f"<Lane {self.ref.id!r} {self.state.name} live={self.live}>"

    @property
    def idle(self) -> bool:
        return self.state is not LaneState.ENSURING and not (
            self.live or self.in_flight or self.waiting or self.returned
        )

    # -- a publish() call --------------------------------------------------------------

    def enter(self, entry: Entry) -> None:
        """A publish() was called: its message waits for room (ADMITTING)."""
        assert entry.lane is self and entry.stage is Stage.ADMITTING
        self.live += 1

    def admit(self, entry: Entry) -> list[Action]:
        """The Room took the message: it joins the lane and holds room until it is done."""
        entry.stage = Stage.QUEUED
        self.waiting.append(entry)
        return self._advance()

    def give_up(self, entry: Entry, timeout: float | None = None) -> list[Action]:
        """``publish_timeout`` (or the publish's own ``timeout``) is over: withdraw the
        message if the broker cannot have it (never written, or returned unrouted), else say
        that it may still arrive. Either way it is not sent (again); a SENT one keeps its room
        until the broker answers for it or the connection is gone (its bytes may still sit in
        the socket's buffers)."""
        if entry.stage is Stage.DONE or entry.answered:
            return []
        if timeout is None:
            timeout = self._lanes.publish_timeout
        error: PublishError
        if entry.may_have_arrived:
            error = PublishOutcomeUnknownError(
                f"the broker did not confirm the message within {timeout:g}s; it was written "
                f"to the connection and may still be delivered (it is not sent again)"
            )
        else:
            if entry.stage is Stage.ADMITTING:
                why = f"the publisher held {self._lanes.room_bounds} all along"
            elif not self._lanes.connected:
                why = "no connection to the broker"
            elif self.unavailable is not None:
                why = self.unavailable
            elif entry.nacks:
                why = (
                    f"the broker refused it {entry.nacks} time{'s' if entry.nacks > 1 else ''}"
                    f" (last: {entry.last_refusal}) and it waited to be sent again"
                )
            elif self.routing_key is None:
                why = "the key was not routed yet"
            else:
                why = "earlier messages of its key were not settled"
            error = PublishError(
                f"the message was not sent within {timeout:g}s ({why}); it was withdrawn "
                f"and will never be delivered"
            )
        return [*self._answer(entry, error), *self._withdraw(entry)]

    def withdraw(self, entry: Entry) -> list[Action]:
        """The caller was cancelled: take the message back unless it is on the connection
        (SENT). The caller gets no Answer from here on."""
        entry.answered = True
        return self._withdraw(entry)

    def _withdraw(self, entry: Entry) -> list[Action]:
        actions: list[Action] = []
        if entry.stage is Stage.QUEUED:
            if entry in self.returned:
                self.returned.remove(entry)
            else:
                self.waiting.remove(entry)  # near the front: callers give up oldest first
            actions = self._done(entry)
        elif entry.stage is Stage.ADMITTING:
            actions = self._done(entry)
        return [*actions, *self._advance()]

    # -- the broker's answer to one message (a batch answers for all its entries) ------

    def acked(self, batch: Batch) -> list[Action]:
        """basic.ack: the message, and so each of its jobs, is in the key's queue."""
        if not self._answers(batch):
            return []
        actions: list[Action] = []
        for entry in batch.entries:
            actions += self._settle(entry, None)
        return [*actions, *self._advance()]

    def refused(self, batch: Batch, what: str) -> list[Action]:
        """basic.nack, or an answer that is none of ack, nack or return: the message was not
        confirmed. A nack is what a queue that went down with its cluster node answers, for
        what it held unconfirmed and for what reaches it until the cluster has noticed
        (often one ``multiple`` nack that covers other keys' messages too), and what a
        quorum queue answers until its new leader is elected. So the jobs go back in their
        place, and once nothing of the lane is in flight the lane asks the registry about
        its routing key, as after a return: the registry finds a queue that is down
        "unavailable", and the lane waits for its node; a queue that is there gets the jobs
        again (the publisher pauses first, longer after each nack in a row: see
        :attr:`nacked`). No count of nacks fails a job: only its publish timeout does
        (``give_up``), as for every other wait, since an election or a node's return can
        take longer than any count of tries would guess."""
        if not self._answers(batch):
            return []
        actions: list[Action] = []
        for entry in batch.entries:
            entry.nacks += 1
            entry.last_refusal = what
            entry.may_have_arrived = entry.lost_a_copy  # the broker did not take this copy
            actions += self._requeue(entry)
            if entry.stage is Stage.QUEUED:
                actions.append(Count(Counted.RESENT))
        if self.routing_key == batch.routing_key:
            self.stale_routing_key, self.routing_key = self.routing_key, None
        return [*actions, *self._advance()]

    def returned_unrouted(self, batch: Batch) -> list[Action]:
        """basic.return: no binding for its routing key any more (key retired, queue expired
        or deleted). Its jobs are not published; they go back in their place, and the lane
        asks for a routing key once nothing of it is in flight."""
        if not self._answers(batch):
            return []
        actions: list[Action] = []
        for entry in batch.entries:
            # No queue took this copy: withdrawing it now is clean, unless an earlier copy
            # went down with a connection (the broker may have routed that one).
            entry.may_have_arrived = entry.lost_a_copy
            actions += self._requeue(entry)
            actions.append(Count(Counted.RETURNED))
        if self.routing_key == batch.routing_key:
            self.stale_routing_key, self.routing_key = self.routing_key, None
        return [*actions, *self._advance()]

    def cut_off(self, batch: Batch) -> list[Action]:
        """The channel or connection went away before the broker answered: send its jobs
        again (the broker may have them: a worker drops the copies)."""
        if not self._answers(batch):
            return []
        return [*self._resend(batch, None), *self._advance()]

    def linger_over(self, token: int) -> list[Action]:
        """The ``batch_linger`` timer ran out: what waits goes, however few."""
        if token != self._linger_token or not self._lingering:
            return []
        self._lingering, self._lingered = False, True
        return self._advance()

    # -- the registry's answer to an Ensure --------------------------------------------

    def ensured(self, routing_key: str) -> list[Action]:
        if self.state is not LaneState.ENSURING:
            return []
        self.unavailable = None
        self.routing_key, self.stale_routing_key = routing_key, None
        self.state = LaneState.ROUTED
        return self._advance()

    @property
    def nacked(self) -> int:
        """How many times in a row the broker refused (nacked) the lane's first message:
        the publisher pauses before it goes again, longer each time (a quorum queue nacks
        for the seconds its leader election takes after a node loss; sending again at once
        would only make more nacks)."""
        if self.returned:
            return self.returned[0].nacks
        return self.waiting[0].nacks if self.waiting else 0

    def ensure_unavailable(self, reason: str) -> bool:
        """The registry says the key's queue exists but cannot be reached now (its cluster
        node is down): the lane keeps ENSURING, and the publisher asks again after a pause,
        while something waits (each message gives up at its own publish timeout, saying
        ``reason``). False once nothing waits: then the lane is UNROUTED again."""
        if self.state is not LaneState.ENSURING:
            return False
        self.unavailable = reason
        if self.waiting:
            return True
        self.state = LaneState.UNROUTED
        return False

    def ensure_failed(self, error: PublishError) -> list[Action]:
        """The registry refused the key or did not answer in time: every message waiting for
        the routing key fails with ``error`` (outcome unknown if an earlier copy may have
        arrived). The next publish of the key asks again."""
        if self.state is not LaneState.ENSURING:
            return []
        self.state = LaneState.UNROUTED
        failed = list(self.waiting)
        self.waiting.clear()
        actions: list[Action] = []
        for entry in failed:
            actions += self._settle(
                entry, _outcome_unknown(error) if entry.may_have_arrived else error
            )
        return actions

    def ensure_interrupted(self) -> list[Action]:
        """The request went down with its connection (or failed unexpectedly): ask again on
        the next connection, or at once if that one is already up."""
        if self.state is not LaneState.ENSURING:
            return []
        self.state = LaneState.UNROUTED
        if self._ensure_session == self._lanes.session:
            return []  # not again on the same connection: its next session asks
        return self._advance()

    # -- the connection ----------------------------------------------------------------

    def _connection_lost(self, broker_closed: str | None) -> list[Action]:
        actions: list[Action] = []
        in_flight, self.in_flight = self.in_flight, []
        for batch in in_flight:
            actions += self._resend(batch, broker_closed)
        return [*actions, *self._advance()]

    def _resend(self, batch: Batch, broker_closed: str | None) -> list[Action]:
        """The jobs of a message cut off unanswered go back to be sent again; one on which the
        broker closed the connection ``MAX_BROKER_CLOSES`` times is given up."""
        actions: list[Action] = []
        for entry in batch.entries:
            entry.lost_a_copy = True
            if broker_closed is not None:
                entry.broker_closes += 1
                if entry.broker_closes >= MAX_BROKER_CLOSES:
                    actions += self._settle(
                        entry,
                        PublishOutcomeUnknownError(
                            f"the broker closed the connection {entry.broker_closes} times "
                            f"while this message was on it (last: {broker_closed}); it is "
                            f"not sent again"
                        ),
                    )
                    continue
            actions += self._requeue(entry)
            if entry.stage is Stage.QUEUED:
                actions.append(Count(Counted.RESENT))
        return actions

    # -- the one place the lane's state changes -----------------------------------------

    def _advance(self) -> list[Action]:
        """Move on as far as the lane's messages and the connection allow, and say what to
        send or ask. Nothing new goes out while something of the lane is in flight on a
        routing key that came back, or while a message to send again waits (it would
        overtake it); once nothing is in flight, those go back in front of the waiting ones."""
        if self.in_flight and (self.returned or self.routing_key is None):
            self.state = LaneState.DRAINING
            return []
        if self.returned:
            self.returned.sort(key=_by_sequence)
            self.waiting.extendleft(reversed(self.returned))
            self.returned.clear()
        if self.state is not LaneState.ENSURING:
            self.state = LaneState.ROUTED if self.routing_key else LaneState.UNROUTED
        if self.state is LaneState.ENSURING or not self.waiting or not self._lanes.connected:
            return []
        if self.state is LaneState.UNROUTED:
            self.state = LaneState.ENSURING
            self._ensure_session = self._lanes.session
            return [Ensure(self, self.stale_routing_key)]
        return self._send_waiting()

    def _send_waiting(self) -> list[Action]:
        """Send what waits, front first, as batches, while fewer than
        ``max_in_flight_per_key`` messages of the lane are unanswered."""
        assert self.state is LaneState.ROUTED and self.routing_key is not None
        lanes = self._lanes
        routing_key = self.routing_key
        frame_max = lanes.frame_max
        max_jobs, max_bytes = lanes.batch_max_jobs, lanes.batch_max_bytes
        waiting = self.waiting
        actions: list[Action] = []
        while waiting and len(self.in_flight) < lanes.max_in_flight_per_key:
            if (
                lanes.batch_linger > 0
                and not self.in_flight
                and not self._lingered
                and len(waiting) < max_jobs
            ):
                if not self._lingering:
                    self._lingering = True
                    self._linger_token += 1
                    actions.append(Linger(self, lanes.batch_linger, self._linger_token))
                break
            entries: list[Entry] = []
            size = 0
            while waiting and len(entries) < max_jobs:
                entry = waiting[0]
                if entry.caller_gone:  # cancelled: publish() withdraws it soon; never sent now
                    waiting.popleft()
                    actions += self._done(entry)
                    continue
                if entry.header_frame > frame_max > 0:  # a new connection, a smaller limit
                    waiting.popleft()
                    actions += self._settle(
                        entry,
                        InvalidMessageError(
                            f"the headers make a content header frame of "
                            f"{entry.header_frame} bytes; the connection's frame_max is now "
                            f"{frame_max} bytes"
                        ),
                    )
                    continue
                size += entry.wire_size or entry.size
                if entries and size > max_bytes:
                    break
                waiting.popleft()
                entry.stage = Stage.SENT
                entry.routing_key = routing_key
                entry.may_have_arrived = True
                entry.attempt += 1
                entries.append(entry)
            if not entries:
                continue
            batch = Batch(entries, routing_key)
            self.in_flight.append(batch)
            actions.append(Send(self, batch))
            self._lingering = self._lingered = False
        return actions

    # -- one message -------------------------------------------------------------------

    def _answers(self, batch: Batch) -> bool:
        """Whether an answer is for a message in flight (not one abandoned with its
        connection): then it no longer is."""
        try:
            self.in_flight.remove(batch)
        except ValueError:
            return False
        return True

    def _requeue(self, entry: Entry) -> list[Action]:
        """A sent message that must be sent again goes back to the lane, unless its caller
        gave up meanwhile (then it is done)."""
        if entry.caller_gone:
            return self._done(entry)
        entry.stage = Stage.QUEUED
        self.returned.append(entry)
        return []

    def _done(self, entry: Entry) -> list[Action]:
        """The one way a message leaves the lane; its room goes to the next in line."""
        stage, entry.stage = entry.stage, Stage.DONE
        if stage is Stage.DONE:
            return []
        self.live -= 1
        return [LeaveRoom(entry, admitted=stage is not Stage.ADMITTING)]

    def _settle(self, entry: Entry, error: RabbitkeysError | None) -> list[Action]:
        """The message is done and its caller gets ``error`` (None: published)."""
        return [*self._done(entry), *self._answer(entry, error)]

    @staticmethod
    def _answer(entry: Entry, error: RabbitkeysError | None) -> list[Action]:
        if entry.caller_gone:
            return []
        entry.answered = True
        return [Answer(entry, error)]


def _by_sequence(entry: Entry) -> int:
    return entry.sequence


def _outcome_unknown(error: PublishError) -> PublishOutcomeUnknownError:
    return PublishOutcomeUnknownError(
        f"{error}; an earlier copy was written to a connection that was lost before the "
        f"broker answered, and may still be delivered (it is not sent again)"
    )

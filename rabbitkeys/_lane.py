"""A publisher's lanes: the one home of the rule that keeps each key's messages in the order
of the ``publish()`` calls, as a pure, synchronous state machine.

Each key a :class:`~rabbitkeys.Publisher` publishes to has a :class:`Lane`. The publisher
reports what happened (a publish was called, the broker answered, the connection came or
went, the registry answered, a caller gave up); the lane changes its state and answers with
the :data:`Action` s that follow (send these messages on this routing key, ask the registry
to ensure the key, answer a caller, free a message's room). It does no I/O and knows no AMQP:
``tests/test_lane.py`` drives it through random interleavings without a broker.

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
:class:`Release`; each caller gets at most one :class:`Answer`.

Why a returned message can be put back in its place: every binding the registry makes gets a
fresh routing key, so once one message on a routing key comes back, every later message on
it comes back too (docs/design.md, "Routing keys are fenced").
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ._errors import (
    InvalidMessageError,
    PublishError,
    PublishOutcomeUnknownError,
    RabbitkeysError,
)
from ._topology import KeyRef

__all__ = [
    "MAX_BROKER_CLOSES",
    "Action",
    "Answer",
    "Caller",
    "Count",
    "Counted",
    "Ensure",
    "Entry",
    "Lane",
    "LaneState",
    "Lanes",
    "Release",
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
    #: the routing key of its latest send
    routing_key: str | None = None
    #: sends so far; an answer names the send it answers, so one for an older send is ignored
    attempt: int = 0
    #: its caller got an Answer (or was cancelled): it gets no other
    answered: bool = False

    @property
    def caller_gone(self) -> bool:
        return self.answered or self.caller.done()


@dataclass(frozen=True, slots=True)
class Send:
    """Write these messages (in this order) with this routing key, each with mandatory and
    a confirm; report each one's answer with its ``attempt``."""

    lane: Lane
    routing_key: str
    entries: list[Entry]


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
class Release:
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


Action = Send | Ensure | Answer | Release | Count


class Lanes:
    """A publisher's lanes, and what they share: the state of its connection, and the limits
    their timeout errors name."""

    def __init__(self, *, publish_timeout: float, room_bounds: str) -> None:
        self.publish_timeout = publish_timeout
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
        #: SENT on the current connection, awaiting an answer
        self.in_flight: set[Entry] = set()
        #: QUEUED, to be sent in this order
        self.waiting: deque[Entry] = deque()
        #: QUEUED, to be sent again once nothing is in flight (returned, or cut off)
        self.returned: list[Entry] = []
        #: messages of the lane not DONE (an idle lane has none and may be dropped)
        self.live = 0
        #: the connection the outstanding EnsureKey went out on
        self._ensure_session = 0

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

    # -- the broker's answer to one send -----------------------------------------------

    def acked(self, entry: Entry, attempt: int) -> list[Action]:
        """basic.ack: the message is in the key's queue."""
        if not self._answers(entry, attempt):
            return []
        return [*self._settle(entry, None), *self._advance()]

    def refused(self, entry: Entry, attempt: int, what: str) -> list[Action]:
        """basic.nack (the broker could not take it: an internal error, a full queue), or an
        answer that is none of ack, nack or return."""
        if not self._answers(entry, attempt):
            return []
        error = PublishError(f"the broker refused the message: {what}")
        if entry.lost_a_copy:  # this copy was refused; an earlier one may have arrived
            error = _outcome_unknown(error)
        return [*self._settle(entry, error), *self._advance()]

    def returned_unrouted(self, entry: Entry, attempt: int) -> list[Action]:
        """basic.return: no binding for its routing key any more (key retired, queue expired
        or deleted). The message is not published; it goes back in its place, and the lane
        asks for a routing key once nothing of it is in flight."""
        if not self._answers(entry, attempt):
            return []
        # No queue took this copy: withdrawing it now is clean, unless an earlier copy went
        # down with a connection (the broker may have routed that one).
        entry.may_have_arrived = entry.lost_a_copy
        actions = self._requeue(entry)
        if self.routing_key == entry.routing_key:
            self.stale_routing_key, self.routing_key = self.routing_key, None
        return [*actions, Count(Counted.RETURNED), *self._advance()]

    def cut_off(self, entry: Entry, attempt: int) -> list[Action]:
        """The channel or connection went away before the broker answered: send it again
        (the broker may have it: a worker drops the copy)."""
        if not self._answers(entry, attempt):
            return []
        entry.lost_a_copy = True
        actions = self._requeue(entry)
        if entry.stage is Stage.QUEUED:
            actions.append(Count(Counted.RESENT))
        return [*actions, *self._advance()]

    # -- the registry's answer to an Ensure --------------------------------------------

    def ensured(self, routing_key: str) -> list[Action]:
        if self.state is not LaneState.ENSURING:
            return []
        self.routing_key, self.stale_routing_key = routing_key, None
        self.state = LaneState.ROUTED
        return self._advance()

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
        for entry in sorted(self.in_flight, key=_by_sequence):
            self.in_flight.discard(entry)
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
        return [*actions, *self._advance()]

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
        assert self.state is LaneState.ROUTED and self.routing_key is not None
        routing_key = self.routing_key
        frame_max = self._lanes.frame_max
        sends: list[Entry] = []
        actions: list[Action] = []
        while self.waiting:
            entry = self.waiting.popleft()
            if entry.caller_gone:  # cancelled: publish() withdraws it soon; never sent now
                actions += self._done(entry)
            elif entry.header_frame > frame_max > 0:  # a new connection, a smaller limit
                actions += self._settle(
                    entry,
                    InvalidMessageError(
                        f"the headers make a content header frame of {entry.header_frame} "
                        f"bytes; the connection's frame_max is now {frame_max} bytes"
                    ),
                )
            else:
                entry.stage = Stage.SENT
                entry.routing_key = routing_key
                entry.may_have_arrived = True
                entry.attempt += 1
                self.in_flight.add(entry)
                sends.append(entry)
        return [Send(self, routing_key, sends), *actions] if sends else actions

    # -- one message -------------------------------------------------------------------

    def _answers(self, entry: Entry, attempt: int) -> bool:
        """Whether an answer is for the entry's current send (not one abandoned with its
        connection): then the entry is no longer in flight."""
        if entry.stage is not Stage.SENT or entry.attempt != attempt:
            return False
        self.in_flight.discard(entry)
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
        return [Release(entry, admitted=stage is not Stage.ADMITTING)]

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

"""A worker's hold on a key: its named states and the one table of transitions (no broker)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitkeys._wire.protocol import KeyAssignment
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys._worker.execution import Park
from rabbitkeys._worker.handoff import TRANSITIONS, HoldState, OwnedKey

A, C, RG, RD = HoldState.ACQUIRING, HoldState.CONSUMING, HoldState.RELEASING, HoldState.RELEASED


def hold() -> OwnedKey:
    ref = KeyRef.of("post 42")
    return OwnedKey(
        KeyAssignment(
            key_id=ref.id, job_type=ref.job_type, key=ref.key, queue=Names("ns").key_queue(ref)
        )
    )


def test_the_transitions_are_the_documented_ones() -> None:
    """The table in docs/internals/worker.md ("A worker's hold on a key")."""
    assert {(old, new) for old, targets in TRANSITIONS.items() for new in targets} == {
        (A, C),  # consume-ok
        (A, RD),  # the consume was refused, or the session ended
        (C, RG),  # a Release, the drain, the broker cancelled the consumer
        (C, RD),  # the session ended
        (RG, RD),  # the buffer is requeued; or the session ended
    }


def test_a_hold_starts_acquiring_and_only_the_first_two_states_are_held() -> None:
    owned = hold()
    assert owned.state is A and owned.key_id == KeyRef.of("post 42").id
    assert [state for state in HoldState if state.held] == [A, C]


def test_a_move_the_table_does_not_list_is_refused_and_changes_nothing() -> None:
    owned = hold()
    with pytest.raises(RuntimeError, match="no transition ACQUIRING -> RELEASING"):
        owned.move(RG)
    assert owned.state is A


@given(st.lists(st.sampled_from(list(HoldState)), max_size=12))
def test_any_sequence_of_moves_follows_the_table_and_released_is_final(
    moves: list[HoldState],
) -> None:
    owned = hold()
    path = [owned.state]
    for to in moves:
        before = owned.state
        try:
            owned.move(to)
        except RuntimeError:
            assert to not in TRANSITIONS[before] and owned.state is before
        else:
            assert to in TRANSITIONS[before]
            path.append(to)
    # states are only ever left forwards, and once released a hold stays released
    order = list(HoldState)
    assert [order.index(state) for state in path] == sorted(order.index(s) for s in path)
    assert len(set(path)) == len(path)
    if RD in path:
        assert path[-1] is RD


def test_every_state_can_end_released() -> None:
    for state in HoldState:
        reachable, frontier = {state}, [state]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in reachable:
                    reachable.add(nxt)
                    frontier.append(nxt)
        assert RD in reachable


def test_a_parked_hold_runs_nothing_more_and_is_held_until_let_go() -> None:
    """Its runner stopped on the failed head (kept unacked at the buffer's head); no new
    runner starts on a delivery; the let-go takes it through RELEASING as any other."""
    owned = hold()
    owned.move(C)
    assert owned.runs
    owned.parked = Park(error="ValueError: no", attempts=3, job_index=0)
    assert not owned.runs and owned.state.held
    owned.move(RG)
    assert not owned.runs


@given(st.sampled_from(list(HoldState)), st.booleans())
def test_a_hold_runs_exactly_while_held_and_not_parked(state: HoldState, parked: bool) -> None:
    owned = hold()
    owned.state = state
    owned.parked = Park("E: x", 1, 0) if parked else None
    assert owned.runs == (state.held and not parked)

"""The Room that bounds what a Publisher holds: pure logic, property-tested (no broker)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitkeys._publisher.room import Room

MAX_ITEMS = 4
MAX_BYTES = 100

# ("ask", size) | ("give_back", index among the held) | ("withdraw", index among the waiting)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.integers(0, MAX_BYTES)),
        st.tuples(st.just("give_back"), st.integers(0, 50)),
        st.tuples(st.just("withdraw"), st.integers(0, 50)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_bounds_hold_room_goes_first_come_first_served_and_nobody_waits_for_nothing(
    ops: list[tuple[str, int]],
) -> None:
    granted: list[int] = []
    room: Room[int] = Room(MAX_ITEMS, MAX_BYTES, granted.append)
    sizes: dict[int, int] = {}
    held: list[int] = []
    line: list[int] = []  # the waiting items, oldest first (the model)
    for number, (op, value) in enumerate(ops):
        if op == "ask":
            sizes[number] = value
            if room.ask(number, value):
                assert not line, "admitted past a waiting item"
                held.append(number)
            else:
                line.append(number)
        elif op == "give_back" and held:
            room.give_back(sizes[held.pop(value % len(held))])
        elif op == "withdraw" and line:
            item = line.pop(value % len(line))
            assert room.withdraw(item)
            assert not room.withdraw(item)
        # grants come in the order of asking, only from the front of the line
        while granted:
            item = granted.pop(0)
            assert line and line[0] == item, "granted out of turn"
            line.pop(0)
            held.append(item)
        assert room.items == len(held) <= MAX_ITEMS
        assert room.bytes == sum(sizes[item] for item in held) <= MAX_BYTES
        assert room.waiting == len(line)
        if line:  # the first waiter really does not fit
            assert room.items == MAX_ITEMS or room.bytes + sizes[line[0]] > MAX_BYTES


def test_an_item_larger_than_the_byte_bound_is_refused_at_once() -> None:
    room: Room[str] = Room(1, 10, lambda _: None)
    with pytest.raises(ValueError, match="never fits"):
        room.ask("big", 11)
    assert (room.items, room.bytes, room.waiting) == (0, 0, 0)


def test_withdrawn_waiters_do_not_pile_up_in_the_line() -> None:
    room: Room[int] = Room(1, 10, lambda _: None)
    assert room.ask(-1, 1)  # holds the only place: everyone else waits
    for item in range(10_000):
        assert not room.ask(item, 1)
        assert room.withdraw(item) if item % 2 else True
    assert room.waiting == 5_000
    assert len(room._line) <= 2 * room.waiting + 16

"""Key-to-worker assignment: rendezvous hashing with bounded load. No broker needed."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitkeys._registry.assignment import _spread, assign, moves, pick

# Small alphabets so that hypothesis also produces duplicates and look-alike names.
names = st.text(alphabet="abcxyz-0189é", min_size=1, max_size=6)
key_lists = st.lists(names, max_size=60)
worker_lists = st.lists(names, min_size=1, max_size=7)
load_factors = st.sampled_from([1.0, 1.1, 1.25, 2.0, math.inf])


def loads_of(assignment: dict[str, str]) -> Counter[str]:
    return Counter(assignment.values())


def capacity(load_factor: float, keys: int, workers: int) -> float:
    return math.inf if math.isinf(load_factor) else math.ceil(load_factor * keys / workers)


# An independent, slow, literal implementation of the documented algorithm, to check the
# module's shortcuts (precomputed spreads, plain-rendezvous fast path) against.
MASK = (1 << 64) - 1


def ref_hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ref_score(key: str, worker: str) -> int:
    # splitmix64's finalizer without its last xorshift, on key_hash ^ worker_hash.
    z = ref_hash(key) ^ ref_hash(worker)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    return ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK


def ref_assign(keys: list[str], workers: list[str], load_factor: float) -> dict[str, str]:
    members = sorted(set(workers))
    distinct = set(keys)
    cap = capacity(load_factor, len(distinct), len(members))
    load: Counter[str] = Counter()
    result = {}
    for key in sorted(distinct, key=lambda k: (_spread(k), k)):
        ranked = sorted(members, key=lambda w: (-ref_score(key, w), w))
        worker = next(w for w in ranked if load[w] < cap)
        load[worker] += 1
        result[key] = worker
    return result


# --- assign: shape and determinism -----------------------------------------------------


@given(keys=key_lists, workers=worker_lists, load_factor=load_factors)
def test_every_key_goes_to_exactly_one_member(
    keys: list[str], workers: list[str], load_factor: float
) -> None:
    result = assign(keys, workers, load_factor=load_factor)
    assert set(result) == set(keys)
    assert set(result.values()) <= set(workers)


@given(keys=key_lists, workers=worker_lists, load_factor=load_factors)
def test_matches_the_literal_algorithm(
    keys: list[str], workers: list[str], load_factor: float
) -> None:
    assert assign(keys, workers, load_factor=load_factor) == ref_assign(keys, workers, load_factor)


def test_no_workers_leaves_keys_unassigned() -> None:
    assert assign(["a", "b"], []) == {}
    assert assign([], []) == {}
    assert assign([], ["w1"]) == {}


@given(data=st.data(), keys=key_lists, workers=worker_lists, load_factor=load_factors)
def test_input_order_and_duplicates_do_not_matter(
    data: st.DataObject, keys: list[str], workers: list[str], load_factor: float
) -> None:
    expected = assign(keys, workers, load_factor=load_factor)
    shuffled_keys = data.draw(st.permutations(keys + keys[:3]))
    shuffled_workers = data.draw(st.permutations(workers + workers[:1]))
    result = assign(iter(shuffled_keys), iter(shuffled_workers), load_factor=load_factor)
    assert result == expected


def test_result_lists_keys_in_input_order() -> None:
    keys = [f"key-{i}" for i in range(50, 0, -1)]
    assert list(assign(keys + keys, ["w1", "w2"], load_factor=1.0)) == keys
    assert list(assign(keys, ["w1", "w2"])) == keys


def test_pinned_output() -> None:
    # The assignment must be the same in every process, on every platform and in every
    # release: a change here reassigns nearly every key of a running deployment.
    keys = [f"order-{i}" for i in range(12)]
    alpha, beta, gamma = "alpha", "beta", "gamma"
    plain = {
        "order-0": alpha, "order-1": gamma, "order-2": gamma, "order-3": alpha,
        "order-4": beta, "order-5": gamma, "order-6": beta, "order-7": beta,
        "order-8": gamma, "order-9": beta, "order-10": alpha, "order-11": beta,
    }  # fmt: skip
    assert assign(keys, [alpha, beta, gamma]) == plain
    assert assign(keys, [alpha, beta, gamma], load_factor=math.inf) == plain
    # load_factor 1.0 caps each worker at 4; beta has 5 favourites, one overflows.
    bounded = dict(plain, **{"order-7": alpha})
    assert assign(keys, [alpha, beta, gamma], load_factor=1.0) == bounded


@pytest.mark.parametrize("key", ["", "ключ", "键🔑", "\ud800lone-surrogate", "a" * 10_000])
def test_any_str_is_a_key(key: str) -> None:
    assert assign([key], ["w1", "w2"])[key] in {"w1", "w2"}
    assert pick(key, ["w1", "w2"], {}, 1) == assign([key], ["w1", "w2"])[key]


def test_a_single_str_is_not_taken_for_a_collection() -> None:
    with pytest.raises(TypeError):
        assign("abc", ["w1"])
    with pytest.raises(TypeError):
        assign(["abc"], "w1")
    with pytest.raises(TypeError):
        pick("abc", "w1", {}, 1)


# --- assign: balance ---------------------------------------------------------------------


@given(keys=key_lists, workers=worker_lists, load_factor=load_factors)
def test_no_worker_exceeds_capacity(
    keys: list[str], workers: list[str], load_factor: float
) -> None:
    result = assign(keys, workers, load_factor=load_factor)
    k, n = len(set(keys)), len(set(workers))
    if k >= n:
        assert max(loads_of(result).values()) <= capacity(load_factor, k, n)


@pytest.mark.parametrize("load_factor", [1.0, 1.25])
def test_balance_at_scale(load_factor: float) -> None:
    keys = [f"tenant-{i}" for i in range(10_000)]
    workers = [f"worker-{i}" for i in range(7)]
    loads = loads_of(assign(keys, workers, load_factor=load_factor))
    assert max(loads.values()) <= math.ceil(load_factor * 10_000 / 7)
    assert sum(loads.values()) == 10_000


def test_large_load_factor_is_plain_rendezvous() -> None:
    keys = [f"k{i}" for i in range(300)]
    workers = ["w1", "w2", "w3"]
    plain = {key: max(sorted(workers), key=lambda w: ref_score(key, w)) for key in keys}
    assert assign(keys, workers, load_factor=math.inf) == plain
    assert assign(keys, workers, load_factor=1e300) == plain


@pytest.mark.parametrize("bad", [0.0, 0.99, -1.0, math.nan])
def test_load_factor_below_one_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="load_factor"):
        assign(["a"], ["w1"], load_factor=bad)
    with pytest.raises(ValueError, match="load_factor"):
        pick("a", ["w1"], {}, 1, load_factor=bad)


# --- assign: movement ----------------------------------------------------------------------

TEN_THOUSAND = [f"key-{i}" for i in range(10_000)]
FOUR = [f"worker-{i}" for i in range(4)]
FIVE = [*FOUR, "worker-4"]


@pytest.mark.parametrize("load_factor", [1.0, 1.25])
def test_join_moves_about_one_nth(load_factor: float) -> None:
    before = assign(TEN_THOUSAND, FOUR, load_factor=load_factor)
    after = assign(TEN_THOUSAND, FIVE, load_factor=load_factor)
    ideal = len(TEN_THOUSAND) / len(FIVE)
    assert len(moves(before, after)) <= 1.1 * ideal


@pytest.mark.parametrize("load_factor", [1.0, 1.25])
def test_leave_moves_about_one_nth(load_factor: float) -> None:
    before = assign(TEN_THOUSAND, FIVE, load_factor=load_factor)
    after = assign(TEN_THOUSAND, FOUR, load_factor=load_factor)
    ideal = len(TEN_THOUSAND) / len(FIVE)
    assert len(moves(before, after)) <= 1.1 * ideal


@given(keys=key_lists, workers=st.lists(names, min_size=2, max_size=7, unique=True))
def test_unbounded_leave_moves_only_the_leavers_keys(keys: list[str], workers: list[str]) -> None:
    before = assign(keys, workers, load_factor=math.inf)
    leaver = workers[-1]
    after = assign(keys, workers[:-1], load_factor=math.inf)
    for old, _ in moves(before, after).values():
        assert old == leaver


@given(keys=key_lists, workers=st.lists(names, min_size=2, max_size=7, unique=True))
def test_unbounded_join_moves_keys_only_to_the_newcomer(
    keys: list[str], workers: list[str]
) -> None:
    before = assign(keys, workers[:-1], load_factor=math.inf)
    after = assign(keys, workers, load_factor=math.inf)
    for _, new in moves(before, after).values():
        assert new == workers[-1]


# --- pick ------------------------------------------------------------------------------------


@given(keys=st.lists(names, min_size=1, max_size=40), workers=worker_lists)
def test_pick_agrees_with_assign_for_the_first_key(keys: list[str], workers: list[str]) -> None:
    first = min(set(keys), key=lambda k: (_spread(k), k))
    assert pick(first, workers, {}, len(set(keys))) == assign(keys, workers)[first]


@given(keys=key_lists, workers=worker_lists, load_factor=load_factors)
def test_pick_replays_assign(keys: list[str], workers: list[str], load_factor: float) -> None:
    # Given the loads assign() had reached when it came to each key, and the same total,
    # pick() makes the same choice.
    expected = assign(keys, workers, load_factor=load_factor)
    loads: Counter[str] = Counter()
    total = len(set(keys))
    for key in sorted(set(keys), key=lambda k: (_spread(k), k)):
        worker = pick(key, reversed(workers), loads, total, load_factor=load_factor)
        assert worker == expected[key]
        loads[worker] += 1


def test_pick_skips_full_workers() -> None:
    workers = ["w1", "w2", "w3"]
    ranked = sorted(workers, key=lambda w: -ref_score("new-key", w))
    # 7 keys (6 + the new one) over 3 workers at 1.25: capacity ceil(2.92) = 3.
    full_favourite = {ranked[0]: 3, ranked[1]: 2, ranked[2]: 1}
    assert pick("new-key", workers, full_favourite, 7) == ranked[1]
    two_full = {ranked[0]: 3, ranked[1]: 3}
    assert pick("new-key", workers, two_full, 7) == ranked[2]
    below = {ranked[0]: 2, ranked[1]: 0, ranked[2]: 0}
    assert pick("new-key", workers, below, 7) == ranked[0]


def test_pick_falls_back_to_the_favourite_when_all_are_full() -> None:
    workers = ["w1", "w2", "w3"]
    favourite = max(workers, key=lambda w: ref_score("new-key", w))
    assert pick("new-key", workers, dict.fromkeys(workers, 9), 7) == favourite


def test_pick_without_workers_is_none() -> None:
    assert pick("a", [], {"gone": 1}, 2) is None


def test_pick_ignores_loads_of_non_members() -> None:
    favourite = pick("a", ["w1", "w2"], {}, 1)
    assert pick("a", ["w1", "w2"], {"gone": 100}, 101) == favourite


# --- moves -----------------------------------------------------------------------------------


def test_moves_lists_changed_new_and_released_keys() -> None:
    before = {"same": "w1", "moved": "w1", "released": "w2"}
    after = {"same": "w1", "moved": "w2", "new": "w3"}
    assert moves(before, after) == {
        "moved": ("w1", "w2"),
        "released": ("w2", None),
        "new": (None, "w3"),
    }
    assert moves(before, before) == {}
    assert moves({}, {}) == {}


@given(
    before=st.dictionaries(names, names, max_size=20),
    after=st.dictionaries(names, names, max_size=20),
)
def test_applying_moves_turns_before_into_after(
    before: dict[str, str], after: dict[str, str]
) -> None:
    result = dict(before)
    for key, (old, new) in moves(before, after).items():
        assert before.get(key) == old
        assert old != new
        if new is None:
            del result[key]
        else:
            result[key] = new
    assert result == after

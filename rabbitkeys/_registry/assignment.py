"""Which worker owns which key: rendezvous (highest-random-weight) hashing with bounded load.

Every key gets a pseudo-random score against every worker and goes to the worker with the
highest score. That choice is why:

* **a membership change moves about 1/N of the keys.** When a worker joins, a key moves
  only if the newcomer now scores highest for it (about 1/N of the keys); when a worker
  leaves, only the keys it owned move. A modulo scheme (``hash % N``) would move almost
  every key, and every move costs a drain-and-hand-over of a key queue.
* **there is no state to store or agree on.** The owner is a pure function of the key and
  the set of live workers, so the registry can restart, or a second one can compute the
  same answer, without persisting or replicating a ring. Consistent hashing on a ring
  would move as few keys but needs many virtual nodes per worker to spread evenly.
* **it is deterministic across processes.** Scores come from BLAKE2b, not from ``hash()``,
  which Python randomizes per process for ``str``.

Plain rendezvous spreads keys evenly only on average: with few keys one worker can get
noticeably more than its share. So each worker also has a *capacity*,
``ceil(load_factor * K / N)``, and a key whose favourite worker is full goes to its next
favourite (the "bounded load" variant of consistent hashing, Mirrokni et al. 2018). Keys
are placed in a fixed order (by key hash) so that the same keys overflow the same way on
every run. When no worker's plain share exceeds the capacity, which is the usual case
with the default ``load_factor`` of 1.25 and a couple of hundred keys per worker or more,
the result *is* plain rendezvous and keeps its minimal-movement property exactly.

Changing :func:`_hash64` or :func:`_scores` reassigns almost every key on upgrade: the
tests pin known outputs so that such a change cannot slip in unnoticed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping

__all__ = ["assign", "moves", "pick"]

_DEFAULT_LOAD_FACTOR = 1.25

_MASK64 = (1 << 64) - 1
# The two multipliers of the splitmix64 finalizer (Steele, Lea & Flood 2014; constants
# from Stafford's "Mix13"): together with the xorshifts they make every high output bit
# depend on every input bit.
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _hash64(text: str) -> int:
    """A stable 64-bit hash of ``text``, the same in every process and on every platform."""
    # "surrogatepass" so that any str, even one with lone surrogates, can be hashed.
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _spread(text: str) -> int:
    """``_hash64(text)`` after the first step of the mixer, ``h ^ (h >> 30)``.

    That step is linear over XOR: for x = key_hash ^ worker_hash,
    ``x ^ (x >> 30) == spread(key) ^ spread(worker)``. Doing it once per key and once
    per worker instead of once per pair saves two of the nine operations per pair.
    """
    hashed = _hash64(text)
    return hashed ^ (hashed >> 30)


def _scores(key_spread: int, worker_spreads: list[int]) -> list[int]:
    """The score of one key against each worker.

    It is the splitmix64 finalizer of key_hash ^ worker_hash (its first step done in
    :func:`_spread`), minus the final ``z ^ (z >> 31)``: that step leaves the top 31 bits
    as they are, so it would change which score is higher only when those bits tie, about
    once in 2**31 comparisons, which is not worth its cost.

    BLAKE2b runs once per key and once per worker; this cheap mixer combines them per
    pair, which is what keeps 100,000 keys x 4 workers well under a second. XOR alone
    would not do: the ranking of the workers would follow the key's high bits and be
    much the same for many keys.
    """
    # Written out rather than calling a mixer per pair: a call per pair would cost about
    # as much as the arithmetic.
    scores = []
    for worker_spread in worker_spreads:
        z = ((key_spread ^ worker_spread) * _MUL1) & _MASK64
        scores.append(((z ^ (z >> 27)) * _MUL2) & _MASK64)
    return scores


def _favourites(key_spreads: list[int], worker_spreads: list[int]) -> list[int]:
    """For each key, the index of its highest-scoring worker: ``_ranked(...)[0]``, faster.

    This is the hot loop of :func:`assign` (keys x workers), so the mixer of
    :func:`_scores` is repeated here and the best score kept as it goes, without a list
    per key; that saves about a quarter of the scoring time. The tests check both
    against a literal implementation. Strict ``>`` keeps the first of equal scores, the
    worker with the smaller name, as :func:`_ranked` does.
    """
    favourites = []
    for key_spread in key_spreads:
        best_score = -1
        best = 0
        for index, worker_spread in enumerate(worker_spreads):
            z = ((key_spread ^ worker_spread) * _MUL1) & _MASK64
            z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
            if z > best_score:
                best_score = z
                best = index
        favourites.append(best)
    return favourites


def _ranked(scores: list[int]) -> list[int]:
    """Worker indices from highest to lowest score.

    Scores of one key tie only if two worker hashes collide; the sort is stable and the
    workers are sorted by name, so a tie then goes to the smaller name, as in
    ``scores.index(max(scores))``.
    """
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)


def _check_load_factor(load_factor: float) -> None:
    # "not >=" also rejects NaN. Below 1.0 the capacities could not hold every key.
    if not load_factor >= 1.0:
        raise ValueError(f"load_factor must be >= 1.0, got {load_factor!r}")


def _check_collection(value: object, name: str) -> None:
    # A str is an Iterable[str] too, and would silently be taken as its characters.
    if isinstance(value, str):
        raise TypeError(f"{name} must be an iterable of str, not a single str")


def _capacity(load_factor: float, total_keys: int, worker_count: int) -> float:
    """How many keys one worker may hold: ceil(load_factor * total_keys / worker_count).

    Infinite (no bound) if ``load_factor`` is infinite or so large that the product
    overflows, which gives plain rendezvous.
    """
    # Checked first: inf * 0 keys would be NaN.
    if math.isinf(load_factor):
        return math.inf
    bound = load_factor * total_keys / worker_count
    return bound if math.isinf(bound) else math.ceil(bound)


def _members(workers: Iterable[str]) -> tuple[list[str], list[int]]:
    """Distinct worker names, sorted so that input order never matters, and their spreads."""
    names = sorted(set(workers))
    return names, [_spread(name) for name in names]


def assign(
    keys: Iterable[str], workers: Iterable[str], *, load_factor: float = _DEFAULT_LOAD_FACTOR
) -> dict[str, str]:
    """Map every key to one worker.

    Each key goes to its highest-scoring worker that holds fewer than
    ``ceil(load_factor * K / N)`` keys, keys taken in order of their hash (ties by key),
    K and N counting distinct keys and workers. No worker then holds more than that.

    Empty ``workers`` gives ``{}``: the keys stay unassigned. Duplicate keys or workers
    are fine (deduplicated), and the order of either never changes which worker a key
    gets. The result lists the keys in the order they first appear in ``keys``.

    Raises ValueError if ``load_factor`` is below 1.0 (or NaN); ``float("inf")`` gives
    plain rendezvous hashing.
    """
    _check_load_factor(load_factor)
    _check_collection(keys, "keys")
    _check_collection(workers, "workers")
    names, worker_spreads = _members(workers)
    if not names:
        return {}

    # First pass, in no particular order: every key's favourite worker (plain rendezvous).
    # dict.fromkeys rather than set: it deduplicates but keeps the caller's order, so the
    # result lists keys the same way in every process (a set of str would not).
    unique_keys = list(dict.fromkeys(keys))
    key_spreads = [_spread(key) for key in unique_keys]
    chosen = _favourites(key_spreads, worker_spreads)
    plain_loads = [0] * len(names)
    for favourite in chosen:
        plain_loads[favourite] += 1

    capacity = _capacity(load_factor, len(unique_keys), len(names))
    # If no favourite is over capacity, placing keys one by one in any order never meets
    # a full favourite, so the bounded result is exactly this one. That is the usual
    # case, and it skips the sort below.
    if max(plain_loads) > capacity:
        _place_bounded(unique_keys, key_spreads, worker_spreads, chosen, capacity)
    return dict(zip(unique_keys, map(names.__getitem__, chosen), strict=True))


def _place_bounded(
    keys: list[str],
    key_spreads: list[int],
    worker_spreads: list[int],
    chosen: list[int],
    capacity: float,
) -> None:
    """Redo ``chosen`` (each key's favourite on entry) so that no load exceeds ``capacity``.

    Keys are placed greedily in a fixed order, by spread hash (a bijection of the key's
    hash) and then by key, never by the caller's order, so that the same keys overflow to
    the same next-best workers on every run, in every process and after a membership
    change, which is what keeps the movement near 1/N even when the bound bites.
    """
    loads = [0] * len(worker_spreads)
    # The keys are distinct, so the tuples never get as far as comparing the index.
    order = sorted(zip(key_spreads, keys, range(len(keys)), strict=True))
    for _, _, index in order:
        worker = chosen[index]
        if loads[worker] >= capacity:
            ranked = _ranked(_scores(key_spreads[index], worker_spreads))
            worker = _first_below(ranked, loads.__getitem__, capacity)
            chosen[index] = worker
        loads[worker] += 1


def _first_below(ranked: list[int], load_of: Callable[[int], int], capacity: float) -> int:
    """The first of ``ranked`` whose load is below ``capacity``, else the first of all."""
    for index in ranked:
        if load_of(index) < capacity:
            return index
    # Only pick() gets here (capacities in assign() always add up to at least K): the
    # key must go somewhere, and its favourite keeps movement minimal.
    return ranked[0]


def pick(
    key: str,
    workers: Iterable[str],
    loads: Mapping[str, int],
    total_keys: int,
    *,
    load_factor: float = _DEFAULT_LOAD_FACTOR,
) -> str | None:
    """Place one new key incrementally, e.g. when it appears between two rebalances.

    Returns the highest-scoring worker whose current load (``loads.get(worker, 0)``) is
    below ``ceil(load_factor * total_keys / N)``, where ``total_keys`` counts the new key
    too; if every worker is at capacity, the highest-scoring worker. ``None`` if there are
    no workers. Given the loads :func:`assign` had reached when it came to this key, and
    the same total, this returns what :func:`assign` chose.

    Raises ValueError if ``load_factor`` is below 1.0 (or NaN).
    """
    _check_load_factor(load_factor)
    _check_collection(workers, "workers")
    names, worker_spreads = _members(workers)
    if not names:
        return None
    capacity = _capacity(load_factor, total_keys, len(names))
    ranked = _ranked(_scores(_spread(key), worker_spreads))
    return names[_first_below(ranked, lambda index: loads.get(names[index], 0), capacity)]


def moves(
    before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, tuple[str | None, str | None]]:
    """Keys whose owner differs: key -> (old owner or None, new owner or None).

    A key only in ``before`` was released, one only in ``after`` is newly assigned.
    """
    changed: dict[str, tuple[str | None, str | None]] = {}
    for key, old in before.items():
        new = after.get(key)
        if new != old:
            changed[key] = (old, new)
    for key, new in after.items():
        if key not in before:
            changed[key] = (None, new)
    return changed

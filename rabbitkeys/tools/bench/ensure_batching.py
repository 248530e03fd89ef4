"""New keys asked together (``EnsureKeys``) against one ``EnsureKey`` per key, measured in one
run (issue 25; docs/benchmarks.md, "Issue 25: batched ensures").

``python -m rabbitkeys.tools.bench.ensure_batching [--rounds 3] [--keys 1000]
[--workloads churn,bursts]``

Each round runs ``rabbitkeys bench``'s rabbitkeys strategy on two workloads, once with the
publisher gathering its ensures and once asking one key per request
(:data:`rabbitkeys._publisher.ensures.BATCHED`, a switch for this measurement only), the
order alternating from round to round: ``churn`` (``--keys`` new keys, one message each: new
keys per second end to end) and ``bursts`` (``--keys`` new keys x 10: jobs per second). It
prints each round's figures and the ratio gathered / one by one, and the median ratio. The
broker is the one the ``RABBITKEYS_*`` environment names, as for ``rabbitkeys bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from ..._publisher import ensures
from ..._settings import load_settings
from .runner import run_strategy
from .workloads import make_workload

__all__ = ["main"]

_MODES = {"gathered": True, "one by one": False}


async def _measure(workload_name: str, messages: int, gathered: bool, workers: int) -> float:
    ensures.BATCHED = gathered
    try:
        result = await run_strategy(
            "rabbitkeys",
            make_workload(workload_name, messages),
            load_settings(),
            workers=workers,
            partitions=12,
            work_ms=1.0,
        )
    finally:
        ensures.BATCHED = True
    if result.lost or result.order_violations:
        raise RuntimeError(
            f"{workload_name}: {result.lost} lost, {result.order_violations} out of order"
        )
    if workload_name == "churn":
        return result.extra["new_keys_per_second"]
    return result.throughput


async def _run(rounds: int, keys: int, workers: int, workloads: list[str]) -> None:
    ratios: dict[str, list[float]] = {name: [] for name in workloads}
    sizes = {"churn": keys, "bursts": keys * 10}
    for number in range(rounds):
        order = list(_MODES) if number % 2 == 0 else list(reversed(_MODES))
        for workload_name in workloads:
            messages = sizes[workload_name]
            figures = {}
            for mode in order:
                figures[mode] = await _measure(workload_name, messages, _MODES[mode], workers)
            ratio = figures["gathered"] / figures["one by one"]
            ratios[workload_name].append(ratio)
            unit = "new keys/s" if workload_name == "churn" else "jobs/s"
            print(
                f"round {number + 1} {workload_name:>6}: gathered {figures['gathered']:7,.0f} "
                f"{unit}, one by one {figures['one by one']:7,.0f} {unit}: {ratio:.2f} x",
                flush=True,
            )
    for workload_name, values in ratios.items():
        print(
            f"{workload_name:>6}: gathered / one by one, median of {rounds}: "
            f"{statistics.median(values):.2f} x (each: {', '.join(f'{v:.2f}' for v in values)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--workloads", default="churn,bursts", help="of churn,bursts")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    if not set(workloads) <= {"churn", "bursts"}:
        parser.error("--workloads: churn, bursts or both")
    asyncio.run(_run(args.rounds, args.keys, args.workers, workloads))


if __name__ == "__main__":
    main()

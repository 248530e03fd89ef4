"""One ``rabbitkeys bench`` run over one or more brokers: every strategy on every workload
on each broker in turn, beside churn new keys by hand on each, then the raw declare + bind
rate on each; all of it ``rounds`` times, the median kept.

Runs alternate between the brokers (a workload and strategy on one broker, then on the
next) and rounds repeat the whole sequence, so that load drift on a shared machine hits
every broker and every figure alike: the ratios are what to read.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiormq.exceptions import AMQPError

from ..._errors import RabbitkeysError
from .brokers import BenchBroker
from .by_hand import ByHand, measure_by_hand_new_keys
from .report import BrokerColumn
from .runner import Result, applies, measure_declare_rate, run_strategy
from .workloads import make_workload

__all__ = ["BenchPlan", "run_side_by_side"]

#: what fails one run without ending the others: the broker or the run itself
FAILURES = (RabbitkeysError, RuntimeError, TimeoutError, OSError, AMQPError)


@dataclass(frozen=True)
class BenchPlan:
    """What to run on each broker, as ``rabbitkeys bench`` was told."""

    workloads: list[str]
    strategies: list[str]
    messages: int
    churn_messages: int
    paced_messages: int
    rate: float
    workers: int
    partitions: int
    work_ms: float
    rounds: int = 1


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_side_by_side(
    brokers: list[BenchBroker], plan: BenchPlan, progress: Callable[[str], None] = _progress
) -> tuple[list[BrokerColumn], list[str]]:
    """One column per broker (each figure the median run of the rounds), and what failed
    (each also told to ``progress`` as it comes, with every run's figures)."""
    runs = _Runs(brokers, plan, progress)
    for round_number in range(1, plan.rounds + 1):
        runs.round = round_number
        for workload in plan.workloads:
            await runs.workload(workload)
        if "churn" in plan.workloads:
            await runs.declare_rates()
    return runs.columns(), runs.failures


class _Runs:
    """The figures gathered so far, per broker, over the rounds."""

    def __init__(
        self, brokers: list[BenchBroker], plan: BenchPlan, progress: Callable[[str], None]
    ) -> None:
        self.brokers, self.plan, self.progress = brokers, plan, progress
        self.round = 1
        self.results: dict[tuple[str, str, str], list[Result]] = {}
        self.by_hand: dict[str, list[ByHand]] = {b.name: [] for b in brokers}
        self.declare: dict[str, list[float]] = {b.name: [] for b in brokers}
        self.failures: list[str] = []

    def _label(self, what: str, broker: BenchBroker) -> str:
        parts = [what]
        if len(self.brokers) > 1:
            parts.append(broker.name)
        if self.plan.rounds > 1:
            parts.append(f"round {self.round}")
        return " ".join(parts)

    def _failed(self, label: str, exc: BaseException) -> None:
        # one failed run must not throw away the others' figures
        self.progress(f"{label}: FAILED: {exc}")
        self.failures.append(f"{label}: {exc}")

    async def workload(self, name: str) -> None:
        plan = self.plan
        if name == "churn":  # every message a new key: fewer, or it takes minutes
            count = plan.churn_messages
            paced = plan.paced_messages * count // max(1, plan.messages)
        else:
            count, paced = plan.messages, plan.paced_messages
        workload = make_workload(name, count, paced)
        for strategy in plan.strategies:
            if not applies(strategy, name):
                continue
            for broker in self.brokers:
                label = self._label(f"{name:>11} {strategy:>10}", broker)
                try:
                    result = await run_strategy(
                        strategy,
                        workload,
                        broker.settings,
                        workers=plan.workers,
                        partitions=plan.partitions,
                        work_ms=plan.work_ms,
                        rate=plan.rate,
                    )
                except FAILURES as exc:
                    self._failed(label, exc)
                    continue
                self.progress(
                    f"{label}: {result.throughput:8,.0f} jobs/s "
                    f"{result.amqp_rate:8,.0f} AMQP msg/s  p99 {result.p99_ms:8,.1f} ms  "
                    f"violations {result.order_violations}"
                )
                self.results.setdefault((broker.name, name, strategy), []).append(result)
        if name == "churn":
            await self._by_hand()

    async def _by_hand(self) -> None:
        for broker in self.brokers:
            label = self._label("new keys by hand", broker)
            try:
                by_hand = await measure_by_hand_new_keys(
                    broker.settings, keys=self.plan.churn_messages
                )
            except FAILURES as exc:
                self._failed(label, exc)
                continue
            self.progress(f"{label}: {by_hand.rate:8,.0f} keys/s")
            self.by_hand[broker.name].append(by_hand)

    async def declare_rates(self) -> None:
        for broker in self.brokers:
            label = self._label("raw declare + bind", broker)
            try:
                rate = await measure_declare_rate(broker.settings, queues=self.plan.churn_messages)
            except FAILURES as exc:
                self._failed(label, exc)
                continue
            self.progress(f"{label}: {rate:8,.0f} queues/s")
            self.declare[broker.name].append(rate)

    def columns(self) -> list[BrokerColumn]:
        return [
            BrokerColumn(
                broker.name,
                [
                    _median_run(runs)
                    for (name, _, _), runs in self.results.items()
                    if name == broker.name
                ],
                declare_rate=_median(self.declare[broker.name]),
                by_hand=self._median_by_hand(broker.name),
            )
            for broker in self.brokers
        ]

    def _median_by_hand(self, broker: str) -> ByHand | None:
        runs = self.by_hand[broker]
        return _lower_median(runs, lambda run: run.rate) if runs else None


_Run = TypeVar("_Run")


def _median_run(runs: list[Result]) -> Result:
    """The run of median throughput: one real run's figures together, not medians of each
    taken from different runs."""
    return _lower_median(runs, lambda r: r.throughput)


def _lower_median(runs: list[_Run], figure: Callable[[_Run], float]) -> _Run:
    """The run whose ``figure`` is the median (the lower of the middle two: no figure made
    up), its other figures with it."""
    return sorted(runs, key=figure)[(len(runs) - 1) // 2]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
